"""The checkpointing of a registry's rule state: activity, captured selections, pin digests and the clock.

What a rule captured when it was applied (the elements a ``magnitude`` or ``mask_file`` selector chose, when a
gradual-pruning rule last updated) and the digests of ``current`` pins live in NumPy in the
:class:`~trainer.masks.state.MaskState`; :class:`RuleStateTrackable` stores them in the same
``tf.train.Checkpoint`` as the store's variables, through ``tf.train.experimental.PythonState``.
Every key is a variable path, never a sanitized string.
"""

from __future__ import annotations

import io
import json
from typing import Dict

import numpy as np
import tensorflow as tf


class RuleStateTrackable(tf.train.experimental.PythonState):
    """Serializes each rule's activity, last update step and captured selections, and the pin digests.

    Reads and restores only public names of a :class:`~trainer.masks.state.MaskState`; call
    ``MaskRegistry.after_restore()`` once the checkpoint's variables are
    restored too.

    Args:
      state: the registry's :class:`~trainer.masks.state.MaskState`.
    """

    def __init__(self, state):
        self._state = state
        self.restored = False

    @property
    def digests(self) -> Dict[str, str]:
        """The non-empty pin digests, per variable path."""
        return {p: d for p, d in self._state.digests.items() if d and p in self._state.covered}

    def serialize(self) -> bytes:
        state = self._state
        header = {"rules": {}, "step": state.step, "epoch": state.epoch, "digests": self.digests}
        arrays = {}
        for i, (name, rule) in enumerate(state.rules.items()):
            header["rules"][name] = {"active": rule.active, "last_update_step": rule.last_update_step,
                                     "captured": list(rule.captured)}
            for j, path in enumerate(rule.captured):
                arrays[f"r{i}_c{j}"] = rule.captured[path]
        buffer = io.BytesIO()
        np.savez(buffer, header=np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8), **arrays)
        return buffer.getvalue()

    def deserialize(self, data: bytes) -> None:
        rules = self._state.rules
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            header = json.loads(npz["header"].tobytes().decode("utf-8"))
            unknown = sorted(set(header["rules"]) - set(rules))
            if unknown:
                raise ValueError(f"the checkpoint has rules {unknown} that this run does not declare; "
                                 f"declared rules: {list(rules)}")
            for i, (name, saved) in enumerate(header["rules"].items()):
                rule = rules[name]
                rule.active = bool(saved["active"])
                rule.last_update_step = saved["last_update_step"]
                rule.captured = {path: np.asarray(npz[f"r{i}_c{j}"]) for j, path in enumerate(saved["captured"])}
            self._state.restored(int(header["step"]), int(header["epoch"]), dict(header.get("digests", {})))
        self.restored = True
