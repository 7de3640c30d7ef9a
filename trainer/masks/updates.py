"""Two ways to update one partly frozen variable: dense and compact, behind one small interface.

The step calls, per covered variable: :meth:`gradient` (the gradient the
optimizer sees), :meth:`hold` before ``optimizer.apply_gradients``, and
:meth:`release` after it; the optimizer updates :attr:`optimizer_variable`.
Which class a variable uses is decided by the registry's plan, never by the step.

- :class:`DenseUpdate` keeps a boolean trainable-mask (1 byte per element).
  The optimizer updates the whole variable with masked gradients; then every
  frozen element is set back to the value it held before the update with
  ``tf.where(mask, updated, before)``, bit-exact whatever the optimizer did
  (decoupled weight decay and momentum move elements whose gradient is 0).
- :class:`CompactUpdate` keeps the flat indices of the ``k`` trainable elements
  (int32; int64 past 2**31 elements) and a compact variable ``[k]`` holding
  their values; the optimizer is built on the compact variable (its slots are
  ``[k]``). The dense gradient is gathered, applied to the compact variable and
  scattered into the model variable in place
  (``ResourceVariable.scatter_nd_update``). Frozen elements are never written.
  For a bfloat16 / float16 variable the ``[k]`` values (and so the slots) are
  float32 masters, rounded to the variable's dtype when written back
  (:mod:`trainer.masks.precision`).

Under a ``tf.distribute`` strategy the write-back runs on every replica's copy
(``strategy.extended.update``, as Keras applies optimizer updates).
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from trainer.masks.precision import master_dtype, refreshed
from trainer.masks.writeback import is_deferred, scatter_flat

UPDATE_MODES = ("auto", "dense", "compact", "sampled")  # sampled: compact, kernel gradients sampled


def on_every_copy(variable, fn, *args) -> None:
    """Runs ``fn(tf_variable, *args)`` on every replica's copy of ``variable`` (once when it is not distributed).

    A distributed (e.g. mirrored) variable is updated through its strategy's
    ``extended.update``, from a replica context through ``merge_call``.
    """
    target = variable.value if isinstance(variable, keras.Variable) else variable
    if isinstance(target, tf.distribute.DistributedValues):
        def update(strategy):
            strategy.extended.update(target, fn, args=args, group=False)

        if tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context():
            tf.distribute.get_replica_context().merge_call(update)
        else:  # cross-replica context, or outside the strategy's scope
            update(target.distribute_strategy)
        return
    fn(target, *args)


def keep_where(variable, keep: tf.Tensor, other: tf.Tensor) -> None:
    """Sets ``variable`` (every replica's copy) to ``tf.where(keep, variable, other)``, bit-exact.

    ``keep`` is a bool tensor of the variable's shape (a trainable-mask) or a
    scalar (keep all or set all back, the non-finite guard).
    """
    on_every_copy(variable, lambda v, k, o: v.assign(tf.where(k, v, o)), keep, other)


def _dense(grad):
    return tf.convert_to_tensor(grad) if isinstance(grad, tf.IndexedSlices) else grad


def mask_gradient(grad, trainable: Optional[tf.Tensor]):
    """``grad`` with every frozen element exactly 0, in the variable's shape: the one gradient mask.

    Args:
      grad: a dense gradient of the variable's shape, or a ``tf.IndexedSlices``
        (its rows are masked by the rows of ``trainable``; it stays sparse).
      trainable: a bool tensor of the variable's shape (``True`` = may
        change), or ``None`` when every element is frozen (all zeros).

    Returns:
      A tensor (or ``tf.IndexedSlices``) of ``grad``'s structure, shape and dtype.
    """
    if isinstance(grad, tf.IndexedSlices):
        zeros = tf.zeros_like(grad.values)
        values = zeros if trainable is None else tf.where(tf.gather(trainable, grad.indices), grad.values, zeros)
        return tf.IndexedSlices(values, grad.indices, grad.dense_shape)
    return tf.zeros_like(grad) if trainable is None else tf.where(trainable, grad, tf.zeros_like(grad))


class DenseUpdate:
    """Masked gradients, the optimizer on the whole variable, frozen elements restored.

    Args:
      variable: the model's ``keras.Variable``.
      trainable: bool array of its shape, ``True`` = may change.
      name: a name for the mask variable.
    """

    mode = "dense"

    def __init__(self, variable: keras.Variable, mask: tf.Variable):
        self.variable = variable
        self.mask = mask

    @classmethod
    def create(cls, *, variable: keras.Variable, trainable: np.ndarray, name: str) -> "DenseUpdate":
        """A new update with its mask variable (``tf.bool``, the variable's shape)."""
        return cls(variable, tf.Variable(trainable, trainable=False, name=name, dtype=tf.bool))

    @property
    def optimizer_variable(self) -> keras.Variable:
        return self.variable

    def set_trainable(self, trainable: np.ndarray) -> None:
        """Replaces the trainable-mask (same shape)."""
        self.mask.assign(trainable)

    def trainable_mask(self) -> np.ndarray:
        return np.asarray(self.mask.numpy())

    def mask_gradient(self, grad):
        """``grad`` with frozen elements exactly 0 (see :func:`mask_gradient`)."""
        return mask_gradient(grad, self.mask)

    gradient = mask_gradient

    def hold(self):
        """The variable's value before the optimizer runs."""
        return tf.identity(self.variable.value)

    def release(self, held, keep: Optional[tf.Tensor] = None) -> None:
        """Sets every frozen element back to its value in ``held`` (every element unless ``keep``, a scalar bool)."""
        keep_where(self.variable, self.mask if keep is None else tf.logical_and(self.mask, keep), held)

    def memory_bytes(self) -> int:
        return int(np.prod(self.mask.shape, dtype=np.int64))


class CompactUpdate:
    """Gather the trainable gradients, update a compact ``[k]`` variable, scatter it back.

    Args:
      variable: the model's ``keras.Variable`` (at least one axis).
      trainable: bool array of its shape, ``True`` = may change.
      name: a name for the compact variable (unique in the registry).
    """

    mode = "compact"

    def __init__(self, variable: keras.Variable, indices: tf.Variable, compact: keras.Variable):
        self.variable = variable
        self.shape = tuple(int(d) for d in variable.shape)
        self.indices = indices
        self.compact = compact

    @classmethod
    def create(cls, *, variable: keras.Variable, trainable: Optional[np.ndarray], name: str,
               positions: Optional[np.ndarray] = None) -> "CompactUpdate":
        """A new update with its indices (int32; int64 past 2**31 elements) and compact ``[k]`` variables.

        The compact variable has the variable's dtype, float32 for a bfloat16 / float16 one. ``positions``,
        the sorted flat positions of the trainable elements, replace ``trainable`` where the caller has them.
        """
        size = int(np.prod(variable.shape, dtype=np.int64))
        dtype = np.int64 if size >= 2**31 else np.int32
        flat = np.flatnonzero(np.asarray(trainable).reshape(-1)) if positions is None else np.asarray(positions)
        flat = flat.astype(dtype)
        indices = tf.Variable(flat, trainable=False, name=name + "_indices")
        values = tf.cast(tf.gather(tf.reshape(tf.convert_to_tensor(variable.value), [-1]), flat),
                         master_dtype(variable.dtype))
        return cls(variable, indices, keras.Variable(initializer=values.numpy(), dtype=master_dtype(variable.dtype),
                                                     trainable=True, name=name))

    @property
    def optimizer_variable(self) -> keras.Variable:
        return self.compact

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def trainable_mask(self) -> np.ndarray:
        mask = np.zeros(self.size, bool)
        mask[self.indices.numpy()] = True
        return mask.reshape(self.shape)

    def dense_mask(self) -> tf.Tensor:
        """The trainable-mask as a bool tensor of the variable's shape, built on the device from the indices."""
        k = tf.shape(self.indices)[0]
        flat = tf.scatter_nd(tf.expand_dims(self.indices, 1), tf.ones([k], tf.bool), [self.size])
        return tf.reshape(flat, self.shape)

    def move(self, trainable: tf.Tensor, changed: tf.Tensor, slots) -> None:
        """Moves the ``k`` trainable elements to ``trainable`` (same count), carrying their optimizer slots.

        A slot entry follows its element to the element's new position among
        the ``k``; elements in ``changed`` (newly trainable ones among them)
        get 0. The compact values are read from the model variable, which
        must already hold the new values (float32 masters of elements that
        stay trainable and unwritten are kept). Usable inside a ``tf.function``.

        Args:
          trainable: bool tensor of the variable's shape with exactly ``k`` True.
          changed: bool tensor of the variable's shape: elements that changed state.
          slots: the ``[k]`` optimizer slots of :attr:`compact`.
        """
        old = tf.expand_dims(self.indices, 1)
        new = tf.cast(tf.reshape(tf.where(tf.reshape(trainable, [-1])), [-1]), self.indices.dtype)
        new = tf.ensure_shape(new, self.indices.shape)
        keep = tf.logical_not(tf.reshape(changed, [-1]))
        for slot in slots:
            dense = tf.scatter_nd(old, tf.convert_to_tensor(slot), [self.size])
            slot.assign(tf.gather(tf.where(keep, dense, tf.zeros_like(dense)), new))
        values = self._read(new)
        if self.compact.dtype != self.variable.dtype:  # float32 masters
            values = refreshed(tf.gather(tf.scatter_nd(old, self.compact.value, [self.size]), new), values)
        self.indices.assign(new)
        self.compact.assign(values)

    def mask_gradient(self, grad):
        """``grad`` with frozen elements exactly 0, in the variable's shape (see :func:`mask_gradient`)."""
        return mask_gradient(grad, self.dense_mask())

    def gradient(self, grad):
        """The gradients of the trainable elements, ``[k]`` (an Embedding's IndexedSlices is made dense first)."""
        return tf.cast(tf.gather(tf.reshape(_dense(grad), [-1]), self.indices), self.compact.dtype)

    def _read(self, indices=None) -> tf.Tensor:
        flat = tf.reshape(tf.convert_to_tensor(self.variable.value), [-1])
        return tf.gather(flat, self.indices if indices is None else indices)

    def sync(self) -> None:
        """Reads the trainable elements of the model variable into the compact variable.

        Float32 masters are kept where the variable holds them rounded (see
        :func:`trainer.masks.precision.refreshed`).
        """
        self.compact.assign(refreshed(tf.convert_to_tensor(self.compact.value), self._read()))

    def hold(self) -> None:
        return None

    def release(self, held: Any = None, keep: Optional[tf.Tensor] = None) -> None:
        """Writes the compact values into the model variable's trainable elements, in place.

        ``keep`` is ignored: when a step is undone, the compact variable is
        selected back before this runs, and writing it back changes nothing.
        Under :func:`~trainer.masks.writeback.deferred` (the XLA step) nothing
        is written here: :func:`trainer.step.write_back` writes after the step.
        """
        if not is_deferred():
            on_every_copy(self.variable, scatter_flat, self.indices, tf.cast(self.compact.value, self.variable.dtype),
                          self.shape)

    def memory_bytes(self) -> int:
        k = int(self.indices.shape[0])
        return k * (self.indices.dtype.size + np.dtype(self.compact.dtype).itemsize)


class PinUpdate(DenseUpdate):
    """A non-trainable variable held at its pins (``non_trainable: pin``, e.g. BatchNorm moving statistics).

    The forward pass, not the optimizer, writes such a variable, so its pins
    are kept (it is small) and written back after every step.

    Args:
      variable: the model's non-trainable ``keras.Variable``.
      trainable: bool array of its shape, ``True`` = may change.
      name: a name for the mask and pins variables.
    """

    mode = "pinned"

    def __init__(self, variable: keras.Variable, mask: tf.Variable, pins: tf.Variable):
        super().__init__(variable, mask)
        self.pins = pins

    @classmethod
    def create(cls, *, variable: keras.Variable, trainable: np.ndarray, name: str) -> "PinUpdate":
        """A new update with its mask and pins (the variable's value now) variables."""
        dense = DenseUpdate.create(variable=variable, trainable=trainable, name=name)
        return cls(variable, dense.mask, tf.Variable(variable.value, trainable=False, name=name + "_pins"))

    def set_trainable(self, trainable: np.ndarray) -> None:
        super().set_trainable(trainable)
        self.pins.assign(self.variable.value)

    def restore(self) -> None:
        """Writes the pins into every frozen element."""
        keep_where(self.variable, self.mask, self.pins)

    def memory_bytes(self) -> int:
        return super().memory_bytes() * (1 + self.pins.dtype.size)


def make_update(mode: str, *, variable: keras.Variable, trainable: Optional[np.ndarray], name: str,
                positions: Optional[np.ndarray] = None):
    """A :class:`DenseUpdate`, :class:`CompactUpdate` or :class:`PinUpdate` (``mode="pinned"``).

    ``positions`` (compact only; ignored otherwise): the sorted flat positions of the trainable elements, read in
    place of ``trainable`` (:meth:`CompactUpdate.create`).
    """
    if mode == "compact":
        return CompactUpdate.create(variable=variable, trainable=trainable, name=name, positions=positions)
    return {"dense": DenseUpdate, "pinned": PinUpdate}[mode].create(variable=variable, trainable=trainable, name=name)


def choose_mode(requested: str, *, trainable_fraction: float, dynamic: bool, rank: int,
                crossover: float) -> str:
    """The update of one variable: ``requested`` unless ``"auto"``.

    ``auto`` picks compact when at most ``crossover`` of the elements train and
    the mask never changes (dense where masks change), dense otherwise; a
    scalar is always dense.
    """
    if rank == 0:
        return "dense"
    if requested != "auto":
        return requested
    return "compact" if trainable_fraction <= crossover and not dynamic else "dense"



Lookup = Callable[[str], Tuple[Any, bool]]  # variable path -> (its update or None, frozen entirely)


def step_gradients(grads: Sequence[Any], variables: Sequence[keras.Variable], lookup: Lookup, *,
                   gathered: bool) -> List[Any]:
    """The gradients of ``variables`` with every frozen element exactly 0: one loop for both forms.

    Args:
      grads: one gradient per variable: a dense tensor of the variable's
        shape, a ``tf.IndexedSlices`` or ``None``.
      variables: the model variables, in the same order.
      lookup: ``variable path -> (update or None, frozen entirely)``.
      gathered: ``False``: masked, in the variables' shapes
        (``MaskRegistry.mask_gradients``); ``True``: what each update's
        :attr:`optimizer_variable` takes, ``[k]`` for compact updates
        (``MaskRegistry.update_gradients``).

    Returns:
      A list of the same length; gradients of uncovered variables (and
      ``None``) are passed through unchanged.
    """
    out = []
    for grad, variable in zip(grads, variables):
        update, full = lookup(variable.path)
        if grad is None or (update is None and not full):
            out.append(grad)
        elif full:
            out.append(mask_gradient(grad, None))
        else:
            out.append(update.gradient(grad) if gathered else update.mask_gradient(grad))
    return out


def apply_updates(optimizer: keras.optimizers.Optimizer, grads: Sequence[Any], variables: Sequence[keras.Variable],
                  lookup: Lookup, pinned: Sequence["PinUpdate"], apply_if: Optional[tf.Tensor] = None) -> None:
    """One optimizer update of the gradients of :func:`step_gradients` (``gathered=True``).

    Each update holds what it needs before ``optimizer.apply_gradients`` and
    releases it after (dense: frozen elements restored; compact: the ``[k]``
    values scattered into the model variable); then every ``pinned`` update
    writes its pins back (the forward pass moves them). With ``apply_if`` (a
    scalar bool tensor), every variable the optimizer writes (compact ``[k]``
    variables, uncovered variables, slots, ``iterations``) is selected back to
    its value before the update where it is ``False``, before the compact
    values are scattered.

    Args:
      optimizer: a built optimizer when ``apply_if`` is given.
      grads: one per variable, from :func:`step_gradients`.
      variables: the model variables, in the same order.
      lookup: ``variable path -> (update or None, frozen entirely)``.
      pinned: the :class:`PinUpdate` of every pinned non-trainable variable.
      apply_if: ``None`` or a scalar bool tensor.
    """
    pairs, held, selected = [], [], []
    for grad, variable in zip(grads, variables):
        update, _ = lookup(variable.path)
        target = update.optimizer_variable if update is not None else variable
        pairs.append((grad, target))
        held.append((update, update.hold()) if update is not None and grad is not None else None)
        if apply_if is not None and grad is not None and (update is None or update.mode != "dense"):
            selected.append(target)  # a dense update's release restores it from what it holds
    if apply_if is not None:
        selected += optimizer.variables  # slots, iterations (the optimizer's own variables)
        before = [tf.identity(v.value) for v in selected]
    optimizer.apply_gradients(pairs)
    if apply_if is not None:
        for variable, value in zip(selected, before):
            keep_where(variable, apply_if, value)
    for item in held:
        if item is not None:
            item[0].release(item[1], apply_if)
    for update in pinned:
        update.restore()  # the forward pass moved it (e.g. BatchNorm statistics)
