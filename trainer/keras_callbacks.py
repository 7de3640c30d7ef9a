"""Keras callbacks (``keras.callbacks.Callback``) inside :meth:`trainer.Trainer.fit`, with Keras's hooks and logs.

:func:`adapt_callbacks` wraps each Keras callback in a :class:`KerasCallback`,
one of the outer loop's hooks (:class:`trainer.callbacks.Callback`), which
calls it as ``model.fit`` does: ``on_train_begin``, ``on_epoch_begin(epoch)``,
``on_train_batch_begin/end(batch, logs)`` once per compiled execution (``batch``
is the index in its epoch of the execution's last step), ``on_epoch_end(epoch,
logs)`` with the ``val_*`` keys, ``on_train_end``. Epochs count from 0 as in
Keras. The callback's ``model`` is a view of the trained model whose
``optimizer`` is the trainer's optimizer and whose ``stop_training = True``
ends ``fit`` after the epoch (as in Keras); everything else (``get_weights``,
``save``, ``layers``...) is the model's own. ``EarlyStopping``,
``ModelCheckpoint``, ``TensorBoard``, ``CSVLogger``, ``ReduceLROnPlateau`` and
``LambdaCallback`` work this way.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List

import keras

from trainer.callbacks import Callback
from trainer.fit_checks import is_callback

__all__ = ["KerasCallback", "ModelView", "adapt_callbacks"]


class ModelView:
    """The model as a Keras callback sees it: the trainer's ``optimizer`` and a ``stop_training`` flag.

    The model itself is not changed (assigning ``model.optimizer`` would add
    the optimizer to the model's checkpointed objects).
    """

    def __init__(self, model: keras.Model, optimizer: keras.optimizers.Optimizer):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "optimizer", optimizer)
        object.__setattr__(self, "stop_training", False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("stop_training", "optimizer"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._model, name, value)


class KerasCallback(Callback):
    """One ``keras.callbacks.Callback`` called with Keras's hooks by the outer loop.

    Args:
      callback: the Keras callback.
      view: the :class:`ModelView` that every Keras callback of the ``fit``
        call shares (one ``stop_training`` flag, as one model has).
    """

    def __init__(self, callback: keras.callbacks.Callback, view: ModelView):
        self.callback = callback
        self.view = view
        callback.set_model(view)

    def _logs(self, logs: Dict[str, Any]) -> Dict[str, float]:
        return {key: value for key, value in logs.items() if isinstance(value, (int, float))}

    def on_train_begin(self, state) -> None:
        self.view.stop_training = False
        self.callback.set_params({"epochs": state.final_epoch, "steps": state.steps_per_epoch, "verbose": 0})
        self.callback.on_train_begin({})
        self.callback.on_epoch_begin(state.epoch, {})

    def on_execution_end(self, state, step_before: int, step: int, logs: Dict[str, float]) -> None:
        batch = max(step - state.epoch_first_step - 1, 0)
        self.callback.on_train_batch_begin(batch, {})
        self.callback.on_train_batch_end(batch, self._logs(logs))

    def on_epoch_end(self, state, epoch: int, step: int, logs: Dict[str, float]) -> None:
        self.callback.on_epoch_end(epoch - 1, self._logs(logs))
        if self.view.stop_training:
            state.request_stop()
        elif state.final_epoch is None or epoch < state.final_epoch:
            self.callback.on_epoch_begin(epoch, {})

    def on_train_end(self, state, step: int, logs: Dict[str, float], status: str) -> None:
        self.callback.on_train_end(self._logs(logs))


def adapt_callbacks(callbacks: Iterable[Any], model: keras.Model, optimizer) -> List[Callback]:
    """``callbacks`` with every ``keras.callbacks.Callback`` wrapped in a :class:`KerasCallback` (in order).

    Raises:
      TypeError: an object that is not a callback (:func:`trainer.fit_checks.is_callback`).
    """
    out: List[Callback] = []
    view = ModelView(model, optimizer)  # ``model.optimizer`` for the callbacks (ReduceLROnPlateau, TensorBoard)
    for i, cb in enumerate(callbacks):
        if isinstance(cb, keras.callbacks.Callback):
            out.append(KerasCallback(cb, view))
        elif is_callback(cb):
            out.append(cb)
        else:
            raise TypeError(f"callbacks[{i}] is a {type(cb).__name__}, not a keras.callbacks.Callback or a "
                            "trainer.callbacks.Callback")
    return out
