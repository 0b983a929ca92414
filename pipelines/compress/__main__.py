"""`python -m pipelines.compress --config RECIPE [key=value ...]`: the compress stage alone."""

import sys

from cluster.cli import main

if __name__ == "__main__":
    sys.exit(main(["compress", *sys.argv[1:]]))
