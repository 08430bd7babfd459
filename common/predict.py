"""Moved: the tools live in tools/ (python -m tools.predict)."""

from common.errors import moved

moved("predict")
