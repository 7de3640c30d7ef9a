"""TensorBoard's Custom Scalars layout of a run: the freezing view first.

TensorBoard's Scalars and Time Series tabs sort groups by name, so ``masks/*``
comes after ``accuracy``, ``epoch``, ``examples_per_second``...; the Custom
Scalars tab shows this layout instead, in this order:

1. ``freezing``: ``frozen_drift`` and ``sparsity`` of the variables that some
   rule freezes (not the constant statistics of the others), then
   ``model/sparsity`` and ``model/frozen_fraction``;
2. ``training``: loss and accuracy (train and validation), learning rate,
   gradient norm.
"""

from __future__ import annotations

import re
from typing import Sequence

import tensorflow as tf
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import summary as custom_scalar

__all__ = ["FREEZING", "freezing_layout", "write_layout"]

FREEZING = "freezing"


def _chart(title: str, *regexes: str) -> layout_pb2.Chart:
    return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=list(regexes)))


def freezing_layout(covered_paths: Sequence[str]) -> layout_pb2.Layout:
    """The layout: ``freezing`` first, its mask charts restricted to ``covered_paths`` (variables with a rule).

    Args:
      covered_paths: :meth:`trainer.masks.MaskRegistry.covered_paths`; empty:
        the freezing category holds the model-wide charts only.
    """
    charts = []
    if covered_paths:
        alternatives = "|".join(re.escape(path) for path in covered_paths)
        charts += [_chart("frozen drift (must stay 0)", rf"^masks/({alternatives})/frozen_drift$"),
                   _chart("sparsity", rf"^masks/({alternatives})/sparsity$"),
                   _chart("frozen fraction", rf"^masks/({alternatives})/frozen_fraction$")]
    charts.append(_chart("model", r"^model/(sparsity|frozen_fraction)$"))
    training = [_chart("loss", r"^loss$"), _chart("accuracy", r"^accuracy$"),
                _chart("learning rate", r"^learning_rate$"), _chart("gradient norm", r"^gradient_norm$")]
    return layout_pb2.Layout(category=[layout_pb2.Category(title=FREEZING, chart=charts),
                                       layout_pb2.Category(title="training", chart=training)])


def write_layout(writer, covered_paths: Sequence[str]) -> None:
    """Writes :func:`freezing_layout` once into ``writer``'s run (TensorBoard reads it from any run)."""
    with writer.as_default():
        tf.summary.experimental.write_raw_pb(custom_scalar.pb(freezing_layout(covered_paths)).SerializeToString(),
                                             step=0)
