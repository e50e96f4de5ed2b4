"""Per-video I3D feature files, fusion of the two feature streams, and temporal sampling.

A feature file is a pickle of ``{'feature': float32 array [num_clips, 1024], ...}`` at
``<root>/<subset>/<video_name>.pkl``: one 1024-d I3D embedding per 16-frame window (stride 1).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional, Union

import numpy as np


class FeatureReader:
    """Reader of the feature files of one stream (domain-agnostic or domain-aware) in one subset folder."""

    def __init__(self, root: Union[str, Path], subset: str, channels: Optional[int] = None) -> None:
        self.root = Path(root)
        self.subset = subset
        self.channels = channels  # expected width of one clip feature; None accepts any

    def __repr__(self) -> str:
        return f"FeatureReader(root={str(self.root)!r}, subset={self.subset!r})"

    def path(self, video_name: str) -> Path:
        return self.root / self.subset / f"{video_name}.pkl"

    def exists(self, video_name: str) -> bool:
        return self.path(video_name).is_file()

    def load(self, video_name: str) -> np.ndarray:
        """Load the features of one video as float32 [num_clips, channels] (channels = 1024 for I3D).

        Raises:
            FileNotFoundError: the file is missing; the message names the expected layout.
            ValueError: the pickle has no 'feature' entry or the array is not 2-D with at least one clip.
        """
        path = self.path(video_name)
        if not path.is_file():
            raise FileNotFoundError(
                f"feature file not found: {path}; expected one pickle per video at "
                f"<features root>/<subset>/<video_name>.pkl holding {{'feature': float32 array [num_clips, 1024]}}"
            )
        # NOTE: plain pickle.load runs arbitrary code from the file, so only trusted feature files are
        # safe to read until a restricted unpickler replaces this call.
        try:
            with path.open("rb") as handle:
                content = pickle.load(handle)
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, ValueError) as error:
            raise ValueError(f"{path}: not a readable feature pickle ({error}); copy or extract it again") from error
        if not isinstance(content, dict) or "feature" not in content:
            raise ValueError(f"{path}: expected a dict with a 'feature' array")

        features = np.asarray(content["feature"], dtype=np.float32)
        if features.ndim != 2 or features.shape[0] == 0:
            raise ValueError(f"{path}: 'feature' must have shape [num_clips >= 1, channels], got {features.shape}")
        if self.channels is not None and features.shape[1] != self.channels:
            raise ValueError(f"{path}: clip features are {features.shape[1]}-d, expected {self.channels} "
                             "(--video_input_dim)")
        return features


def fuse_streams(agnostic: np.ndarray, aware: np.ndarray, alpha: float) -> np.ndarray:
    """Fuse the two feature streams of one video: ``(1 - alpha) * aware + alpha * agnostic``.

    ``alpha`` weights the domain-agnostic stream (0.8 for How2Sign and CSL-Daily, 0.9 for
    PHOENIX-2014T in the released configurations).

    Args:
        agnostic: [N, C] features of the domain-agnostic encoder.
        aware: [N, C] features of the domain-aware encoder, same clips.
        alpha: weight of the agnostic stream, in [0, 1].

    Returns:
        float32 [N, C].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if agnostic.shape != aware.shape:
        raise ValueError(f"feature streams differ in shape: agnostic {agnostic.shape}, aware {aware.shape}")
    fused = (1.0 - alpha) * aware.astype(np.float32) + alpha * agnostic.astype(np.float32)
    return fused.astype(np.float32, copy=False)


def sample_clips(features: np.ndarray, feature_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Resample a clip sequence to a fixed length and build its mask.

    A video with at least ``feature_len`` clips keeps the rows ``floor(linspace(0, N - 1, feature_len))``
    (first and last clip included). A shorter video keeps every clip and is zero-padded at the end.

    Args:
        features: [N, C] clip features, N >= 1.
        feature_len: L, the number of clip slots.

    Returns:
        video: float32 [L, C].
        video_mask: int64 [1 + L]; position 0 is the CLS slot and is 0, positions 1..n are 1 for the
        n kept clips and 0 for padding.
    """
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"features must have shape [num_clips >= 1, channels], got {features.shape}")
    if feature_len < 1:
        raise ValueError(f"feature_len must be positive, got {feature_len}")

    num_clips, channels = features.shape
    video = np.zeros((feature_len, channels), dtype=np.float32)
    if num_clips >= feature_len:
        rows = np.linspace(0, num_clips - 1, feature_len).astype(np.int64)
        video[:] = features[rows]
        num_kept = feature_len
    else:
        video[:num_clips] = features
        num_kept = num_clips

    video_mask = np.zeros(1 + feature_len, dtype=np.int64)
    video_mask[1:1 + num_kept] = 1
    return video, video_mask
