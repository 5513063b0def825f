"""``python -m cublas_grouped.bench``: runs :func:`cublas_grouped.tools.bench.main`."""

import sys

from .tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
