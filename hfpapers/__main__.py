"""`python -m hfpapers ...`, and so `accelerate launch -m hfpapers train ...` from an installed package."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
