"""What a run prints without a terminal: one line per epoch, no Hydra prefix on our lines, the summary as one block."""

import io
import logging

from tests.inprocess import run_trainer
from trainer.logs import ConsoleFormatter
from trainer.progress import print_summary


def test_main_job_prints_at_most_40_lines_without_a_terminal(tmp_path):
    # the main job's command on the bundled digits (the same lines as on MNIST: 20 epochs, XLA, 100 steps/call), in
    # this process with its file descriptors 1 and 2 caught (a fresh process's start-up: tests/test_logs.py)
    proc = run_trainer([f"hydra.run.dir={tmp_path / 'run'}", "+experiment=sparse_mlp", "data=digits",
                        "export.keras=false"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    assert lines.count("compiling...") == 1
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [line.split(" | ")[0] for line in epochs] == [f"epoch {i}" for i in range(1, 21)]
    assert all(" | steps/sec " in line for line in epochs[1:])
    assert not any(line.startswith("[20") for line in lines)  # no Hydra [time][name][level] prefix
    assert not any(line.startswith("train | step") or line.startswith("checkpoint ") for line in lines)


def test_summary_is_one_record(caplog):
    result = {"status": "completed", "test_loss": 0.1, "test_accuracy": 0.97, "steps": 100, "epochs": 2.0,
              "wall_seconds": 12.34, "examples_per_second": 4567.8, "audit": "0 frozen elements in 0 variables"}
    with caplog.at_level(logging.INFO, logger="trainer"):
        print_summary(result, stream=io.StringIO())
    records = [r for r in caplog.records if r.getMessage().startswith("summary |")]
    assert len(records) == 1
    assert records[0].getMessage().splitlines()[0] == "summary | status: completed"


def test_console_formatter_prefixes_only_other_loggers_and_levels():
    formatter = ConsoleFormatter()
    ours = logging.LogRecord("trainer", logging.INFO, __file__, 1, "epoch 1 | step 21", None, None)
    warning = logging.LogRecord("trainer", logging.WARNING, __file__, 1, "careful", None, None)
    other = logging.LogRecord("tensorflow", logging.INFO, __file__, 1, "hello", None, None)
    assert formatter.format(ours) == "epoch 1 | step 21"
    assert formatter.format(warning) == "[trainer][WARNING] - careful"
    assert formatter.format(other) == "[tensorflow][INFO] - hello"
