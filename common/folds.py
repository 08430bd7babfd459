"""Moved: the tools live in tools/ (python -m tools.folds)."""

from common.errors import moved

moved("folds")
