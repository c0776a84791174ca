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
])
def test_a_bad_config_file_is_one_line_naming_the_file_and_the_fix(tmp_path, capsys, name, text, message):
    recipe = tmp_path / name
    recipe.write_text(text)
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
