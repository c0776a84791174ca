"""--config FILE (YAML or TOML) for train.py: keys are flag names, the command line wins, bad keys are one line."""

from dataclasses import asdict

import pytest

import train

REQUIRED = ["--data-path", "d.jsonl", "--model-name-or-path", "m", "--output-dir", "o", "--batch-size", "4",
            "--max-tokens-per-gpu", "64"]


def test_yaml_keys_with_dashes_or_underscores_set_flags_and_the_command_line_wins(tmp_path):
    recipe = tmp_path / "run.yaml"
    recipe.write_text("data-path: data.jsonl\nmodel_name_or_path: model\noutput-dir: out\nbatch_size: 8\n"
                      "max-tokens-per-gpu: 512\nlearning-rate: 2\nactivation_checkpointing: false\n"
                      "use-liger-kernels: true\nmax_steps: 10\n")
    config = train.parse_args(["--config", str(recipe), "--batch-size", "16", "--activation-checkpointing"])
    assert (config.data_path, config.model_name_or_path, config.output_dir) == (["data.jsonl"], "model", "out")
    assert (config.batch_size, config.max_tokens_per_gpu, config.max_steps) == (16, 512, 10)  # CLI over file
    assert config.learning_rate == 2.0 and isinstance(config.learning_rate, float)  # an int where a float goes
    assert config.activation_checkpointing is True and config.use_liger_kernels is True
    assert asdict(config) == asdict(train.parse_args([f"--config={recipe}", "--batch-size=16",
                                                      "--activation-checkpointing"]))
    untouched = train.parse_args(REQUIRED)
    assert untouched.learning_rate == train.TrainConfig.learning_rate and untouched.activation_checkpointing is None


def test_toml_config_equals_the_same_flags_on_the_command_line(tmp_path):
    recipe = tmp_path / "run.toml"
    recipe.write_text('data_path = "d.jsonl"\nmodel-name-or-path = "m"\noutput_dir = "o"\nbatch-size = 4\n'
                      'max_tokens_per_gpu = 64\nlr-scheduler = "cosine"\nmax-epochs = 2\nweight_decay = 0.1\n'
                      'tracker = "tensorboard"\n')
    from_file = train.parse_args(["--config", str(recipe)])
    from_flags = train.parse_args([*REQUIRED, "--lr-scheduler", "cosine", "--max-epochs", "2",
                                   "--weight-decay", "0.1", "--tracker", "tensorboard"])
    assert asdict(from_file) == asdict(from_flags)


@pytest.mark.parametrize("name, text, message", [
    ("a.yaml", "learning_rat: 0.1\n", "a.yaml: unknown key 'learning_rat'; did you mean 'learning-rate'?"),
    ("b.toml", "batch-size = \"big\"\n", "b.toml: 'batch-size' must be int, got 'big'; fix the value in the file"),
    ("c.yaml", "fresh: 3\n", "c.yaml: 'fresh' must be bool, got 3"),
    ("d.yaml", "seed: [1\n", "d.yaml:2: not valid YAML"),
    ("e.toml", "seed = \n", "e.toml:1: not valid TOML"),
    ("f.json", "{}", "f.json: unknown config file type '.json'; use .yaml, .yml or .toml"),
    ("g.yaml", "- 1\n- 2\n", "g.yaml: expected a mapping of flag names to values, got list"),
    # a file's values become argparse defaults, which argparse never checks against a flag's choices: checked here
    # (else an unknown scheduler trained a cosine, an unknown objective SFT, and --save-dtype fp16 failed at export)
    ("h.yaml", "lr-scheduler: cosin\n", "h.yaml: 'lr-scheduler' must be one of constant, linear, cosine, got 'cosin'"),
    ("i.toml", 'objective = "DPO"\n', "i.toml: 'objective' must be one of "),
    ("j.yaml", "save-dtype: fp16\n", "j.yaml: 'save-dtype' must be one of bfloat16, float16, float32, got 'fp16'"),
    ("k.yaml", "max-tokens-per-gpu: lots\n", "k.yaml: 'max-tokens-per-gpu' cannot be 'lots'; see --help"),
    ("l.yaml", b"# r\xe9glages\nmax-steps: 2\n", "l.yaml:1: not UTF-8 text (byte 0xe9); save the file as UTF-8"),
    # a key with no value (YAML's null) became the flag's default: --save-dtype None trained the whole run and crashed
    # at the export, learning-rate a traceback, objective null trained SFT
    ("m.yaml", "save-dtype:\n", "m.yaml: 'save-dtype' has no value; give it one or remove the line"),
    ("n.yaml", "learning-rate: null\n", "n.yaml: 'learning-rate' has no value"),
    ("o.yaml", "objective: ~\n", "o.yaml: 'objective' has no value"),
])
def test_a_bad_config_file_is_one_line_naming_the_file_and_the_fix(tmp_path, capsys, name, text, message):
    recipe = tmp_path / name
    recipe.write_bytes(text) if isinstance(text, bytes) else recipe.write_text(text)
    assert train.main(["--config", str(recipe), *REQUIRED]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"train.py: error: {tmp_path}/") and message in err and len(err.splitlines()) == 1, err


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
    assert train.main(["--config", str(tmp_path / "nope.yaml"), *REQUIRED]) == 2
    err = capsys.readouterr().err
    assert "nope.yaml: cannot read it" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("recipe", ["quickstart.yaml", "llama3-8b-8gpu.toml"])
