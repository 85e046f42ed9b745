"""`python -m torch_impl.plot`: the command; its code is torch_impl/tools/plot.py (`--help` for usage)."""

import sys

from torch_impl.tools.plot import main

if __name__ == "__main__":
    sys.exit(main())
