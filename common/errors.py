"""The error contract: a user error ends with exit code 2 and one line `error: ...` naming the file
or flag (a traceback only with --debug)."""


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
