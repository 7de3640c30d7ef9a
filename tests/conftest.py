"""Shared fixtures. MNIST tests read $TRAINER_DATA_DIR/mnist.npz (CI points it at the real data)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


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
