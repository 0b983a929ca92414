"""`python -m cluster COMMAND ...`: the `loom` CLI without the console script (used by Ray jobs)."""

import sys

from cluster.cli import main

if __name__ == "__main__":
    sys.exit(main())
