"""Train a Flax MLP or CNN with a gradxform optimizer: `python examples/train.py --help`."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `examples` and `gradxform` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.cli import main

if __name__ == "__main__":
    sys.exit(main())
