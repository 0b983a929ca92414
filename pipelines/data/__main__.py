"""`python -m pipelines.data --config RECIPE [key=value ...]`: the data stage alone."""

import sys

from cluster.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", *sys.argv[1:]]))
