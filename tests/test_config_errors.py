"""Config mistakes: one line naming the value, one line of hint with the nearest valid name, exit code 2."""

import pytest

from tests.inprocess import run_trainer
from trainer.cli_errors import override_variants, preflight
from trainer.config import ConfigError
from trainer.logs import error_lines

TRAINER_KEYS = ("epochs, max_steps, batch_size, eval_batch_size, steps_per_execution, jit_compile, log_every_n_steps, "
                "checkpoint_every_n_steps, keep_checkpoints, deterministic, nan_policy, mixed_precision, remat, "
                "low_memory_allocator")
EXPERIMENTS = ("connectivity, continual_task_a, continual_task_b, continual_task_b_freeze, dst_lenet_rigl, "
               "dst_lenet_set, dst_lenet_sm, embedding_new_tokens, freeze_conv, kernel_only, lottery_ticket, "
               "magnitude_pruning, random_sparsity_er, rigl_mlp, set_mlp, snip_lenet_lee, snip_mlp, sparse_llm, "
               "sparse_llm_full, sparse_llm_lora, sparse_llm_pretrain, sparse_mlp, transformer_full, "
               "transformer_lora, transformer_sft, transformer_task_a, zero_indices")
FREEZE = ("batchnorm, biases, conv, first_layer, gradual_magnitude_90, head_first, kernels, magnitude_90, none, "
          "random_90")
OPTIMIZERS = "adadelta, adafactor, adagrad, adam, adamax, adamw, ftrl, lion, muon, nadam, rmsprop, sgd"
TEXT_HINT = ("data=text reads the standard library's sources by default; data.path takes a text file or a directory, "
             "data.tokenizer a tokenizer preset directory (or null for bytes)")
LR_HINT = "a typical Adam learning rate is 1e-3 (SGD: 0.01 to 0.1), e.g. optimizer.learning_rate=0.001"

CASES = {
    "typo in a structured key": (
        ["trainer.epoch=5"], "trainer.epoch is not a config key",
        f"did you mean trainer.epochs? valid keys of trainer: {TRAINER_KEYS}"),
    "appended key a structured group lacks": (
        ["+trainer.epoch=5"], "trainer.epoch is not a config key",
        f"did you mean trainer.epochs? valid keys of trainer: {TRAINER_KEYS}"),
    "unknown experiment": (
        ["+experiment=sparse_mpl"], "experiment=sparse_mpl: there is no experiment option 'sparse_mpl'",
        f"did you mean experiment=sparse_mlp? valid experiment options: {EXPERIMENTS}"),
    "unknown freeze preset": (
        ["freeze=random90"], "freeze=random90: there is no freeze option 'random90'",
        f"did you mean freeze=random_90? valid freeze options: {FREEZE}"),
    "unknown preset in a list": (
        ["freeze=[random_90,biasez]"], "freeze=biasez: there is no freeze option 'biasez'",
        f"did you mean freeze=biases? valid freeze options: {FREEZE}"),
    "wrong type": (
        ["trainer.epochs=abc"], "trainer.epochs=abc: Value 'abc' of type 'str' could not be converted to Integer",
        "trainer.epochs takes a value like its default, trainer.epochs=10"),
    "typo in a group key": (
        ["optimizer.learnig_rate=0.1"], "optimizer.learnig_rate is not a config key",
        "did you mean optimizer.learning_rate? valid keys of optimizer: name, learning_rate, schedule, options"),
    "appended optimizer key": (
        ["+optimizer.foo=1"], "optimizer.foo is not a config key",
        "no close match; valid keys of optimizer: name, learning_rate, schedule, options"),
    "optimizer name": (
        ["optimizer.name=adamm"], "optimizer.name='adamm' is not a Keras optimizer",
        f"did you mean optimizer.name=adam? valid names: {OPTIMIZERS}"),
    "negative learning rate": (
        ["+experiment=sparse_mlp", "optimizer.learning_rate=-0.01"],
        "optimizer.learning_rate must be a finite number > 0, got -0.01", LR_HINT),
    "zero learning rate": (
        ["optimizer.learning_rate=0"], "optimizer.learning_rate must be a finite number > 0, got 0", LR_HINT),
    "momentum out of range": (
        ["optimizer=sgd", "optimizer.options.momentum=1.5"], "optimizer.options.momentum must be in [0, 1), got 1.5",
        "optimizer.options.momentum is passed to keras.optimizers.sgd; set a value in [0, 1)"),
    "text data path that does not exist": (
        ["data=text", "model=causal_lm", "data.path=/no/such/corpus"],
        "data.path='/no/such/corpus' is neither a file nor a directory; pass a text file, a directory of text files, "
        "or null for the standard library's sources", TEXT_HINT),
    "text sequence too short": (
        ["data=text", "model=causal_lm", "data.sequence_length=1"],
        "data.sequence_length must be an integer >= 2, got 1", TEXT_HINT),
    "text fractions that leave no training data": (
        ["data=text", "model=causal_lm", "data.validation_fraction=0.5", "data.test_fraction=0.5"],
        "data.validation_fraction + data.test_fraction must be < 1, got 0.5 + 0.5", TEXT_HINT),
    "tokenizer preset that is not a directory": (
        ["data=text", "model=causal_lm", "data.tokenizer=gemma_2b_en"],
        "data.tokenizer='gemma_2b_en' is not a local tokenizer preset directory; presets cannot be downloaded here: "
        "pass the path of a directory saved with tokenizer.save_to_preset(dir) (holding tokenizer.json), or null for "
        "bytes", TEXT_HINT),
    "a key of another data set": (
        ["data=text", "+data.classes=[1,2]"], "data.classes is not a config key",
        "no close match; valid keys of data: name, path, include, exclude, sequence_length, max_bytes, "
        "validation_fraction, test_fraction, tokenizer"),
    "model preset name": (
        ["data=text", "model=causal_lm", "model.preset=llama2_7b_en"],
        "model.preset='llama2_7b_en' is not a local directory; presets cannot be downloaded here: pass the path of a "
        "preset directory (saved with save_to_preset(dir), holding config.json)",
        "model.preset takes a directory written by backbone.save_to_preset(dir); null builds from model.backbone"),
    "remat without transformer blocks": (
        ["trainer.remat=true"], "trainer.remat=true needs transformer blocks to recompute: model=mlp has none",
        "use model=causal_lm (a keras-hub decoder), or set trainer.remat=false"),
    "a swept value": (
        ["optimizer.learning_rate=0.1,-1"], "optimizer.learning_rate must be a finite number > 0, got -1", LR_HINT),
}


