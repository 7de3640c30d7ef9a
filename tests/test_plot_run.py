"""scripts/plot_run.py reads real runs' event files and writes non-empty PNGs."""

import importlib.util
import os

import matplotlib.image
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from tests.conftest import CONFIGS, REPO
from trainer.config import register
from trainer.run import run

register()


def load_script():
    spec = importlib.util.spec_from_file_location("plot_run", os.path.join(REPO, "scripts", "plot_run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two 12-step digits runs, 50 % and 90 % of every kernel pinned to zero, as jobs 0 and 1 of a sweep."""
    root = tmp_path_factory.mktemp("sweep")
    for job, fraction in (("0", 0.5), ("1", 0.9)):
        with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
            cfg = compose(config_name="config", overrides=[
                "freeze=random_90", f"freeze.rules.sparse.elements.random={fraction}", "trainer.max_steps=12",
                "trainer.epochs=1", "trainer.batch_size=100", "log.summary_every_n_steps=4",
                "log.progress=lines", "export.keras=false",
            ])
        (root / job).mkdir()
        cwd = os.getcwd()
        os.chdir(root / job)
        try:
            run(cfg)
        finally:
            os.chdir(cwd)
    return root


def test_reads_runs_through_the_event_reader(sweep):
    plot_run = load_script()
    runs = [plot_run.read_run(d) for d in plot_run.find_runs([str(sweep)])]
    assert [os.path.basename(r["dir"]) for r in runs] == ["0", "1"]
    for run_, fraction in zip(runs, (0.5, 0.9)):
        steps, values = run_["scalars"]["train"]["masks/lenet/fc1/kernel/sparsity"]
        assert list(steps) == [4, 8, 12]
        assert abs(values[-1] - fraction) <= 1 / (64 * 300)
        assert "test/accuracy" in run_["scalars"]["validation"]
        assert run_["hparams"]["data.name"] == "digits"
    assert plot_run.labels_for(runs, str(sweep)) == ["0", "1"]  # no swept hparams outside Hydra: directory names


def test_writes_non_empty_pngs(sweep, tmp_path):
    plot_run = load_script()
    written = plot_run.main([str(sweep), "--out", str(tmp_path / "plots")])
    names = sorted(os.path.basename(p) for p in written)
    assert names == ["accuracy_vs_sparsity.png", "curves.png", "sparsity.png"]
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0.01  # something was drawn


def test_default_output_is_beside_the_runs(sweep):
    plot_run = load_script()
    written = plot_run.main([str(sweep / "0")])
    assert written and all(os.path.dirname(p) == str(sweep / "0" / "plots") for p in written)


def test_no_run_is_an_error(tmp_path):
    plot_run = load_script()
    with pytest.raises(SystemExit, match="no run .* under"):
        plot_run.main([str(tmp_path)])


def test_a_single_run_is_labelled_train_and_validation(sweep):
    plot_run = load_script()
    runs = [plot_run.read_run(str(sweep / "0"))]
    assert plot_run.labels_for(runs, str(sweep / "0")) == [""]  # was the directory name (a timestamp under Hydra)


def test_train_curves_are_interval_means_without_epoch_jumps():
    plot_run = load_script()
    # losses 4, 2 | 6, 2 | 1, 1 per step; steps 1-2 | 3-4 | 5-6 are three epochs, logged every step
    running = [4, 3, 6, 4, 1, 1]  # the trainer's running means, restarting after steps 2 and 4
    means = plot_run.interval_means(np.arange(1, 7), np.array(running, float), [2, 4, 6])
    np.testing.assert_array_equal(means, [4, 2, 6, 2, 1, 1])
    # logged every 3 steps of 4-step epochs: the mean over steps 4-6 is recovered from the running means
    means = plot_run.interval_means(np.array([3, 6]), np.array([2.0, 3.0]), [4])
    np.testing.assert_array_equal(means, [2.0, 3.0])
    means = plot_run.interval_means(np.array([2, 4]), np.array([2.0, 3.0]), [8])
    np.testing.assert_array_equal(means, [2.0, 4.0])


def test_real_train_curve_uses_the_logged_epochs(sweep):
    plot_run = load_script()
    run_ = plot_run.read_run(str(sweep / "0"))
    steps, values = plot_run.train_series(run_, "loss")
    raw_steps, raw = run_["scalars"]["train"]["loss"]
    np.testing.assert_array_equal(steps, raw_steps)
    assert values[0] == raw[0] and np.isfinite(values).all()
