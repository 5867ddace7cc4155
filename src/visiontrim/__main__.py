"""``python -m visiontrim``: the same command line as the ``visiontrim`` script."""

import sys

from visiontrim.cli import main

if __name__ == "__main__":
    sys.exit(main())
