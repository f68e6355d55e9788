"""Jinja templates of the pages, shipped inside the package as muse.templates."""
