"""Replacing a previous training run in an output folder without ever losing it.

``--overwrite_output_dir true`` used to delete the old run's files before the new run had trained a
single step: a new run that then failed (a bad argument, a crash, a kill) left neither model. Here the
old run is *set aside* instead, inside the folder, and given up only when the new run has something
to show for itself:

1. :func:`set_aside` moves the old run's entries (result files, ``checkpoint-*``, ``adapter/``) into
   ``<output_dir>/.previous-run/`` (renames on one file system: nothing is copied, nothing rewritten),
   after writing the list of what it moves (``manifest.json``) there;
2. the new run trains and writes into ``output_dir`` as usual;
3. its first checkpoint or its final model *commits* it: :func:`drop_set_aside` deletes the old run
   (:class:`DropSetAsideOnSave` does it on the Trainer's first save);
4. if it fails before that, :func:`restore` removes what the new run wrote and moves the old run back,
   byte for byte. A run killed outright (SIGKILL) cannot restore anything itself: the next start in the
   same folder finds ``.previous-run/`` and restores it first (:func:`restore_interrupted`).

:func:`previous_run_set_aside` does steps 1, 3 and 4 around a Trainer's training and final save.

Files in ``output_dir`` that no run writes (notes, data) are never moved or touched.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> out = Path(tempfile.mkdtemp())
    >>> _ = (out / "config.json").write_text("old"); _ = (out / "notes.txt").write_text("mine")
    >>> names = set_aside(out, is_run_entry=lambda p: p.name == "config.json")
    >>> names, sorted(p.name for p in out.iterdir())
    (['config.json'], ['.previous-run', 'notes.txt'])
    >>> _ = (out / "config.json").write_text("new, failed")
    >>> restore(out, is_run_entry=lambda p: p.name == "config.json")
    ['config.json']
    >>> (out / "config.json").read_text(), (out / ".previous-run").exists()
    ('old', False)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from transformers import Trainer, TrainerCallback, TrainingArguments

SET_ASIDE_DIR = ".previous-run"
"""Sub-folder of ``output_dir`` that holds the previous run while a new one has not committed."""
MANIFEST = "manifest.json"

RunEntry = Callable[[Path], bool]
"""Whether a top-level entry of the output folder was written by a run (and so belongs to one)."""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def set_aside(output_dir: str | os.PathLike, is_run_entry: RunEntry) -> list[str]:
    """Move the run entries of ``output_dir`` into ``output_dir/.previous-run/``; returns their names.

    Nothing to move: nothing happens and ``[]`` comes back. The manifest is written before the first
    move, so a kill in the middle leaves a state :func:`restore` undoes exactly.
    """
    out = Path(output_dir)
    aside = out / SET_ASIDE_DIR
    if aside.exists():
        raise ValueError(
            f"{aside} already holds a previous run set aside; restore it first (hf_tlmtl.training.run_folder.restore) "
            "or delete it if that run is not needed"
        )
    names = sorted(p.name for p in out.iterdir() if p.name != SET_ASIDE_DIR and is_run_entry(p)) if out.is_dir() else []
    if not names:
        return []
    aside.mkdir()
    (aside / MANIFEST).write_text(json.dumps({"moved": names}))
    for name in names:
        os.replace(out / name, aside / name)
    return names


def restore(output_dir: str | os.PathLike, is_run_entry: RunEntry) -> list[str]:
    """Undo :func:`set_aside`: delete the run entries a newer run wrote, move the old ones back.

    Returns the names moved back (``[]`` when nothing was set aside). Entries the manifest lists
    but that are still at the top were not moved yet (a kill during :func:`set_aside`): they stay.
    """
    out = Path(output_dir)
    aside = out / SET_ASIDE_DIR
    if not aside.is_dir():
        return []
    try:
        moved = list(json.loads((aside / MANIFEST).read_text())["moved"])
    except (OSError, ValueError, KeyError, TypeError):
        moved = [p.name for p in aside.iterdir() if p.name != MANIFEST]
    waiting = {name for name in moved if (aside / name).exists() or (aside / name).is_symlink()}
    for path in list(out.iterdir()):
        if path.name == SET_ASIDE_DIR or not is_run_entry(path):
            continue
        if path.name in waiting or path.name not in moved:
            _remove(path)  # the newer run's
    for name in sorted(waiting):
        os.replace(aside / name, out / name)
    shutil.rmtree(aside)
    return sorted(waiting)


def drop_set_aside(output_dir: str | os.PathLike) -> bool:
    """The new run has committed (a checkpoint or its final model): delete the old run. True if there was one."""
    aside = Path(output_dir) / SET_ASIDE_DIR
    if not aside.is_dir():
        return False
    shutil.rmtree(aside)
    return True


class DropSetAsideOnSave(TrainerCallback):
    """Deletes the set-aside previous run when the Trainer has written its first checkpoint (main process)."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.dropped = False

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.dropped and args.should_save:
            drop_set_aside(self.output_dir)
            self.dropped = True


