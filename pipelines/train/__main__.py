"""`python -m pipelines.train --config RECIPE [key=value ...]`: the train stage alone."""

import sys

from cluster.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
