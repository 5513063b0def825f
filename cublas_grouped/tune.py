"""``python -m cublas_grouped.tune``: runs :func:`cublas_grouped.tools.tune.main`."""

import sys

from .tools.tune import main

if __name__ == "__main__":
    sys.exit(main())
