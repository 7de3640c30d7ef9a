"""Checkpointing the registry's rule state (which rules are active, what they captured, pin digests).

The registry's device variables (dense masks, compact indices and values)
checkpoint by themselves; what a rule captured when it was applied (the
elements a ``magnitude`` or ``mask_file`` selector chose, when a
gradual-pruning rule last updated) and the digests of ``current`` pins live in
NumPy. :class:`RuleStateTrackable` stores them in the same
``tf.train.Checkpoint`` through ``tf.train.experimental.PythonState``. Every
key is a variable path, never a sanitized string.
"""

from __future__ import annotations

import io
import json
from typing import Dict

import numpy as np
import tensorflow as tf


class RuleStateTrackable(tf.train.experimental.PythonState):
    """Serializes each rule's activity, last update step and captured selections, and the pin digests.

    Restoring fills the registry's rule states and :attr:`digests`; call
    ``MaskRegistry.after_restore()`` once the checkpoint's variables are
    restored too.
    """

    def __init__(self, registry):
        self._registry = registry
        self.restored = False
        self.digests: Dict[str, str] = {}

    def serialize(self) -> bytes:
        registry = self._registry
        digests = {p: c.digest for p, c in registry._refs.covered.items() if c.digest}
        header = {"rules": {}, "step": registry._step, "epoch": registry._epoch, "digests": digests}
        arrays = {}
        for i, (name, state) in enumerate(registry._states.items()):
            header["rules"][name] = {"active": state.active, "last_update_step": state.last_update_step,
                                     "captured": list(state.captured)}
            for j, path in enumerate(state.captured):
                arrays[f"r{i}_c{j}"] = state.captured[path]
        buffer = io.BytesIO()
        np.savez(buffer, header=np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8), **arrays)
        return buffer.getvalue()

    def deserialize(self, data: bytes) -> None:
        registry = self._registry
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            header = json.loads(npz["header"].tobytes().decode("utf-8"))
            states = registry._states
            unknown = sorted(set(header["rules"]) - set(states))
            if unknown:
                raise ValueError(f"the checkpoint has rules {unknown} that this run does not declare; "
                                 f"declared rules: {list(states)}")
            for i, (name, saved) in enumerate(header["rules"].items()):
                state = states[name]
                state.active = bool(saved["active"])
                state.last_update_step = saved["last_update_step"]
                state.captured = {path: np.asarray(npz[f"r{i}_c{j}"]) for j, path in enumerate(saved["captured"])}
            registry._step = int(header["step"])
            registry._epoch = int(header["epoch"])
            self.digests = dict(header.get("digests", {}))
        self.restored = True
