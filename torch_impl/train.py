"""`python -m torch_impl.train`: the command; its code is torch_impl/training/main.py (`--help` for usage)."""

import sys

from torch_impl.training.main import main

if __name__ == "__main__":
    sys.exit(main())
