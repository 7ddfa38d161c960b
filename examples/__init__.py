"""The gradxform example: Flax NNX training on real data (`python examples/train.py`)."""
