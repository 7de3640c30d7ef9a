"""The in-memory input pipeline: every example once per epoch, a seeded order, a new order each epoch."""
import numpy as np
import pytest

from trainer.inputs import array_batches


def _epoch(ds):
    return [tuple(t.numpy() for t in batch) for batch in ds]


@pytest.fixture
def arrays():
    x = np.arange(23 * 2, dtype=np.float32).reshape(23, 2)
    y = np.arange(23, dtype=np.int64)
    return x, y


def test_each_epoch_holds_every_example_once_with_its_label(arrays):
    x, y = arrays
    ds = array_batches((x, y), 5, shuffle=True, seed=3)
    for _ in range(2):
        batches = _epoch(ds)
        assert [len(b[1]) for b in batches] == [5, 5, 5, 5, 3]
        bx = np.concatenate([b[0] for b in batches])
        by = np.concatenate([b[1] for b in batches])
        assert sorted(by.tolist()) == list(range(23))
        np.testing.assert_array_equal(bx, x[by])


def test_the_order_is_seeded_and_changes_every_epoch(arrays):
    x, y = arrays
    first = [np.concatenate([b[1] for b in _epoch(array_batches((x, y), 5, shuffle=True, seed=3))])
             for _ in range(2)]
    np.testing.assert_array_equal(first[0], first[1])
    ds = array_batches((x, y), 5, shuffle=True, seed=3)
    e1, e2 = (np.concatenate([b[1] for b in _epoch(ds)]) for _ in range(2))
    np.testing.assert_array_equal(e1, first[0])
    assert not np.array_equal(e1, e2)


def test_unshuffled_keeps_the_order_and_drop_remainder_drops_the_partial_batch(arrays):
    x, y = arrays
    batches = _epoch(array_batches((x, y), 5, shuffle=False, seed=None, drop_remainder=True))
    assert [b[1].tolist() for b in batches] == [list(range(i, i + 5)) for i in range(0, 20, 5)]
    assert int(array_batches((x, y), 5, shuffle=False, seed=None).cardinality()) == 5


def test_one_array_gives_batches_not_tuples(arrays):
    x, _ = arrays
    batches = list(array_batches((x,), 10, shuffle=False, seed=None))
    np.testing.assert_array_equal(batches[0].numpy(), x[:10])
