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
        from common import loop  # after parsing, so that --help and flag errors stay fast

        loop.evaluate_checkpoint(args, build_model) if args.eval_only else loop.train(args, build_model)
    except KeyboardInterrupt:
        if "--debug" in argv:
            raise
        print("error: interrupted (a second Ctrl-C): the last checkpoint, if any, is kept", file=sys.stderr)
        sys.exit(130)
    except UserError as e:
        if "--debug" in argv:
            raise
        if os.environ.get("RANK", "0") == "0":  # one line per job, not one per process
            print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever it quotes
        sys.exit(e.exit_code)
