"""`python -m torch_impl.launch`: the command; its code is torch_impl/training/launch.py (`--help` for usage)."""

import sys

from torch_impl.training.launch import main

if __name__ == "__main__":
    sys.exit(main())
