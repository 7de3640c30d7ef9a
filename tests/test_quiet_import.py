"""TensorFlow's start-up lines stay out of stderr from the moment trainer is imported, whatever the import order."""

import os
import subprocess
import sys

from tests.conftest import REPO

SCRIPT = """
import sys
{first}
sys.stderr.write("MARK\\n"); sys.stderr.flush()
import keras
import numpy as np
from trainer import Trainer
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
x, y = np.zeros((8, 4), "float32"), np.zeros((8,), "int32")
Trainer(model, "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False).fit(
    x, y, epochs=1, verbose=False)
"""


def stderr_of(first):
    env = {k: v for k, v in os.environ.items() if k not in ("TRAINER_VERBOSE", "TF_CPP_MIN_LOG_LEVEL")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(first=first)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_trainer_first_prints_nothing():
    assert stderr_of("import trainer") == "MARK\n"


def test_keras_first_prints_nothing_once_trainer_is_imported():
    # TensorFlow's own import lines come before trainer exists; the device listing's
    # "failed call to cuInit" (at the first op otherwise) is caught when trainer is imported
    assert stderr_of("import keras").split("MARK\n", 1)[1] == ""
