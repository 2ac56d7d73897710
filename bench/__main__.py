"""``python -m bench``: same as the ``vitq-bench`` console script."""

import sys

from bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
