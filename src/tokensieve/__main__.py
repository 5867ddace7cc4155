"""``python -m tokensieve``: the same command line as the ``tokensieve`` script."""

import sys

from tokensieve.cli import main

if __name__ == "__main__":
    sys.exit(main())
