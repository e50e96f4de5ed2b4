"""Saving, finding and loading training checkpoints, and the random-generator state they carry.

A checkpoint is one dict written atomically (temporary file, fsync, rename, fsync of the folder) and
read back with ``torch.load(weights_only=True)``, so loading a file never runs code from it.
Everything in it is a tensor, a number, a string or a plain container of those.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

LAST_NAME = "checkpoint_last.pt"
PREV_NAME = "checkpoint_prev.pt"
BEST_NAME = "checkpoint_best.pt"

# Entries without which a file cannot continue a training run.
TRAINING_KEYS = ("model", "optimizer", "scheduler", "epoch", "step")


class CheckpointError(ValueError):
    """Raised when a checkpoint file is truncated, corrupt or not a checkpoint of this project."""


class UnsafeCheckpointError(CheckpointError):
    """Raised when a checkpoint contains Python objects that only a full (code-running) unpickler could build."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the module under DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries, so that a rename in it survives a power loss."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms and file systems cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems reject fsync on a folder; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def _keep_as_previous(path: Path, previous: Path) -> None:
    """Make ``previous`` a second name of the current ``path``, so that ``path`` itself never disappears."""
    link = previous.with_name(f".{previous.name}.link")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
        os.replace(link, previous)
    except OSError:
        # Without hard links, a rename does it, and `path` is missing until the new file takes its place.
        link.unlink(missing_ok=True)
        os.replace(path, previous)


def save_checkpoint(state: dict[str, Any], path: Path, previous: Optional[Path] = None) -> None:
    """Write ``state`` to ``path`` through a temporary file and an atomic rename.

    The data and the folder entry are fsynced, so a crash or power loss at any point leaves either
    the old or the new file, never a truncated one. With ``previous``, an existing ``path`` is
    kept under that name first, as the fallback of ``--resume latest``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file with mode 0600; give it the mode of any other new file.
        os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if previous is not None and path.is_file():
            _keep_as_previous(path, previous)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _unpickler_reason(error: pickle.UnpicklingError) -> str:
    """Return the detail of a ``weights_only`` rejection (such as the rejected global) without torch's advice."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker not in text:
        return _first_line(error)
    detail = text.split(marker, 1)[1].split("Check the documentation", 1)[0].split("Please use", 1)[0]
    return " ".join(detail.split())[:300]


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU without executing code from the file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: the file contains objects that ``weights_only`` loading rejects.
        CheckpointError: the file is truncated, corrupt or not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _unpickler_reason(error)
        if "global" not in reason.lower():
            raise CheckpointError(f"cannot read checkpoint {path}: the file is truncated or corrupt ({reason}). Use "
                                  f"an earlier checkpoint, for example {PREV_NAME} in the same folder.") from error
        raise UnsafeCheckpointError(
            f"rejected {path}: it contains Python objects other than tensors, numbers, strings and containers, "
            f"and loading them could run code from the file ({reason}). Pass a checkpoint written by this project, "
            "or re-save the weights of a file you trust as a plain state dict."
        ) from error
    except (RuntimeError, EOFError, ValueError, KeyError, OSError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated or corrupt ({type(error).__name__}: "
            f"{_first_line(error)}). Use an earlier checkpoint, for example {PREV_NAME} in the same folder."
        ) from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"invalid checkpoint {path}: expected a dict, got a {type(checkpoint).__name__}")
    return checkpoint


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint that can continue training; raise :class:`CheckpointError` if entries are missing."""
    checkpoint = load_checkpoint(path)
    missing = [key for key in TRAINING_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{path} cannot continue training: it has no {', '.join(missing)} (a best-model file contains only the "
            f"weights). Resume from {LAST_NAME}, or start a new run with --init_model {path}."
        )
    return checkpoint


def find_latest_checkpoint(folder: Path) -> tuple[Path, dict[str, Any]]:
    """Return the newest loadable training checkpoint of a run folder and its contents.

    ``checkpoint_last.pt`` and ``checkpoint_prev.pt`` are tried newest first (by modification time).
    A file that fails to load is skipped with a warning that gives the reason.

    Raises:
        FileNotFoundError: no candidate exists or none of them loads.
    """
    candidates = [folder / name for name in (LAST_NAME, PREV_NAME) if (folder / name).is_file()]
    candidates.sort(key=lambda candidate: candidate.stat().st_mtime_ns, reverse=True)
    reasons = []
    for candidate in candidates:
        try:
            return candidate, load_training_checkpoint(candidate)
        except CheckpointError as error:
            logger.warning("skipping checkpoint %s: %s", candidate, error)
            reasons.append(f"{candidate.name}: {error}")
    if not candidates:
        raise FileNotFoundError(
            f"nothing to resume: {folder} contains neither {LAST_NAME} nor {PREV_NAME}. Drop --resume to start a new "
            "run, or pass --resume PATH to a checkpoint."
        )
    raise FileNotFoundError(f"no loadable checkpoint in {folder}: " + "; ".join(reasons))


def model_state_from(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Return the model weights of a training checkpoint or of a bare state dict.

    A ``module.`` prefix left by DDP is stripped.
    """
    state = checkpoint.get("model", checkpoint)
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_model_weights(model: nn.Module, path: Path, strict: bool = True) -> Optional[dict[str, Any]]:
    """Load weights from ``path`` into ``model`` and return the checkpoint dict."""
    checkpoint = load_checkpoint(path)
    result = unwrap_model(model).load_state_dict(model_state_from(checkpoint), strict=strict)
    if not strict and (result.missing_keys or result.unexpected_keys):
        logger.warning(
            "loaded %s with missing keys %s and unexpected keys %s", path, result.missing_keys, result.unexpected_keys
        )
    return checkpoint


def capture_rng_state() -> dict[str, Any]:
    """Return the state of Python's ``random``, NumPy's global generator, torch's CPU generator and the
    generator of the current CUDA device (when CUDA is in use).

    Every value is a tensor, a number, a string or a list, so the state passes ``weights_only`` loading.
    """
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    # NOTE: the CUDA branch has not run on a GPU yet; CPU runs are tested to resume bit for bit.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators saved by :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state({
        "bit_generator": numpy_state["bit_generator"],
        "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
        "has_gauss": numpy_state["has_gauss"],
        "gauss": numpy_state["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        else:
            logger.warning("the checkpoint contains a CUDA generator state but CUDA is not available, so it is ignored")
