"""Moved: the tools live in tools/ (python -m tools.bench)."""

from common.errors import moved

moved("bench")
