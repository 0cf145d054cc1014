"""Command-line parsing shared by the recipes: ``[CONFIG.yaml] [--key value ...]`` on ``HfArgumentParser``.

A YAML file gives values and ``--key value`` on the command line wins over it (the YAML becomes
``--key value`` strings placed first, and argparse keeps the last value). Bad input raises
:class:`UsageError` with a one-line reason, a "did you mean" for misspelt keys; the recipes print
it as ``error: ...`` and exit with code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch
import yaml
from transformers import HfArgumentParser

__all__ = [
    "UsageError",
    "build_parser",
    "did_you_mean",
    "exit_with_usage_error",
    "known_arguments",
    "parse_experiment_argv",
    "parse_run_argv",
    "reject_unknown",
    "run_or_exit",
    "yaml_to_argv",
]

YAML_SUFFIXES = (".yaml", ".yml")
"""A first argument ending like this is a config file."""

T = TypeVar("T")


class UsageError(ValueError):
    """Bad input: the recipes print it as one ``error: ...`` line and exit with code 2."""


def _raise_usage(message: str) -> NoReturn:
    raise UsageError(message)


def exit_with_usage_error(error: BaseException) -> NoReturn:
    """Print ``error`` as one ``error: ...`` line on stderr and exit with code 2.

    >>> import contextlib
    >>> with contextlib.redirect_stderr(sys.stdout):
    ...     try:
    ...         exit_with_usage_error(UsageError("no such\\n  task"))
    ...     except SystemExit as e:
    ...         print("exit code", e.code)
    error: no such task
    exit code 2
    """
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
    sys.exit(2)


def run_or_exit(main: Callable[[list[str]], T], argv: list[str]) -> T:
    """``main(argv)``; a ``ValueError`` (:class:`UsageError` and the library's "what to change"
    errors) ends it through :func:`exit_with_usage_error`.

    >>> run_or_exit(len, ["a", "b"])
    2
    """
    try:
        return main(argv)
    except ValueError as error:
        exit_with_usage_error(error)


def build_parser(*dataclass_types: type) -> HfArgumentParser:
    """An ``HfArgumentParser`` over the dataclasses that takes exact option names only (no
    abbreviations) and raises :class:`UsageError` instead of printing argparse's usage and exiting.

    >>> @dataclasses.dataclass
    ... class Args:
    ...     seed: int = 0
    >>> build_parser(Args).parse_args_into_dataclasses(["--seed", "5"])
    (Args(seed=5),)
    >>> try:
    ...     build_parser(Args).parse_args_into_dataclasses(["--seed", "five"])
    ... except UsageError as e:
    ...     print(e)
    argument --seed: invalid int value: 'five'
    """
    parser = HfArgumentParser(dataclass_types, allow_abbrev=False)
    parser.error = _raise_usage  # one-line errors, not argparse's usage dump and SystemExit
    return parser


def known_arguments(*parsers: HfArgumentParser) -> list[str]:
    """The argument names (dests) the parsers accept, sorted, without ``help``.

    >>> @dataclasses.dataclass
    ... class Args:
    ...     seed: int = 0
    ...     augment: bool = True
    >>> known_arguments(build_parser(Args))
    ['augment', 'seed']
    """
    return sorted({a.dest for parser in parsers for a in parser._actions if a.dest != "help"})


def did_you_mean(name: str, known: Iterable[str], *, option: bool = False, fallback: str = "") -> str:
    """``"; did you mean 'x'?"`` for the known name closest to ``name`` (``--x`` with
    ``option=True``), or ``fallback`` when none is close.

    >>> did_you_mean("learning_rat", ["learning_rate", "seed"])
    "; did you mean 'learning_rate'?"
    >>> did_you_mean("--n_trian", ["n_train", "n_eval"], option=True)
    '; did you mean --n_train?'
    >>> did_you_mean("zzz", ["n_train"], fallback="; see --help for the arguments")
    '; see --help for the arguments'
    """
    close = difflib.get_close_matches(name.lstrip("-"), sorted(set(known)), n=1, cutoff=0.5)
    if not close:
        return fallback
    return f"; did you mean --{close[0]}?" if option else f"; did you mean {close[0]!r}?"


def reject_unknown(remaining: list[str], known: Iterable[str], *, option: bool = False, fallback: str = "") -> None:
    """Raise :class:`UsageError` naming the first option a parser left over, with
    :func:`did_you_mean`'s suggestion (or the first stray value). Nothing left: return.

    >>> reject_unknown([], ["n_train"])
    >>> for remaining in (["--n_trian", "5"], ["5"]):
    ...     try:
    ...         reject_unknown(remaining, ["n_train", "n_eval"], option=True)
    ...     except UsageError as e:
    ...         print(e)
    unknown argument --n_trian; did you mean --n_train?
    unexpected value '5'; arguments come as --key value
    """
    if not remaining:
        return
    first = next((r for r in remaining if r.startswith("-")), None)
    if first is None:
        raise UsageError(f"unexpected value {remaining[0]!r}; arguments come as --key value")
    shown = first if option else repr(first)
    raise UsageError(f"unknown argument {shown}{did_you_mean(first, known, option=option, fallback=fallback)}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML would keep the last, silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (line {key_node.start_mark.line + 1}); keep one", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def yaml_to_argv(config_path: str | Path, parser: HfArgumentParser, *more_parsers: HfArgumentParser) -> list[str]:
    """The YAML file as ``--key value`` strings, for the parser(s) to convert types and for
    command-line values placed after them to win.

    Keys must be arguments of one of the parsers (else a "did you mean"); ``None`` values are
    skipped, booleans written ``true``/``false``, lists spread over a ``nargs`` argument and given
    as JSON otherwise, like mappings.

    >>> import tempfile
    >>> @dataclasses.dataclass
    ... class Args:
    ...     tasks: str = "shape"
    ...     augment: bool = True
    ...     init_from: str | None = None
    >>> config = Path(tempfile.mkdtemp()) / "run.yaml"
    >>> _ = config.write_text("tasks: [shape, scale]\\naugment: false\\ninit_from: null\\n")
    >>> yaml_to_argv(config, build_parser(Args))
    ['--tasks', '["shape", "scale"]', '--augment', 'false']
    >>> _ = config.write_text("augmnt: false\\n")
    >>> try:
    ...     yaml_to_argv(config, build_parser(Args))
    ... except UsageError as e:
    ...     print(e)
    run.yaml: unknown key 'augmnt'; did you mean 'augment'?
    """
    config_path = Path(config_path)
    if not config_path.is_file():
        raise UsageError(f"config file {str(config_path)!r} not found")
    try:
        values = yaml.load(config_path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"{config_path.name} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(values, dict):
        raise UsageError(f"{config_path.name} must be a mapping of argument: value, got {type(values).__name__}")
    parsers = (parser, *more_parsers)
    known = known_arguments(*parsers)
    argv: list[str] = []
    for key, value in values.items():
        option = f"--{key}"
        action = next((p._option_string_actions[option] for p in parsers if option in p._option_string_actions), None)
        if key not in known or action is None:
            hint = did_you_mean(str(key), known, fallback="; see --help for the arguments")
            raise UsageError(f"{config_path.name}: unknown key {key!r}{hint}")
        if value is None:
            continue
        if isinstance(value, (list, tuple)) and action.nargs in ("+", "*"):
            argv += [option, *(str(v) for v in value)]
        elif isinstance(value, (list, tuple, dict)):
            argv += [option, json.dumps(value)]
        elif isinstance(value, bool):
            argv += [option, str(value).lower()]
        else:
            argv += [option, str(value)]
    return argv


def _accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def parse_run_argv(argv: list[str], *dataclass_types: type) -> tuple:
    """``[CONFIG.yaml] [--key value ...]`` of one run -> one instance per dataclass (command line over YAML over defaults).

    Unknown keys and arguments raise :class:`UsageError` with a "did you mean"; so do the dataclasses' own
    checks (a ``ValueError`` or ``TypeError`` in ``__post_init__``). On a machine without an accelerator, a class
    with a ``use_cpu`` field (``TrainingArguments``) gets ``use_cpu=True`` unless the YAML or the command line
    say otherwise: without it, ``accelerate launch --multi_gpu --num_processes N`` on a CPU-only machine sets up
    ``DistributedType.NO`` (N processes that each train alone and all write); with it, accelerate's MULTI_CPU
    (gloo) data parallelism.

    >>> @dataclasses.dataclass
    ... class Args:
    ...     seed: int = 0
    >>> parse_run_argv(["--seed", "3"], Args)
    (Args(seed=3),)
    >>> try:
    ...     parse_run_argv(["--sed", "3"], Args)
    ... except UsageError as e:
    ...     print(e)
    unknown argument '--sed'; did you mean 'seed'?
    """
    parser = build_parser(*dataclass_types)
    if argv and argv[0].endswith(YAML_SUFFIXES):
        argv = yaml_to_argv(Path(argv[0]), parser) + argv[1:]
    if "use_cpu" in known_arguments(parser) and not _accelerator_available():
        argv = ["--use_cpu", "true", *argv]
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except UsageError:
        raise
    except (ValueError, TypeError) as e:  # raised by a dataclass's __post_init__
        raise UsageError(str(e)) from None
    reject_unknown(unknown, known_arguments(parser), fallback="; see --help for the arguments")
    return tuple(parsed)


def parse_experiment_argv(
    argv: list[str],
    experiment_class: type[T],
    training_class: type,
    *,
    output_dir: str,
    reserved: Mapping[str, str] | None = None,
    also_known: Iterable[str] = (),
) -> tuple[T, list[str], Path]:
    """``[CONFIG.yaml] [--key value ...]`` of an experiment that trains several runs: the experiment
    dataclass, the ``training_class`` argv every run parses (with its own output folder and
    per-run values added) and ``--output_dir``.

    Experiment keys are taken first (a name in both classes goes to the experiment); the rest must
    be ``training_class`` arguments: ``reserved`` names raise their message, unknown ones a "did you
    mean" (``also_known``: more names to suggest). Values the training argv gives are type-checked.

    >>> @dataclasses.dataclass
    ... class Experiment:
    ...     n_train: int = 100
    >>> @dataclasses.dataclass
    ... class Training:
    ...     learning_rate: float = 0.1
    ...     max_steps: int = -1
    >>> experiment, training_argv, out = parse_experiment_argv(
    ...     ["--n_train", "5", "--learning_rate", "0.01", "--output_dir", "runs/a"], Experiment, Training,
    ...     output_dir="runs/default")
    >>> experiment, training_argv, str(out)
    (Experiment(n_train=5), ['--learning_rate', '0.01'], 'runs/a')
    >>> for bad in (["--n_trian", "5"], ["--max_steps", "3"]):
    ...     try:
    ...         parse_experiment_argv(bad, Experiment, Training, output_dir="runs", reserved={"max_steps": "no"})
    ...     except UsageError as e:
    ...         print(e)
    unknown argument --n_trian; did you mean --n_train?
    no
    """
    output_class = dataclasses.make_dataclass(
        "OutputArguments", [("output_dir", str, dataclasses.field(default=output_dir))]
    )
    experiment_parser = build_parser(experiment_class, output_class)
    training_parser = build_parser(training_class)
    if argv and str(argv[0]).endswith(YAML_SUFFIXES):
        argv = yaml_to_argv(Path(argv[0]), experiment_parser, training_parser) + list(argv[1:])
    try:
        experiment, output, remaining = experiment_parser.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True
        )
    except UsageError:
        raise
    except (ValueError, TypeError) as e:  # raised by a dataclass's __post_init__
        raise UsageError(str(e)) from None
    for token in remaining:
        name = token.removeprefix("--").split("=", 1)[0].replace("-", "_")
        if token.startswith("--") and reserved and name in reserved:
            raise UsageError(reserved[name])
    _, unknown = training_parser.parse_known_args(remaining)  # type errors raise here, before any run
    reject_unknown(unknown, [*known_arguments(experiment_parser, training_parser), *also_known], option=True)
    return experiment, remaining, Path(output.output_dir)
