"""Checkpointing the registry's rule state (which rule froze what, and to which value).

The masks and pinned values are ``tf.Variable`` s and checkpoint by themselves;
what a rule captured when it was applied (``value: current`` at its start step,
the elements a ``random`` or ``magnitude`` selector chose, when a gradual-pruning
rule last updated) lives in NumPy. :class:`RuleStateTrackable` stores it in the
same ``tf.train.Checkpoint`` through ``tf.train.experimental.PythonState``.
"""

from __future__ import annotations

import io
import json

import numpy as np
import tensorflow as tf


class RuleStateTrackable(tf.train.experimental.PythonState):
    """Serializes each rule's activity, last update step, frozen masks and pinned values.

    Restoring fills the registry's rule states; call
    ``MaskRegistry.after_restore()`` once the checkpoint's variables are
    restored too, so the registry's host copies match them.
    """

    def __init__(self, registry):
        self._registry = registry
        self.restored = False

    def serialize(self) -> bytes:
        arrays, header = {}, {"rules": {}, "step": self._registry._step, "epoch": self._registry._epoch}
        for i, (name, state) in enumerate(self._registry._states.items()):
            header["rules"][name] = {"active": state.active, "last_update_step": state.last_update_step,
                                     "paths": list(state.frozen)}
            for j, path in enumerate(state.frozen):
                arrays[f"r{i}_f{j}"] = np.packbits(state.frozen[path].reshape(-1))
                arrays[f"r{i}_p{j}"] = state.pinned[path]
        buffer = io.BytesIO()
        np.savez(buffer, header=np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8), **arrays)
        return buffer.getvalue()

    def deserialize(self, data: bytes) -> None:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            header = json.loads(npz["header"].tobytes().decode("utf-8"))
            states = self._registry._states
            unknown = sorted(set(header["rules"]) - set(states))
            if unknown:
                raise ValueError(f"the checkpoint has rules {unknown} that this run does not declare; "
                                 f"declared rules: {list(states)}")
            for i, (name, saved) in enumerate(header["rules"].items()):
                state = states[name]
                state.active = bool(saved["active"])
                state.last_update_step = saved["last_update_step"]
                state.frozen, state.pinned = {}, {}
                for j, path in enumerate(saved["paths"]):
                    info = self._registry._by_path[path]
                    shape = tuple(info.variable.shape)
                    size = int(np.prod(shape, dtype=np.int64))
                    state.frozen[path] = np.unpackbits(npz[f"r{i}_f{j}"], count=size).astype(bool).reshape(shape)
                    state.pinned[path] = np.asarray(npz[f"r{i}_p{j}"])
            self._registry._step = int(header["step"])
            self._registry._epoch = int(header["epoch"])
        self.restored = True
