"""The error contract: a user error ends with exit code 2 and one line `error: ...` naming the file
or flag (a traceback only with --debug)."""

import os
import signal
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


def discard(path):
    """A temporary file removed if it is there; where even that fails (a read-only place) the error
    being reported is the one that counts."""
    try:
        os.unlink(path)
    except OSError:
        pass


# what a command made for its output, in order: folders (common.folders.make) and the records it
# wrote in them; a command that fails on a user error, or is stopped, removes each folder it made
# that holds nothing else (an empty folder, or one with only a record, is a trace too)
made = []


def unmake():
    """Each folder of `made` holding only what `made` names, removed with it, the deepest first."""
    mine = set(made)
    for folder in reversed(made):
        if not folder.is_dir():
            continue  # a record: removed with its folder, or kept with it
        try:
            inside = list(folder.iterdir())
            if all(f in mine and f.is_file() for f in inside):  # a folder left in it keeps it
                for f in inside:
                    f.unlink()
                folder.rmdir()
        except OSError:
            pass  # gone already, or not ours to remove: kept
    made.clear()


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
    # SIGTERM as an exception: what is being written is cleaned up on the way out (files.replace)
    old = signal.signal(signal.SIGTERM, terminated)
    made.clear()
    try:
        return body(argv) or 0
    except UserError as e:
        unmake()
        if "--debug" in argv:
            raise
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return e.exit_code
    except (Terminated, KeyboardInterrupt) as e:
        unmake()
        if "--debug" in argv:
            raise
        what = "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C"
        print(f"error: stopped by {what}; nothing half-written is left", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, old)
        made.clear()


class Terminated(BaseException):
    """SIGTERM, raised where the command is, so that its writes clean up as for any other error."""


def terminated(*_):
    raise Terminated()


def child(cmd, what):
    """Run a command of this repository (a train.py, or a launcher of one), its output shown; 0, or
    its exit code when it failed otherwise than by a user error. A user error of the child comes
    back as that error, `what: <its line>` (it writes the line to LGG_ERROR_FILE: common.entry.say).
    SIGTERM and Ctrl-C are the child's to act on: passed to it (in its own session, so that a
    terminal's Ctrl-C reaches it once, through us), it saves and ends, and so does the command."""
    with tempfile.NamedTemporaryFile("r", prefix="lgg-error-") as said:
        try:
            code, stopped = run_child(cmd, {**os.environ, "LGG_ERROR_FILE": said.name})
        except OSError as e:  # a launcher that is not there
            raise UserError(f"{what}: cannot run {cmd[0]} ({e.strerror or e})") from e
        lines = said.read().splitlines()
    if stopped:
        error = UserError(
            f"{what}: stopped by {stopped[0]} (it saves where it is): the same command again resumes it"
        )
        error.exit_code = 128 + (signal.SIGINT if stopped[0] == "Ctrl-C" else signal.SIGTERM)
        raise error
    if code == 0 or not lines:
        return code
    status, _, line = lines[-1].partition(" ")
    error = UserError(f"{what}: {line.removeprefix('error: ')}")
    error.exit_code = int(status) if status.isdigit() else 2
    raise error


def run_child(cmd, env):
    """(exit code, the signals passed on) of `cmd`, run in its own session with SIGTERM and SIGINT
    passed to it while it runs."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    got = []

    def forward(signum, _):
        got.append("Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name)
        proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait(), got
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
