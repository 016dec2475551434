"""Training of the embedded edge/cloud model pair (see `embedded.train_embedded`)."""

from .embedded import TrainConfig, train_embedded

__all__ = ["TrainConfig", "train_embedded"]
