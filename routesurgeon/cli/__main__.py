"""``python -m routesurgeon.cli``: the same as the ``routesurgeon`` console script."""

import sys

from routesurgeon.cli import main

if __name__ == "__main__":
    sys.exit(main())
