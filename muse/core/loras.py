"""The LoRA folder (--lora-dir) as the parent sees it: which adapters requests may name, read again whenever the
folder changes, so a file dropped in is usable at once and a deleted one is refused by name."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SUFFIX = ".safetensors"


@dataclass(frozen=True)
class LoraFile:
    name: str  # the file's name without .safetensors: what a request names
    bytes: int
    modified: float


class LoraFolder:
    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self._stamp: int | None = None
        self._files: tuple[LoraFile, ...] = ()

    def files(self) -> tuple[LoraFile, ...]:
        """The adapters there now, by name; read again only when the folder's own mtime moved (a file added,
        removed or renamed)."""
        try:
            stamp = self.folder.stat().st_mtime_ns
        except OSError:
            return ()
        if stamp != self._stamp:
            found = []
            with os.scandir(self.folder) as entries:
                for entry in entries:
                    if entry.name.endswith(SUFFIX) and not entry.name.startswith(".") and entry.is_file():
                        stat = entry.stat()
                        found.append(LoraFile(entry.name.removesuffix(SUFFIX), stat.st_size, stat.st_mtime))
            self._files = tuple(sorted(found, key=lambda f: f.name.lower()))
            self._stamp = stamp
        return self._files

    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.files())
