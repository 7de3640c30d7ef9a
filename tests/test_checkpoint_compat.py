"""A checkpoint written by an earlier version of the code restores and continues bit-exactly.

tests/compat/v0_1/ was written by ``python -m tests.compat.build`` with the code of commit 4c49d48 (before the core was split
into step, guard, controller and mask-state modules): a run's ``checkpoint_objects`` after 12 steps, and what
every variable held after a restore and 8 more steps. Any change to a checkpoint key (the registry's masks, pins,
compact values and indices, its rule state, the optimizer's slots, the loop counters) or to the arithmetic of
the step fails here. Never regenerate the fixture to make this pass: add a new one beside it. The continued steps'
last ULPs depend on the CPU's float kernels, so the old code's result is kept per machine kind
(``tests/compat/build.py`` says how one is added, always with the old code): today's result must equal one of them
bit for bit.
"""

import numpy as np
import pytest

from tests.compat.build import (CONTINUE_TO, EXPECTED_FILES, PREFIX, SAVED_AT, checkpoint, dataset, make_trainer,
                                 snapshot)


@pytest.fixture(scope="module")
def resumed():
    trainer = make_trainer()
    checkpoint(trainer).read(PREFIX).assert_consumed()  # every key in the file matched, every object restored
    trainer.registry.after_restore()
    return trainer


def test_the_old_checkpoint_restores_every_object_and_counter(resumed):
    state = resumed.state()
    assert (state.step, state.skipped_steps) == (SAVED_AT, 1)
    assert int(state.checkpoint_objects["batches_drawn"].numpy()) == SAVED_AT + 1
    assert state.examples == SAVED_AT * 64
    assert resumed.registry.exact()
    assert resumed.registry.update_modes() == {"net/fc1/kernel": "compact", "net/fc2/kernel": "dense",
                                               "net/out/kernel": "dense", "net/bn/moving_mean": "pinned"}


def test_the_old_checkpoint_continues_bit_exactly(resumed):
    resumed.fit(dataset(), epochs=1, max_steps=CONTINUE_TO, verbose=False)
    got = snapshot(resumed)
    assert len(EXPECTED_FILES) >= 2
    differences = {}
    for path in EXPECTED_FILES:  # the old code's result on each machine kind: one must match every bit
        with np.load(path) as npz:
            expected = {k.replace("|", "/"): npz[k] for k in npz.files}
        assert sorted(got) == sorted(expected), path
        assert all(got[key].dtype == value.dtype for key, value in expected.items()), path
        differences[path] = [key for key, value in expected.items() if got[key].tobytes() != value.tobytes()]
    assert min(len(keys) for keys in differences.values()) == 0, differences
    assert resumed.registry.exact()
