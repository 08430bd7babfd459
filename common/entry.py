"""The entry point of every <model>/train.py: parse the flags, train or evaluate, and keep the error
contract (common/errors.py)."""

import os
import sys

from common.cli import parse
from common.errors import UserError


def main(parser, build_model, argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse(parser, argv)
        from common.report import console

        console.release()  # a new command: nothing kept of an earlier one in this process
        from common import evaluate, loop, resolve  # after parsing: --help and flag errors stay fast

        args = resolve.resolved(args)
        evaluate.evaluate_checkpoint(args, build_model) if args.eval_only else loop.train(args, build_model)
    except KeyboardInterrupt:
        if "--debug" in argv:
            raise
        print("error: interrupted (a second Ctrl-C): the last checkpoint, if any, is kept", file=sys.stderr)
        sys.exit(130)
    except UserError as e:
        if "--debug" in argv:
            raise
        say("error: " + " ".join(str(e).split()), e.exit_code)  # one line, whatever it quotes
        sys.exit(e.exit_code)


def say(line, code):
    """One line per job, not one per process. Under run.sh, which made the file LGG_ERROR_FILE names,
    every process of that node writes it there instead, and run.sh prints it after the launcher's own
    report of the failure (accelerate's traceback, torchrun's summary), with this exit code."""
    path = os.environ.get("LGG_ERROR_FILE")
    if path and os.path.isfile(path):
        with open(path, "a") as f:
            f.write(f"{code} {line}\n")
    elif os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)
