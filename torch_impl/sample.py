"""`python -m torch_impl.sample`: the command; its code is torch_impl/tools/sample.py (`--help` for usage)."""

import sys

from torch_impl.tools.sample import main

if __name__ == "__main__":
    sys.exit(main())
