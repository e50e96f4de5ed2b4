"""Saving and loading training checkpoints (one dict, written atomically)."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

LAST_NAME = "checkpoint_last.pt"
BEST_NAME = "checkpoint_best.pt"


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


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` through a temporary file and an atomic rename.

    A crash during the write leaves the previous file intact, never a truncated one.
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
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU without executing code from the file."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


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
