"""The input gradient of a sampled einsum: as the einsum computes it, and without a copy of the kernel under XLA."""

import re

import numpy as np
import pytest
import tensorflow as tf

from trainer.masks.sampled import Equation, input_gradient

CASES = {  # equation: (x shape, kernel shape)
    "bqm,muh->bquh": ((2, 5, 24), (24, 4, 6)),     # a keras-hub query/key/value projection: [R, C]
    "bquh,uhm->bqm": ((2, 5, 4, 6), (4, 6, 24)),    # its output projection: [R, C] over two contracted axes
    "btd,de->bte": ((2, 5, 24), (24, 7)),           # Dense: a matrix already
    "btd,hd->bth": ((2, 5, 24), (7, 24)),           # outputs first: [C, R]
    "btd,ndh->btnh": ((2, 5, 24), (4, 24, 6)),      # interleaved axes: the einsum itself
    "tbd,dn->btn": ((5, 2, 24), (24, 7)),           # token axes of x in another order than in the output
}


@pytest.mark.parametrize("text", sorted(CASES))
def test_input_gradient_equals_the_einsum_of_the_backward_equation(text):
    equation = Equation(text)
    x_shape, k_shape = CASES[text]
    rng = np.random.default_rng(0)
    kernel = tf.constant(rng.normal(size=k_shape), tf.float32)
    x = tf.constant(rng.normal(size=x_shape), tf.float32)
    dy = tf.constant(rng.normal(size=tf.einsum(text, x, kernel).shape), tf.float32)
    expected = tf.einsum(equation.backward, dy, kernel).numpy()
    got = input_gradient(equation, dy, kernel, tf.shape(x)).numpy()
    assert got.shape == x_shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def kernel_sized_moves(hlo: str, elements: int):
    """Instructions of an optimized HLO module that make a copy or transpose with ``elements`` float32 elements."""
    moves = []
    for line in hlo.splitlines():
        match = re.search(r"= f32\[([0-9,]+)\]\S* (copy|transpose|fusion)\(", line)
        if match and int(np.prod([int(d) for d in match.group(1).split(",")])) == elements:
            if match.group(2) != "fusion" or "copy" in line.split("=")[0] or "transpose" in line.split("=")[0]:
                moves.append(line.strip()[:120])
    return moves


@pytest.mark.parametrize("text", ["bqm,muh->bquh", "bquh,uhm->bqm"])
def test_under_xla_the_input_gradient_makes_no_copy_of_the_kernel(text):
    # The einsum of a rank-3 kernel that contracts its minor axes became a transposed copy of the whole kernel
    # in XLA's CPU program (one kernel-sized buffer per attention projection per step); the matrix product
    # with transpose_b reads the kernel in place.
    equation = Equation(text)
    x_shape, k_shape = CASES[text]
    rng = np.random.default_rng(0)
    kernel = tf.Variable(rng.normal(size=k_shape).astype(np.float32))
    x = tf.constant(rng.normal(size=x_shape), tf.float32)
    dy = tf.constant(rng.normal(size=tf.einsum(text, x, kernel).shape), tf.float32)
    elements = int(np.prod(k_shape))

    def ours(dy):
        return input_gradient(equation, dy, tf.convert_to_tensor(kernel), tf.shape(x))

    def plain(dy):
        return tf.einsum(equation.backward, dy, tf.convert_to_tensor(kernel))

    compiled = {f.__name__: tf.function(f, jit_compile=True) for f in (ours, plain)}
    hlo = {name: f.experimental_get_compiler_ir(dy)(stage="optimized_hlo") for name, f in compiled.items()}
    assert kernel_sized_moves(hlo["plain"], elements), "the einsum no longer copies the kernel: test is moot"
    assert kernel_sized_moves(hlo["ours"], elements) == []
    np.testing.assert_allclose(compiled["ours"](dy).numpy(), compiled["plain"](dy).numpy(), rtol=1e-5, atol=1e-5)