def restore_interrupted(args: TrainingArguments, is_run_entry: RunEntry) -> list[str]:
    """A run killed while it replaced a previous one (before its first checkpoint) left that previous run in
    ``args.output_dir/.previous-run``: the main process puts it back, before any process looks at the folder.

    Returns the names put back (``[]`` on the other processes, and when nothing was set aside).

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp())
        >>> args = TrainingArguments(output_dir=str(out), report_to="none")
        >>> _ = (out / "config.json").write_text("old")
        >>> _ = set_aside(out, is_run_entry=lambda p: p.name == "config.json")  # then the run was killed
        >>> restore_interrupted(args, is_run_entry=lambda p: p.name == "config.json")  # doctest: +ELLIPSIS
        restored the previous run in ... (1 entries) that an interrupted --overwrite_output_dir run had set aside
        ['config.json']
    """
    out = Path(args.output_dir)
    restored: list[str] = []
    with args.main_process_first(desc="restoring an interrupted overwrite"):
        if args.process_index == 0 and (out / SET_ASIDE_DIR).is_dir():
            restored = restore(out, is_run_entry)
            print(f"restored the previous run in {out} ({len(restored)} entries) that an interrupted "
                  "--overwrite_output_dir run had set aside", flush=True)
    return restored


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through previous_run_set_aside's restore


@contextmanager
def previous_run_set_aside(trainer: Trainer, is_run_entry: RunEntry, *, enabled: bool = True) -> Iterator[list[str]]:
    """The previous run in ``trainer.args.output_dir`` set aside for the block (the new run's training and final save).

    The main process moves it aside (:func:`set_aside`; the block gets the names moved). The Trainer's first
    checkpoint drops it (:class:`DropSetAsideOnSave`), and so does the block's end; if the block fails (an
    exception, or SIGTERM, turned into ``SystemExit(143)`` while the block runs) before that, the previous run is
    put back (:func:`restore`) and the error goes on. ``enabled=False``: nothing is set aside.

    Example:
        >>> import tempfile
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> from hf_tlmtl.training import MultiTaskTrainer, MultiTaskTrainingArguments
        >>> out = Path(tempfile.mkdtemp()); _ = (out / "config.json").write_text("old")
        >>> model = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
        >>> trainer = MultiTaskTrainer(model=model, args=MultiTaskTrainingArguments(str(out), report_to="none"))
        >>> try:
        ...     with previous_run_set_aside(trainer, is_run_entry=lambda p: p.name == "config.json") as moved:
        ...         print(moved, (out / "config.json").exists())
        ...         raise RuntimeError("the new run failed")
        ... except RuntimeError:
        ...     print((out / "config.json").read_text())
        ['config.json'] False
        old
    """
    args = trainer.args
    out = Path(args.output_dir)
    names: list[str] = []
    if enabled:
        with args.main_process_first(desc="setting the previous run aside"):
            if args.process_index == 0 and out.is_dir():
                names = set_aside(out, is_run_entry)
    if not names:
        yield names
        return
    trainer.add_callback(DropSetAsideOnSave(out))
    previous_handler = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        yield names
    except BaseException:
        if (out / SET_ASIDE_DIR).is_dir():
            restore(out, is_run_entry)
            print(f"the run failed before its first checkpoint; the previous run in {out} is back as it was",
                  file=sys.stderr, flush=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    drop_set_aside(out)


__all__ = [
    "DropSetAsideOnSave",
    "SET_ASIDE_DIR",
    "drop_set_aside",
    "previous_run_set_aside",
    "restore",
    "restore_interrupted",
    "set_aside",
]
