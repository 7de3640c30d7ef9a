"""trainer: element-level weight freezing for Keras 3 models in a TensorFlow training loop."""

from trainer.logs import import_tensorflow_quietly

import_tensorflow_quietly()  # TensorFlow's native start-up lines off (unless log.verbose=true / TRAINER_VERBOSE=1)

from trainer.hooks import LoopState  # noqa: E402
from trainer.loop import Trainer  # noqa: E402
from trainer.masks import FreezeConfigError, FreezeRule, MaskRegistry  # noqa: E402
from trainer.masked_optimizer import MaskedOptimizer  # noqa: E402
from trainer.stripping import strip  # noqa: E402

__all__ = ["FreezeConfigError", "FreezeRule", "MaskRegistry", "MaskedOptimizer", "LoopState", "Trainer", "strip"]
__version__ = "0.1.0"
