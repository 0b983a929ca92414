"""`python -m serve --config RECIPE [key=value ...]`: the serve stage alone."""

import sys

from cluster.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
