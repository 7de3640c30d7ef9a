"""Element-level freezing: the mask registry, freeze rules, selectors and pinned values.

Pure TensorFlow / NumPy: nothing here reads configs, files of runs or the loop.
"""

from trainer.masks.elements import SELECTORS, ElementContext
from trainer.masks.errors import FreezeConfigError
from trainer.masks.registry import MaskRegistry
from trainer.masks.rules import FreezeRule, rules_from_config
from trainer.masks.schedules import ActiveWindow, PolynomialSparsity
from trainer.masks.selectors import select_elements
from trainer.masks.slicing import parse_slice

__all__ = [
    "ActiveWindow",
    "ElementContext",
    "FreezeConfigError",
    "FreezeRule",
    "MaskRegistry",
    "PolynomialSparsity",
    "SELECTORS",
    "parse_slice",
    "rules_from_config",
    "select_elements",
]
