"""python -m common.export: the same command as python -m tools.export, under the name it was
first given (the other tools moved to tools/ and only say so; this one runs)."""

import sys

from tools.export import main

if __name__ == "__main__":
    sys.exit(main())