def test_the_example_recipes_are_valid_configs(recipe):
    from pathlib import Path

    config = train.parse_args(["--config", str(Path(__file__).parent.parent / "examples" / recipe)])
    assert config.batch_size > 0 and config.max_tokens_per_gpu > 0 and not config.model_name_or_path.startswith("~")


def test_a_config_file_takes_what_the_command_line_takes(tmp_path):
    """`max-tokens-per-gpu: auto` (the flag's own type reads it), YAML's 1e-5, which YAML 1.1 reads as text, and
    null for a flag whose default is none (activation checkpointing's auto, no --max-steps)."""
    recipe = tmp_path / "run.yaml"
    recipe.write_text("max-tokens-per-gpu: auto\nlearning-rate: 1e-5\nweight-decay: 2.5E+1\n"
                      "activation-checkpointing: null\nmax-steps:\n")
    config = train.parse_args(["--config", str(recipe), *REQUIRED[:-2]])
    assert config.max_tokens_per_gpu == "auto" and config.learning_rate == 1e-5 and config.weight_decay == 25.0
    assert config.activation_checkpointing is None and config.max_steps is None


@pytest.mark.parametrize("flags, message", [
    (["--conf", "F"], "--conf: spell the flag out as --config (an abbreviated --config is not read)"),
    (["--config", "F", "--config=F"], "--config is given 2 times; give one file"),
    (["--weight-decay", "nan", "--max-grad-norm", "inf"], "--weight-decay nan, --max-grad-norm inf: must be a finite "
                                                          "number"),
])
def test_a_config_file_that_would_be_ignored_and_numbers_that_are_not_are_one_line(tmp_path, capsys, flags, message):
    """argparse takes --conf for --config and keeps the last of two; the file read would have been the first, or none
    (the run then trained silently without it). nan passes every check written as x < 0."""
    recipe = tmp_path / "run.yaml"
    recipe.write_text("max-steps: 2\n")
    argv = [str(recipe) if arg == "F" else arg.replace("=F", f"={recipe}") for arg in flags]
    assert train.main([*argv, *REQUIRED]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"train.py: error: {message}") and len(err.splitlines()) == 1, err


def test_process_data_reads_its_config_file_as_train_py_does(tmp_path, capsys):
    """The same reader: an abbreviated or second --config, and a file that is not UTF-8, are one line."""
    import process_data

    null = tmp_path / "null.yaml"
    null.write_text("seed:\n")  # process_data used its default seed
    with pytest.raises(SystemExit) as e:
        process_data.parse_args(["--config", str(null), "--input-file", "in.jsonl", "--output-file", "out.jsonl",
                                 "--model-name-or-path", "m"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip() == f"process_data.py: error: {null}: 'seed' has no value; give it one " \
        "or remove the line", err
    recipe = tmp_path / "p.yaml"
    recipe.write_bytes(b"# r\xe9glages\nnum-workers: 1\n")
    for argv, message in (([f"--conf={recipe}"], "--conf: spell the flag out as --config"),
                          (["--config", str(recipe), "--config", str(recipe)], "--config is given 2 times"),
                          (["--config", str(recipe)], f"{recipe}:1: not UTF-8 text (byte 0xe9); save the file as "
                                                      f"UTF-8")):
        with pytest.raises(SystemExit) as e:
            process_data.parse_args([*argv, "--input-file", "in.jsonl", "--output-file", "out.jsonl",
                                     "--model-name-or-path", "m"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"process_data.py: error: {message}") and err.count("\n") == 1, err
