"""Shared fixtures. MNIST tests read $TRAINER_DATA_DIR/mnist.npz (CI points it at the real data).

The suite runs in pytest-xdist workers (``-n auto`` in pyproject.toml): every test must be independent
of the others (its own tmp_path, no fixed ports, no state left in the process). Each test is a unit of
work of its own, slow ones first, except in ONE_WORKER_MODULES: the tests of such a module share one
expensive module-scoped run, so they all go to one worker, which makes that run once.
"""

import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One thread per TensorFlow op (each xdist worker, and each process a test starts, inherits this): the workers
# already keep every CPU busy, and ops that split themselves over threads on a busy machine mostly wait.
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


MAX_WORKERS = 4  # each worker imports TensorFlow (about 1.5 GB) and many tests start CLI subprocesses of their own


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per CPU this process may run on, at most MAX_WORKERS."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cpus))


# Modules whose tests share an expensive module-scoped fixture (a training run they read or copy). Split
# over workers, or interleaved with other modules' tests in one worker, that fixture would be made again
# each time (pytest tears a module's fixtures down when the next test is from another module).
ONE_WORKER_MODULES = {"tests/test_rundir.py", "tests/test_summaries.py", "tests/test_plot_run.py"}


def pytest_xdist_make_scheduler(config, log):
    """Units of work: one test each, or a whole module of ONE_WORKER_MODULES (largest units first).

    xdist's own ``--dist loadgroup`` would do this with ``xdist_group`` marks, but pytest-xdist 3.8 renames
    the grouped tests through ``item._nodeid``, which pytest 9 no longer reads, so its groups are ignored.
    """
    from xdist.scheduler import LoadScopeScheduling

    class Scheduler(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            module = nodeid.split("::", 1)[0]
            return module if module in ONE_WORKER_MODULES else nodeid

    return Scheduler(config, log)


def pytest_collection_modifyitems(config, items):
    """Slow tests first (a stable sort): the longest work starts early and the workers finish together."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


# Garbage is collected at the end of each test, and what is still alive then is frozen (``gc.freeze``: never
# examined again). A tf.data iterator freed by the collector waits, in its destructor and holding the GIL, for
# its autotuning thread (blocks of 3-10 s were seen in a debugger): collected by Python's own schedule, long after
# their test, such iterators stopped the workers for seconds at a time, 563 s of full collections in one full
# run, 122 s with this hook. Freezing the survivors keeps each collection to the last
# test's objects.


def pytest_sessionstart(session):
    gc.collect()
    gc.freeze()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After the test's fixtures are torn down (and its module's, when the next test is from another)."""
    try:
        return (yield)
    finally:
        gc.collect()
        gc.freeze()


@pytest.fixture
def mnist_dir():
    """The directory holding mnist.npz, from $TRAINER_DATA_DIR."""
    directory = os.environ.get("TRAINER_DATA_DIR")
    if not directory or not os.path.isfile(os.path.join(directory, "mnist.npz")):
        pytest.skip("set TRAINER_DATA_DIR to a directory with mnist.npz to run MNIST tests")
    return directory


@pytest.fixture(autouse=True)
def _clear_hydra():
    yield
    GlobalHydra.instance().clear()


@pytest.fixture
def seeded():
    keras.utils.set_random_seed(1234)
    return np.random.default_rng(1234)
