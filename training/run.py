"""Run a procedure or analysis with the shared engine: `accelerate launch training/run.py <method> --model M ...`.

The same code path as `hfpapers run` (and `accelerate launch -m hfpapers run`); the arguments are the same (`--help`).
"""

import sys

from hfpapers.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
