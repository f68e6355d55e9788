"""HTMX pages (placeholder: the web-page issue implements them)."""

from __future__ import annotations

from starlette.routing import BaseRoute

routes: list[BaseRoute] = []
