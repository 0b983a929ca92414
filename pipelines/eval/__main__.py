"""`python -m pipelines.eval --config RECIPE [key=value ...]`: the eval stage alone."""

import sys

from cluster.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
