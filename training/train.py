"""Train a method with the shared engine: `accelerate launch training/train.py <method> --output-dir out/ ...`.

The same code path as `hfpapers train`; the arguments are the same (`--help`).
"""

import sys

from hfpapers.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
