"""Where the pages' templates and static files live: inside the installed package, as `muse.templates` and
`muse.static` (pyproject maps the repository's top-level templates/ and static/ there), so a wheel serves
the same files as a checkout."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def package_folder(package: str) -> Path:
    # Jinja's loader and StaticFiles want a real folder; wheels and editable installs both give one.
    return Path(str(files(package)))


TEMPLATES_DIR = package_folder("muse.templates")
STATIC_DIR = package_folder("muse.static")
