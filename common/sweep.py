"""Moved: the tools live in tools/ (python -m tools.sweep)."""

from common.errors import moved

moved("sweep")
