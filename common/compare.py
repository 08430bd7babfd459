"""Moved: the tools live in tools/ (python -m tools.compare)."""

from common.errors import moved

moved("compare")
