"""The error contract: a user error ends with exit code 2 and one line `error: ...` naming the file
or flag (a traceback only with --debug)."""

import sys


class UserError(Exception):
    """Bad input from the user (a flag, a file, a folder): reported in one line, exit code 2."""

    exit_code = 2


def no_data(path):
    """The line for a data folder that is not there: said by the scripts before they import torch
    (seconds) and by every reader of the data."""
    return UserError(
        f"data folder not found: {path} (set --data-dir (default $LGG_DATA_DIR), or use --synthetic)"
    )


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
