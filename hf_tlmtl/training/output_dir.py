"""A training run's output folder: what the run writes there, and whether the folder is fit to start in.

A run writes its model and result files at the top of ``output_dir`` and the Trainer's ``checkpoint-*``
folders beside them. Before anything is read or trained:

- :func:`resolve_resume`: ``--resume_from_checkpoint true`` names the newest complete checkpoint, a path
  is checked to be one, and :func:`check_resume_fits` that it holds this run's model;
- :func:`check_output_dir`: a folder that holds anything is refused unless the run replaces it
  (``--overwrite_output_dir``, see :mod:`~hf_tlmtl.training.run_folder`) or continues it (a resume);
- :func:`is_run_entry`: what a run wrote (so what an overwrite sets aside), never the user's own files;
- :func:`removed_if_left_empty`: the Trainer creates the folder before some of its checks, so bad input
  leaves nothing behind.

Bad input raises :class:`~hf_tlmtl.training.cli.UsageError` (the recipes' ``error:`` line, exit code 2).

Example:
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp())
    >>> _ = (out / "notes.txt").write_text("mine")
    >>> (out / "checkpoint-4").mkdir(); _ = (out / "checkpoint-4" / "trainer_state.json").write_text("{}")
    >>> _ = (out / "checkpoint-4" / "balancer_state.json").write_text("{}")  # written last: the checkpoint is complete
    >>> [(p.name, is_run_entry(p)) for p in sorted(out.iterdir())]
    [('checkpoint-4', True), ('notes.txt', False)]
    >>> resolve_resume("true", out) == str(out / "checkpoint-4")
    True
    >>> check_output_dir(out, overwrite=True, resume=None)  # replaced: fine
    >>> try:
    ...     check_output_dir(out, overwrite=False, resume=None)
    ... except UsageError as e:
    ...     print(str(e).split(";")[0].endswith("exists and is not empty"))
    True
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..checkpoints import checkpoint_mismatch
from .balancer_state import BALANCER_STATE_NAME
from .cli import UsageError

SUMMARY_FILE = "training_summary.json"
"""Arguments, data, transfer plan, per-task metrics and baselines (:mod:`~hf_tlmtl.training.summary`)."""
CURVES_FILE = "training_curves.png"
CARD_FILE = "README.md"
RUN_FILES = (
    SUMMARY_FILE, CURVES_FILE, CARD_FILE, "config.json", "model.safetensors", "preprocessor_config.json",
    "trainer_state.json", "training_args.bin", "train_results.json", "eval_results.json", "all_results.json",
)
"""The files a run writes at the top of ``output_dir`` (set aside, then replaced, by ``--overwrite_output_dir``)."""
ADAPTER_DIR = "adapter"
"""A peft adapter alone, beside the model it is merged into (:func:`~hf_tlmtl.training.final_model.save_final_model`)."""
RUN_DIRS = (ADAPTER_DIR,)
"""The folders a run writes there, besides ``checkpoint-*``."""


def is_run_entry(path: Path) -> bool:
    """Whether a top-level entry of ``output_dir`` is one a run writes (checkpoints, result files); not the user's files.

    >>> [is_run_entry(Path(name)) for name in ("config.json", "checkpoint-3", "notes.txt")]
    [True, False, False]
    """
    if path.is_dir():
        return path.name in RUN_DIRS or path.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-")
    return path.name in RUN_FILES


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete ``checkpoint-*`` folders of ``output_dir``, newest first: those with ``balancer_state.json``,
    which :class:`~hf_tlmtl.training.MultiTaskTrainer` writes last (after the Trainer's ``trainer_state.json``).

    >>> complete_checkpoints("/no/such/folder")
    []
    """
    found = []
    for path in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", path.name)
        if match and path.is_dir() and (path / "trainer_state.json").is_file() and (path / BALANCER_STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found, reverse=True)]


