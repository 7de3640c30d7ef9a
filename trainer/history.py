"""What :meth:`trainer.Trainer.fit` returns: the per-epoch logs as a list, and as Keras's ``History``."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

__all__ = ["History"]


class History(list):
    """One logs dict per completed epoch of a ``fit`` call (a list, as before), readable as ``keras.callbacks.History``.

    Attributes:
      history: ``{key: [value per epoch]}`` (``loss``, ``accuracy``, ``val_loss``...), Python floats.
      epoch: the epoch index (from 0, counted over the run) of each entry.
      params: ``{"epochs": ..., "steps": ...}`` of the call.
      model: the trained ``keras.Model``.
    """

    def __init__(self, logs: List[Dict[str, float]], *, epoch: Optional[List[int]] = None,
                 params: Optional[Dict[str, Any]] = None, model: Any = None):
        super().__init__(logs)
        self.epoch = list(epoch) if epoch is not None else list(range(len(logs)))
        self.params = dict(params or {})
        self.model = model

    @property
    def history(self) -> Dict[str, List[float]]:
        """``{key: [value per epoch]}``; a key missing from some epoch's logs lists only the epochs that have it."""
        out: Dict[str, List[float]] = {}
        for logs in self:
            for key, value in logs.items():
                out.setdefault(key, []).append(value)
        return out
