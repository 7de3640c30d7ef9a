"""Fuzz: random selector specs on random shapes either freeze exactly what they say or raise FreezeConfigError."""

import keras
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.masks import FreezeConfigError, MaskRegistry


class Holder(keras.layers.Layer):
    """A layer owning one variable of any shape."""

    def __init__(self, shape, values, **kwargs):
        super().__init__(**kwargs)
        self.w = self.add_weight(shape=shape, initializer="zeros", name="w")
        self.w.assign(values)

    def call(self, x):
        return x


def make_model(shape, values):
    holder = Holder(shape, values, name="holder")
    model = keras.Sequential([keras.Input((1,)), holder], name="fuzz")
    return model, holder.w


shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)
slice_part = st.one_of(
    st.integers(-6, 6),
    st.tuples(st.one_of(st.none(), st.integers(-6, 6)), st.one_of(st.none(), st.integers(-6, 6)),
              st.one_of(st.none(), st.sampled_from([1, 2, -1, 3]))),
)


def render(part):
    if isinstance(part, int):
        return str(part)
    start, stop, step = part
    text = f"{'' if start is None else start}:{'' if stop is None else stop}"
    return text + (f":{step}" if step is not None else "")


def as_index(part):
    return part if isinstance(part, int) else slice(*part)


@st.composite
def cases(draw):
    shape = draw(shapes)
    size = int(np.prod(shape))
    kind = draw(st.sampled_from(["all", "indices", "multi", "slice", "mask", "random", "magnitude",
                                 "threshold", "units", "inputs", "rows", "unknown", "bad_fraction"]))
    if kind == "all":
        spec = "all"
    elif kind == "indices":
        spec = {"indices": draw(st.lists(st.integers(-2, size + 2), max_size=6))}
    elif kind == "multi":
        dims = draw(st.integers(1, 3))
        spec = {"indices": draw(st.lists(st.lists(st.integers(-1, 6), min_size=dims, max_size=dims), min_size=1,
                                         max_size=4))}
    elif kind == "slice":
        parts = draw(st.lists(slice_part, min_size=1, max_size=3))
        spec = {"slice": "[" + ", ".join(render(p) for p in parts) + "]", "_parts": parts}
    elif kind == "mask":
        mshape = draw(st.one_of(st.just(shape), shapes))
        spec = {"mask": np.asarray(draw(st.lists(st.integers(0, 1), min_size=int(np.prod(mshape)),
                                                 max_size=int(np.prod(mshape))))).reshape(mshape).tolist()}
    elif kind == "random":
        spec = {"random": draw(st.floats(0, 1)), "seed": draw(st.integers(0, 100))}
    elif kind == "magnitude":
        spec = {"magnitude": draw(st.floats(0, 1))}
    elif kind == "threshold":
        spec = {"magnitude_threshold": draw(st.floats(0, 2))}
    elif kind in ("units", "inputs", "rows"):
        spec = {kind: draw(st.lists(st.integers(-7, 7), max_size=3))}
    elif kind == "unknown":
        spec = {"nonsense": 1}
    else:
        spec = {"random": draw(st.sampled_from([-0.1, 1.5, float("nan")]))}
    if isinstance(spec, dict) and kind not in ("unknown",) and draw(st.booleans()):
        spec["invert"] = True
    values = np.asarray(draw(st.permutations(list(range(size))))).reshape(shape).astype(np.float32) - size / 2
    return shape, spec, values


def expected_frozen(shape, spec, values):
    """An independent oracle: the frozen mask, or None when the spec must be refused."""
    size = int(np.prod(shape))
    if spec == "all":
        return np.ones(shape, bool)
    invert = spec.get("invert", False)
    frozen = np.zeros(shape, bool)
    if "indices" in spec:
        idx = spec["indices"]
        if idx and isinstance(idx[0], list):
            if any(len(i) != len(shape) or any(not 0 <= c < n for c, n in zip(i, shape)) for i in idx):
                return None
            for i in idx:
                frozen[tuple(i)] = True
        else:
            if any(not 0 <= i < size for i in idx):
                return None
            frozen.reshape(-1)[idx] = True
    elif "slice" in spec:
        try:
            frozen[tuple(as_index(p) for p in spec["_parts"])] = True
        except (IndexError, ValueError):
            return None
        if not frozen.any():
            return None  # a slice that selects nothing is refused
    elif "mask" in spec:
        mask = np.asarray(spec["mask"])
        if mask.shape != shape:
            return None
        frozen = mask == 0
    elif "random" in spec:
        f = spec["random"]
        if not 0 <= f <= 1:
            return None
        frozen = None  # checked by count below
    elif "magnitude" in spec:
        k = int(round(spec["magnitude"] * size))
        order = np.argsort(np.abs(values).reshape(-1), kind="stable")
        frozen.reshape(-1)[order[:k]] = True
    elif "magnitude_threshold" in spec:
        frozen = np.abs(values.astype(np.float64)) < spec["magnitude_threshold"]  # |w| < t exactly, not in float32
    elif any(k in spec for k in ("units", "inputs", "rows")):
        key = next(k for k in ("units", "inputs", "rows") if k in spec)
        if key == "inputs" and len(shape) < 2:
            return None  # a vector has no input axis
        axis = {"units": len(shape) - 1, "rows": 0, "inputs": 0 if len(shape) <= 2 else len(shape) - 2}[key]
        if any(not 0 <= p < shape[axis] for p in spec[key]):  # no negative positions, as indices
            return None
        index = [slice(None)] * len(shape)
        index[axis] = spec[key]
        frozen[tuple(index)] = True
    else:
        return None
    if frozen is None:
        return "random"
    return ~frozen if invert else frozen


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_random_specs_freeze_what_they_say_or_raise_the_documented_error(case):
    shape, spec, values = case
    model, variable = make_model(shape, values)
    registry = MaskRegistry(model)
    public = spec if spec == "all" else {k: v for k, v in spec.items() if not k.startswith("_")}
    oracle = expected_frozen(shape, spec, values)
    try:
        registry.freeze("holder/w", elements=public, value="zero", name="fuzz")
    except FreezeConfigError as err:
        assert oracle is None, f"refused a valid spec {public} on {shape}: {err}"
        assert "fuzz" in str(err) or "elements" in str(err)
        assert registry.covered_paths() == []  # a refused rule leaves nothing behind
        np.testing.assert_array_equal(variable.numpy(), values)
        return
    assert oracle is not None, f"accepted an invalid spec {public} on {shape}"
    frozen = ~registry.trainable_mask(variable.path)
    if isinstance(oracle, str):  # random: the exact count, and only those elements are pinned
        count = int(round(spec["random"] * int(np.prod(shape))))
        assert int(frozen.sum()) == (int(np.prod(shape)) - count if spec.get("invert") else count)
    else:
        np.testing.assert_array_equal(frozen, oracle)
    after = variable.numpy()
    assert np.all(after[frozen] == 0.0)
    np.testing.assert_array_equal(after[~frozen], values[~frozen])
