"""The numbers a flag may take, checked where the flag is parsed: every numeric flag of every command
has one of these as its argparse `type`, so a value out of range is refused in one line (argparse
prefixes "argument --flag: ") before anything runs, and tests/test_flags.py can derive each flag's
boundary values from its declaration. Rules between flags (--fold against --folds) stay in the
commands' own checks."""

import argparse
import math
import os
from pathlib import Path


class Range:
    """An argparse type: a finite number of `kind` for which `ok` holds, else "RULE, got TEXT".
    `edges` are the values where the rule changes (for the boundary tests)."""

    def __init__(self, kind, rule, ok, edges):
        self.kind, self.rule, self.ok, self.edges = kind, rule, ok, edges
        self.__name__ = kind.__name__  # what argparse calls the type in its own messages

    def __call__(self, text):
        try:
            value = self.kind(text)
        except ValueError:
            what = "an integer" if self.kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if (self.kind is float and not math.isfinite(value)) or not self.ok(value):
            raise argparse.ArgumentTypeError(f"{self.rule}, got {text}")
        return value

    def __repr__(self):  # --help and argparse's errors show types by name
        return self.rule


def count(low=1, zero=None):
    """An integer >= low; with `zero`, 0 too, meaning that (e.g. zero="none")."""
    if zero is not None:
        more = "or more" if low == 1 else f"or at least {low}"
        return Range(int, f"must be 0 ({zero}) {more}", lambda v: v == 0 or v >= low, (0, low))
    return Range(int, f"must be at least {low}" if low else "must be 0 or more", lambda v: v >= low, (low,))


def amount(zero=None, unit=""):
    """A number >= 0 (seconds, MiB, degrees); `zero`: what 0 means."""
    unit = f" {unit}" if unit else ""
    rule = f"must be 0 ({zero}) or more{unit}" if zero else f"must be 0 or more{unit}"
    return Range(float, rule, lambda v: v >= 0, (0.0,))


def positive():
    return Range(float, "must be positive", lambda v: v > 0, (0.0,))


def share(closed=False):
    """A number in [0, 1) (a share of something), or [0, 1] (a probability)."""
    if closed:
        return Range(float, "must be in [0, 1]", lambda v: 0 <= v <= 1, (0.0, 1.0))
    return Range(float, "must be in [0, 1)", lambda v: 0 <= v < 1, (0.0, 1.0))


def multiple(k, why):
    """A positive multiple of k (an image size a network with five 2x poolings can take)."""
    return Range(int, f"must be a positive multiple of {k} ({why})", lambda v: v >= k and v % k == 0, (k,))


def image_size():
    """What every network here takes: five 2x poolings."""
    return multiple(32, "five 2x poolings")


def seed():
    """What numpy, torch and Python's random all take."""
    return Range(int, f"must be in 0..{2**32 - 1}", lambda v: 0 <= v < 2**32, (0, 2**32))


def pathname(text):
    """A file or folder name the file system can take (no NUL, no part over 255 bytes): another is
    refused here, not as an OSError wherever it is first used."""
    if "\0" in text or any(len(os.fsencode(part)) > 255 for part in text.split(os.sep)):
        shown = text if len(text) < 60 else text[:60] + "..."
        raise argparse.ArgumentTypeError(f"not a name this file system can take: {shown!r}")
    return Path(text)
