"""The error contract: a user error ends with exit code 2 and one line `error: ...` naming the file
or flag (a traceback only with --debug)."""

import os
import subprocess
import sys
import tempfile


class UserError(Exception):
    """Bad input from the user (a flag, a file, a folder): reported in one line, exit code 2."""

    exit_code = 2


def no_data(path):
    """The line for a data folder that is not there: said by the scripts before they import torch
    (seconds) and by every reader of the data."""
    return UserError(
        f"data folder not found: {path} (set --data-dir (default $LGG_DATA_DIR), or use --synthetic)"
    )


class Incomplete(UserError):
    """A table made of what has finished, with something requested missing (named): exit code 1."""

    exit_code = 1


class Unfinished(UserError):
    """A run whose training is saved but whose last steps failed: one line saying how to finish it."""

    exit_code = 1


def contract(body, argv=None):
    """A command under the contract: `body(argv)`'s exit code (None: 0); a UserError, argparse's own
    included (common.cli.Parser raises them), is one line `error: ...` on stderr and its exit code,
    its traceback only with --debug."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return body(argv) or 0
    except UserError as e:
        if "--debug" in argv:
            raise
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return e.exit_code


def child(cmd, what):
    """Run a command of this repository (a train.py, or a launcher of one), its output shown; 0, or
    its exit code when it failed otherwise than by a user error. A user error of the child comes
    back as that error, `what: <its line>` (it writes the line to LGG_ERROR_FILE: common.entry.say)."""
    with tempfile.NamedTemporaryFile("r", prefix="lgg-error-") as said:
        try:
            code = subprocess.call(cmd, env={**os.environ, "LGG_ERROR_FILE": said.name})
        except OSError as e:  # a launcher that is not there
            raise UserError(f"{what}: cannot run {cmd[0]} ({e.strerror or e})") from e
        lines = said.read().splitlines()
    if code == 0 or not lines:
        return code
    status, _, line = lines[-1].partition(" ")
    error = UserError(f"{what}: {line.removeprefix('error: ')}")
    error.exit_code = int(status) if status.isdigit() else 2
    raise error
