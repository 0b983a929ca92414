"""`python -m tune --config RECIPE [key=value ...]`: the tune stage alone."""

import sys

from cluster.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
