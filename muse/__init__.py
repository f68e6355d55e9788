"""Muse: a self-hosted text-to-image service."""

__version__ = "0.1.0"
