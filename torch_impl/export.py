"""`python -m torch_impl.export`: the command; its code is torch_impl/tools/export.py (`--help` for usage)."""

import sys

from torch_impl.tools.export import main

if __name__ == "__main__":
    sys.exit(main())
