"""Which checkpoint a run starts from, and what it may do to the run directory it finds.

A run directory is someone's work: a fresh run refuses one that already holds checkpoints (unless
told to start over), ``resume=auto`` never trusts a file it cannot read, and nothing here unpickles
code (``torch.load(weights_only=True)``, memory-mapped so a multi-GB file costs no RAM).
"""

from __future__ import annotations

import pickle
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldm.atomic import temporary_target
from ldm.errors import UserError

# entries Lightning needs to resume a fit (a weights-only export lacks them)
EXPECTED_ENTRIES = ("state_dict", "global_step", "loops")


@dataclass(frozen=True)
class Resume:
    """A checkpoint to resume from and the optimiser step it holds."""

    path: Path
    step: int


def say(message: str, *, warning: bool = False) -> None:
    """Print one line on global rank 0 only (before the trainer exists, ranks come from the env)."""
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        print(f"warning: {message}" if warning else message, file=sys.stderr if warning else sys.stdout)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def read_checkpoint_header(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The checkpoint at ``path`` loaded lazily (tensors memory-mapped, never read), or why it cannot be.

    Returns ``(checkpoint, None)`` or ``(None, reason)``; never unpickles anything but tensors.
    """
    if path.is_file() and not zipfile.is_zipfile(path):  # torch.save writes zip archives since torch 1.6
        return None, "unreadable (not a zip archive: truncated, or not a torch checkpoint)"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:  # weights_only refused a global: the file carries Python objects
        return None, "it holds pickled Python objects, which are never loaded"
    except Exception as error:  # noqa: BLE001 - truncated, not a zip, a directory, ...
        return None, f"unreadable ({_first_line(error)})"
    if not isinstance(checkpoint, dict):
        return None, f"not a training checkpoint (a {type(checkpoint).__name__}, not a dict)"
    missing = [k for k in EXPECTED_ENTRIES if k not in checkpoint]
    if missing:
        return None, f"not a training checkpoint (no {', '.join(repr(k) for k in missing)} entries)"
    return checkpoint, None


def check_resume_file(resume: str) -> Resume:
    """``resume=PATH``, checked up front: one line for a missing, a directory, a corrupt or a pickle file."""
    path = Path(resume).expanduser()
    if path.is_dir():
        inside = path / "checkpoints" / "last.ckpt" if (path / "checkpoints").is_dir() else path / "last.ckpt"
        raise UserError(
            f"resume={resume} is a directory: pass a checkpoint file inside it (e.g. resume={inside}), "
            f"or resume=auto with hydra.run.dir set to the run directory"
        )
    if not path.is_file():
        raise UserError(f"resume checkpoint not found: {path}")
    checkpoint, reason = read_checkpoint_header(path)
    if checkpoint is None:
        raise UserError(f"cannot resume from {path}: {reason}")
    return Resume(path, int(checkpoint["global_step"]))


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete the temporary files of saves that were killed midway (full size, never renamed).

    Only names ``ldm.atomic`` gives a ``.ckpt`` while writing it (``.{name}.ckpt.XXXX.tmp``) and
    only regular files; call it at start, on one rank, when no save of this run can be in flight.
    """
    removed = []
    if not directory.is_dir():
        return removed
    for path in sorted(directory.iterdir()):
        if (temporary_target(path.name) or "").endswith(".ckpt") and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def checkpoint_files(directory: Path) -> list[Path]:
    """The ``*.ckpt`` files of ``directory``: ``last.ckpt`` first, then the newest written first."""
    if not directory.is_dir():
        return []
    files = [p for p in directory.glob("*.ckpt") if p.is_file()]
    return sorted(files, key=lambda p: (p.name != "last.ckpt", -p.stat().st_mtime, p.name))


def find_resume_checkpoint(directory: Path) -> Resume | None:
    """The newest readable checkpoint of ``directory`` (``last.ckpt`` first), warning about each one
    skipped and why; None when there is none; a one-line error when there are some but none reads
    (starting fresh over them would lose the run)."""
    candidates = checkpoint_files(directory)
    skipped = []
    for path in candidates:
        checkpoint, reason = read_checkpoint_header(path)
        if checkpoint is not None:
            return Resume(path, int(checkpoint["global_step"]))
        skipped.append(path.name)
        say(f"resume=auto: skipping {path}: {reason}", warning=True)
    if skipped:
        raise UserError(
            f"resume=auto: none of the {len(skipped)} checkpoints in {directory} is readable "
            f"({', '.join(skipped)}): pass resume=PATH, or overwrite=true to start over"
        )
    return None


def prepare_run_directory(checkpoint_dir: Path, resume: str | None, overwrite: bool) -> Resume | None:
    """Decide where the run starts, before anything is built: the checkpoint to resume from or None.

    - always: remove temp files of killed saves (global rank 0);
    - ``resume=null``: refuse a directory holding checkpoints, unless ``overwrite`` (then delete them);
    - ``resume=auto``: the newest readable checkpoint, or a fresh start when there is none (said);
    - ``resume=PATH``: that file, checked to load with ``weights_only=True``.
    """
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        for path in remove_stale_temp_files(checkpoint_dir):
            say(f"removed {path}: the temporary file of a save that was killed midway", warning=True)
    if resume is None:
        existing = checkpoint_files(checkpoint_dir)
        if existing and not overwrite:
            names = ", ".join(p.name for p in existing[:3]) + (", ..." if len(existing) > 3 else "")
            raise UserError(
                f"{checkpoint_dir} already holds checkpoints ({names}): continue them with resume=auto, "
                f"start over with overwrite=true, or give this run another hydra.run.dir"
            )
        if existing and getattr(rank_zero_only, "rank", 0) == 0:
            for path in existing:
                path.unlink(missing_ok=True)
            say(f"overwrite=true: deleted {len(existing)} checkpoint(s) of the previous run in {checkpoint_dir}")
        return None
    if resume == "auto":
        found = find_resume_checkpoint(checkpoint_dir)
        if found is None:
            say(f"resume=auto: no checkpoint in {checkpoint_dir}, starting fresh")
        else:
            say(f"resume=auto: resuming step {found.step} from {found.path}")
        return found
    return check_resume_file(resume)
