"""hf_tlmtl.training.cli: YAML + command line on HfArgumentParser, "did you mean", the experiment argv split (no training)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from hf_tlmtl.training.cli import (
    UsageError,
    build_parser,
    did_you_mean,
    known_arguments,
    parse_experiment_argv,
    reject_unknown,
    yaml_to_argv,
)


@dataclass
class Model:
    backbone: str = "resnet18"
    image_size: int | None = None
    pretrained: bool = False


@dataclass
class Data:
    tasks: str | None = None
    layers: list[int] = field(default_factory=lambda: [1])
    augment: bool = True
    n_train: int | None = None


@dataclass
class Experiment:
    n_train: int = 100
    seed_list: str = "0"
    overwrite_output_dir: bool = False


@dataclass
class Training:
    learning_rate: float = 0.1
    num_train_epochs: float = 1.0
    max_steps: int = -1
    overwrite_output_dir: bool = False  # also an experiment key: the experiment takes it


def _parse(argv: list[str]) -> tuple[Model, Data]:
    parser = build_parser(Model, Data)
    if argv and argv[0].endswith(".yaml"):
        argv = yaml_to_argv(argv[0], parser) + argv[1:]
    model, data, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    reject_unknown(remaining, known_arguments(parser))
    return model, data


def test_yaml_gives_values_and_the_command_line_wins(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("backbone: test_resnet\nimage_size: 32\nn_train: 48\naugment: false\n")
    model, data = _parse([str(config), "--image_size", "64", "--augment", "true"])
    assert model.backbone == "test_resnet"  # YAML over the default
    assert model.image_size == 64 and data.augment is True  # command line over YAML
    assert data.n_train == 48 and model.pretrained is False  # YAML kept, default kept


def test_yaml_bools_lists_dicts_and_none_convert_like_the_command_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "pretrained: true\naugment: False\nlayers: [2, 3]\ntasks: [shape, scale]\nimage_size: null\n"
    )
    parser = build_parser(Model, Data)
    argv = yaml_to_argv(config, parser)
    assert argv == ["--pretrained", "true", "--augment", "false", "--layers", "2", "3", "--tasks", '["shape", "scale"]']
    model, data = _parse([str(config)])
    assert model.pretrained is True and data.augment is False
    assert data.layers == [2, 3]  # spread over a nargs argument
    assert data.tasks == '["shape", "scale"]'  # JSON for a plain string argument
    assert model.image_size is None  # null: the default stays
    config.write_text("tasks: {a: classification}\n")
    assert yaml_to_argv(config, parser) == ["--tasks", '{"a": "classification"}']


def test_yaml_keys_of_any_parser_are_known(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("n_train: 5\nlearning_rate: 0.01\n")
    assert yaml_to_argv(config, build_parser(Experiment), build_parser(Training)) == [
        "--n_train", "5", "--learning_rate", "0.01"
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("backbone: x\nimage_sise: 32\n", "run.yaml: unknown key 'image_sise'; did you mean 'image_size'?"),
        ("zzzzzzzz: 1\n", "run.yaml: unknown key 'zzzzzzzz'; see --help for the arguments"),
        ("- a\n- b\n", "run.yaml must be a mapping of argument: value, got list"),
        ("a: [1\n", "run.yaml is not valid YAML"),
    ],
)
def test_bad_yaml_is_a_usage_error(tmp_path, text, message):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("?", r"\?")):
        yaml_to_argv(config, build_parser(Model, Data))


def test_missing_config_file(tmp_path):
    with pytest.raises(UsageError, match="config file .*nope.yaml' not found"):
        yaml_to_argv(tmp_path / "nope.yaml", build_parser(Model))


def test_unknown_command_line_argument_suggests_the_closest():
    with pytest.raises(UsageError, match=r"^unknown argument '--bakbone'; did you mean 'backbone'\?$"):
        _parse(["--bakbone", "x"])
    with pytest.raises(UsageError, match="argument --image_size.*: invalid int value: 'big'"):
        _parse(["--image_size", "big"])  # argparse's errors are UsageErrors too, not SystemExit


def test_did_you_mean_styles():
    known = ["learning_rate", "n_train", "seed"]
    assert did_you_mean("learning_rat", known) == "; did you mean 'learning_rate'?"
    assert did_you_mean("--n_trian", known, option=True) == "; did you mean --n_train?"
    assert did_you_mean("qqqq", known) == ""
    assert did_you_mean("qqqq", known, fallback="; see --help") == "; see --help"


def test_usage_error_is_a_value_error():
    assert issubclass(UsageError, ValueError)


def test_no_abbreviations():
    with pytest.raises(UsageError, match="unknown argument '--back'"):
        _parse(["--back", "x"])


# ------------------------------------------------------------------------- experiment recipes
def test_experiment_argv_split_yaml_and_overrides(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text(
        "n_train: 50\nlearning_rate: 0.5\noverwrite_output_dir: true\noutput_dir: from_yaml\nnum_train_epochs: 3\n"
    )
    experiment, training_argv, output_dir = parse_experiment_argv(
        [str(config), "--learning_rate", "0.01", "--output_dir", str(tmp_path / "cli")],
        Experiment, Training, output_dir="default_out",
    )
    assert experiment == Experiment(n_train=50, seed_list="0", overwrite_output_dir=True)
    # Training keys in order, later values win when a run parses them; shared keys went to the experiment.
    assert training_argv == ["--learning_rate", "0.5", "--num_train_epochs", "3", "--learning_rate", "0.01"]
    assert output_dir == tmp_path / "cli"
    (training,) = build_parser(Training).parse_args_into_dataclasses(args=training_argv)
    assert training.learning_rate == 0.01 and training.num_train_epochs == 3


def test_experiment_argv_defaults():
    experiment, training_argv, output_dir = parse_experiment_argv([], Experiment, Training, output_dir="out/x")
    assert experiment == Experiment() and training_argv == [] and str(output_dir) == "out/x"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--n_trian", "5"], r"^unknown argument --n_trian; did you mean --n_train\?$"),
        (["--lerning_rate", "5"], r"^unknown argument --lerning_rate; did you mean --learning_rate\?$"),
        (["--ful"], r"did you mean --full\?"),  # also_known
        (["--max_steps", "3"], r"^--max_steps is the study's$"),  # reserved, also as --max-steps / --max_steps=3
        (["--max-steps", "3"], r"^--max_steps is the study's$"),
        (["--max_steps=3"], r"^--max_steps is the study's$"),
        (["--learning_rate", "fast"], "invalid float value: 'fast'"),  # training values type-checked early
        (["--n_train"], "expected one argument"),
        (["stray"], "unexpected value 'stray'"),
    ],
)
def test_experiment_argv_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_experiment_argv(
            argv, Experiment, Training, output_dir="out", reserved={"max_steps": "--max_steps is the study's"},
            also_known=["full"],
        )


def test_experiment_yaml_unknown_key(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text("learning_rte: 0.1\n")
    with pytest.raises(UsageError, match=r"exp.yaml: unknown key 'learning_rte'; did you mean 'learning_rate'\?"):
        parse_experiment_argv([str(config)], Experiment, Training, output_dir="out")
