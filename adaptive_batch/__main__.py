"""``python -m adaptive_batch``: the ``adaptive-batch`` command."""

import sys

from adaptive_batch.cli import main

if __name__ == "__main__":
    sys.exit(main())