def resolve_resume(value: str | None, output_dir: str | os.PathLike) -> str | None:
    """``--resume_from_checkpoint``: ``true`` -> the newest complete checkpoint in ``output_dir``; a path -> checked.

    ``None`` or a false word (``false``, ``no``, ``0``, ``none``, ``""``): no resume.

    >>> resolve_resume("false", "/no/such/folder") is None
    True
    """
    if value is None or str(value).lower() in ("", "false", "no", "0", "none"):
        return None
    output_dir = Path(output_dir)
    if str(value).lower() in ("true", "yes", "1", "last", "latest"):
        found = complete_checkpoints(output_dir) if output_dir.is_dir() else []
        if not found:
            raise UsageError(
                f"--resume_from_checkpoint true but {str(output_dir)!r} holds no complete {PREFIX_CHECKPOINT_DIR}-* "
                "folder; start without it (checkpoints come from --save_strategy steps|epoch)"
            )
        return str(found[0])
    path = Path(value)
    if not (path / "trainer_state.json").is_file():
        raise UsageError(f"--resume_from_checkpoint {value!r} is not a complete Trainer checkpoint (no trainer_state.json)")
    if not (path / BALANCER_STATE_NAME).is_file():
        raise UsageError(
            f"--resume_from_checkpoint {value!r} is incomplete (no {BALANCER_STATE_NAME}, written last: the run stopped "
            "while writing it); resume from the checkpoint before it, or pass --resume_from_checkpoint true for the "
            "newest complete one"
        )
    return str(path)


def unwritable(path: str | os.PathLike) -> str | None:
    """Why nothing can be created at ``path`` (a folder or file to come), or None: a file is made and removed in its
    nearest existing folder, which also catches read-only file systems (where permission bits say nothing to root).

    Example:
        >>> import tempfile
        >>> unwritable(Path(tempfile.mkdtemp()) / "new" / "run") is None, unwritable("/proc/hf_tlmtl/run") is not None
        (True, True)
    """
    folder = Path(path).absolute()
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is a file"
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".hf_tlmtl-write-check-"):
            pass
    except OSError as e:
        return f"{folder} is not writable ({e.strerror or type(e).__name__})"
    return None


def check_output_dir(output_dir: str | os.PathLike, *, overwrite: bool, resume: str | None) -> None:
    """``output_dir`` is new or empty, or this run replaces it (``overwrite``) or continues it (``resume``)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output_dir {str(out)!r} is a file; pass a folder")
    reason = unwritable(out)
    if reason:
        raise UsageError(f"output_dir {str(out)!r} cannot be written: {reason}; pass another --output_dir")
    if out.is_dir() and any(out.iterdir()) and not overwrite and resume is None:
        raise UsageError(
            f"output_dir {str(out)!r} exists and is not empty; pass --overwrite_output_dir true to replace it, "
            "--resume_from_checkpoint true to continue it, or another --output_dir"
        )


def check_resume_fits(model: nn.Module, resume: str) -> None:
    """The checkpoint to resume from holds the weights of ``model`` (the model the Trainer trains)."""
    mismatch = checkpoint_mismatch(model, resume)
    if mismatch:
        raise UsageError(
            f"--resume_from_checkpoint: {resume} does not fit this run's model: {mismatch}. Pass the arguments "
            "of the run that wrote it (--backbone, --tasks, --transfer_strategy ...) to continue it, or start "
            "a new run with --overwrite_output_dir true or another --output_dir"
        )


@contextmanager
def removed_if_left_empty(output_dir: str | os.PathLike) -> Iterator[None]:
    """A ``ValueError`` (bad input) in the block removes ``output_dir`` if the block created it and left it empty.

    The Trainer creates ``output_dir`` before some of its checks.

    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "run"
    >>> try:
    ...     with removed_if_left_empty(out):
    ...         out.mkdir()
    ...         raise ValueError("bad input")
    ... except ValueError:
    ...     print(out.exists())
    False
    """
    out = Path(output_dir)
    existed = out.exists()
    try:
        yield
    except ValueError:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


__all__ = [
    "ADAPTER_DIR",
    "CARD_FILE",
    "CURVES_FILE",
    "RUN_DIRS",
    "RUN_FILES",
    "SUMMARY_FILE",
    "check_output_dir",
    "check_resume_fits",
    "complete_checkpoints",
    "is_run_entry",
    "removed_if_left_empty",
    "resolve_resume",
]
