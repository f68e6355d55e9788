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

# htmx is pinned: the CDN copy and static/htmx.min.js are the same file, so one SRI hash covers both, and
# the pages' Content-Security-Policy allows exactly this URL.
HTMX_VERSION = "2.0.11"
HTMX_CDN = f"https://cdn.jsdelivr.net/npm/htmx.org@{HTMX_VERSION}/dist/htmx.min.js"
HTMX_INTEGRITY = "sha384-2OatzQy1H+Zd/IIrjr1TcuDGqLXeHhbooAyJY1KdQMKnr4LZ22k31GBLdYKHmVjg"
# htmx's server-sent events extension, pinned the same way (static/htmx-ext-sse.min.js is the same file).
SSE_VERSION = "2.2.4"
SSE_CDN = f"https://cdn.jsdelivr.net/npm/htmx-ext-sse@{SSE_VERSION}/dist/sse.min.js"
SSE_INTEGRITY = "sha384-A986SAtodyH8eg8x8irJnYUk7i9inVQqYigD6qZ9evobksGNIXfeFvDwLSHcp31N"

# htmx and its SSE extension come from pinned CDN URLs (allowed exactly, not the whole CDN host), with local
# fallbacks loaded by one inline script (allowed by its hash, which changes if templates/base.html changes
# that line); nothing else is external.
# Inline styles stay allowed: the progress bar's width and htmx's indicator styles use them.
FALLBACK_SCRIPT_HASH = "sha256-5Joqi1Z3yu96NnhrDJTvuMK0GvTiBVc2Ld3n+ayqVJw="
PAGE_CSP = (
    b"default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    b"script-src 'self' " + HTMX_CDN.encode() + b" " + SSE_CDN.encode() + b" '" + FALLBACK_SCRIPT_HASH.encode() + b"'; "
    b"connect-src 'self'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'"
)
