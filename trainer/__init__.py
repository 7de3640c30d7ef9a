"""trainer: element-level weight freezing for Keras 3 models in a TensorFlow training loop."""

from trainer.loop import Trainer
from trainer.masks import FreezeConfigError, FreezeRule, MaskRegistry

__all__ = ["FreezeConfigError", "FreezeRule", "MaskRegistry", "Trainer"]
__version__ = "0.1.0"
