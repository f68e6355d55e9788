"""Gallery storage (placeholder: the web-page issue implements it)."""

from __future__ import annotations

from pathlib import Path

from muse.messages import GenerateResult


class Gallery:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def save(self, result: GenerateResult) -> list[str]:
        return []