@pytest.mark.parametrize("name", list(CASES))
def test_config_mistake_is_one_line_with_nearest_name(name):
    overrides, message, hint = CASES[name]
    with pytest.raises(ConfigError) as info:
        preflight(overrides)
    assert error_lines(info.value) == f"Error: ConfigError: {message}\nHint: {hint}"


def test_valid_command_lines_pass():
    preflight(["+experiment=sparse_mlp", "freeze=[random_90,biases]", "trainer.epochs=2"])
    preflight(["-m", "seed=0,1", "optimizer.learning_rate=interval(0.0001,0.01)"])


def test_sweeps_try_every_value_once():
    assert override_variants(["seed=0,1", "trainer.epochs=2", "optimizer.learning_rate=interval(0.1,1)"]) == [
        ["seed=0", "trainer.epochs=2"], ["seed=1", "trainer.epochs=2"]]


@pytest.mark.parametrize("args,first", [
    (["trainer.epoch=5"], "Error: ConfigError: trainer.epoch is not a config key"),
    (["+experiment=sparse_mlp", "optimizer.learning_rate=-0.01"],
     "Error: ConfigError: optimizer.learning_rate must be a finite number > 0, got -0.01"),
])
def test_cli_refuses_with_exit_code_2_and_no_run_directory(tmp_path, args, first):
    run_dir = tmp_path / "run"
    proc = run_trainer([f"hydra.run.dir={run_dir}", *args])  # python -m trainer, in this process
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[0] == first
    assert proc.stderr.splitlines()[1].startswith("Hint: ")
    assert len(proc.stderr.splitlines()) == 2 and proc.stdout == ""
    assert not run_dir.exists()



def test_a_run_directory_that_is_a_file_is_refused_and_the_file_kept(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("keep")
    with pytest.raises(ConfigError) as info:
        preflight([f"hydra.run.dir={path}", "trainer.max_steps=2"])
    assert error_lines(info.value) == (f"Error: ConfigError: hydra.run.dir={str(path)!r} is a file, not a directory\n"
                                       "Hint: pass a new directory, or the directory of a run to resume")
    assert path.read_text() == "keep"


def test_a_refused_run_keeps_directories_that_existed_before(tmp_path, monkeypatch):
    from trainer.logs import remember_existing_dirs, remove_made_empty_dirs

    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    monkeypatch.setattr("trainer.logs.EXISTING_DIRS", set())  # a fresh process's record
    remember_existing_dirs([f"hydra.run.dir={mine / 'a' / 'b'}", "trainer.epochs=1"])
    (mine / "a" / "b").mkdir(parents=True)  # what Hydra makes
    assert remove_made_empty_dirs(str(mine / "a" / "b")) == [str(mine / "a" / "b"), str(mine / "a")]
    assert mine.is_dir()  # it existed before the run
    (mine / "a").mkdir()
    (mine / "a" / "notes").write_text("keep")
    assert remove_made_empty_dirs(str(mine / "a")) == []  # not empty
