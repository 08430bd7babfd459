"""Moved: the tools live in tools/ (python -m tools.results)."""

from common.errors import moved

moved("results")
