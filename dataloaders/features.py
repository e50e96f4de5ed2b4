"""Per-video I3D feature files, the packed feature store, fusion of the two streams and temporal sampling.

Two on-disk layouts hold the features of one split, and :class:`FeatureReader` reads either:

- per-video pickles ``<root>/<split>/<video_name>.pkl`` holding ``{'feature': float32 [num_clips, 1024]}``,
  one 1024-d I3D embedding per 16-frame window (stride 1). They are read with a restricted unpickler,
  so a file that names any global besides numpy arrays and builtin containers is rejected unexecuted;
- a packed store ``<root>/<split>/features.npy`` (float32 ``[total_clips, C]``, every video's clips
  back to back) with ``<root>/<split>/index.json`` (video name -> offset and number of clips), written
  by :func:`pack_split`. It contains no pickle and is memory-mapped, so loading a video costs one slice.

The store keeps float32, so a run reads exactly the values of the pickles and gives identical results.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from dataloaders.safe_pickle import UnsafePickleError, load_pickle

logger = logging.getLogger(__name__)

PACKED_INDEX = "index.json"
PACKED_FEATURES = "features.npy"
PACKED_FORMAT = "upret-packed-features"
PACKED_VERSION = 1

PICKLE_LAYOUT_HINT = ("expected one pickle per video at <features root>/<subset>/<video_name>.pkl holding "
                      "{'feature': float32 array [num_clips, 1024]}, or a packed store made by "
                      "scripts/pack_features.py")


def check_feature_array(features: Any, source: str, channels: Optional[int] = None) -> np.ndarray:
    """Validate the clip features of one video and return them as float32 [num_clips, channels].

    Args:
        features: the stored array, [num_clips, C].
        source: the file (and video) that the array came from, for error messages.
        channels: expected C (1024 for I3D); None accepts any width.

    Raises:
        ValueError: the array is not numeric, not 2-D, has no clip, has the wrong width, or contains
            NaN or infinite values. The message names ``source`` and the fix.
    """
    if not isinstance(features, np.ndarray) or features.dtype.kind not in "fiub":
        kind = features.dtype if isinstance(features, np.ndarray) else type(features).__name__
        raise ValueError(f"{source}: 'feature' must be a numeric numpy array, got {kind}; extract the features again")
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"{source}: 'feature' must have shape [num_clips >= 1, channels], got {features.shape}; "
                         "a video needs at least one 16-frame clip, so drop it or extract it again")
    if channels is not None and features.shape[1] != channels:
        raise ValueError(f"{source}: clip features are {features.shape[1]}-d, expected {channels} "
                         "(--video_input_dim); check that the file comes from the I3D extractor")
    features = np.asarray(features, dtype=np.float32)
    if not np.isfinite(features).all():
        bad_rows = np.flatnonzero(~np.isfinite(features).all(axis=1))
        raise ValueError(f"{source}: {bad_rows.size} of {features.shape[0]} clips hold NaN or infinite values "
                         f"(first clip {int(bad_rows[0])}); extract this video again")
    return features


def read_feature_pickle(path: Union[str, Path], channels: Optional[int] = None) -> np.ndarray:
    """Read and validate one per-video feature pickle; return float32 [num_clips, channels].

    Raises:
        FileNotFoundError: the file is missing.
        UnsafePickleError: the pickle names a global other than numpy arrays and builtin containers.
        ValueError: the file is truncated or not a pickle, has no 'feature' entry, or fails
            :func:`check_feature_array`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature file not found: {path}; {PICKLE_LAYOUT_HINT}")
    try:
        content = load_pickle(path)
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, ValueError, TypeError,
            KeyError, OverflowError, MemoryError) as error:
        raise ValueError(f"{path}: not a readable feature pickle ({type(error).__name__}: {error}); the file is "
                         "truncated or of another format, so copy or extract it again") from error
    if not isinstance(content, dict) or "feature" not in content:
        found = sorted(map(str, content)) if isinstance(content, dict) else type(content).__name__
        raise ValueError(f"{path}: expected a dict with a 'feature' array, got {found}")
    return check_feature_array(content["feature"], str(path), channels)


class PackedStore:
    """Read access to one packed split folder (``features.npy`` and ``index.json``).

    The array is memory-mapped on first use and not pickled with the object, so a DataLoader worker
    opens its own map.
    """

    def __init__(self, folder: Union[str, Path]) -> None:
        self.folder = Path(folder)
        self.index_path = self.folder / PACKED_INDEX
        self.features_path = self.folder / PACKED_FEATURES
        try:
            index = json.loads(self.index_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{self.index_path}: unreadable packed index ({error}); run "
                             "scripts/pack_features.py again") from error
        if not isinstance(index, dict) or index.get("format") != PACKED_FORMAT or "videos" not in index:
            raise ValueError(f"{self.index_path}: not an index of {PACKED_FORMAT}; run scripts/pack_features.py "
                             "again or remove the file to read the per-video pickles")
        if index.get("version") != PACKED_VERSION:
            raise ValueError(f"{self.index_path}: packed store version {index.get('version')}, this code reads "
                             f"version {PACKED_VERSION}; run scripts/pack_features.py again")
        self.channels = int(index["channels"])
        self.total_clips = int(index["total_clips"])
        self.videos: dict[str, tuple[int, int]] = {name: (int(span[0]), int(span[1]))
                                                   for name, span in index["videos"].items()}
        self._array: Optional[np.ndarray] = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_array"] = None
        return state

    @property
    def array(self) -> np.ndarray:
        """The memory-mapped float32 [total_clips, channels] array."""
        if self._array is None:
            if not self.features_path.is_file():
                raise FileNotFoundError(f"packed features not found: {self.features_path} (listed by "
                                        f"{self.index_path}); run scripts/pack_features.py again")
            array = np.load(self.features_path, mmap_mode="r", allow_pickle=False)
            if array.shape != (self.total_clips, self.channels) or array.dtype != np.float32:
                raise ValueError(f"{self.features_path}: shape {array.shape} {array.dtype} does not match "
                                 f"{self.index_path} ({self.total_clips}, {self.channels}) float32; the store was "
                                 "left half-written, so run scripts/pack_features.py again")
            self._array = array
        return self._array

    def num_clips(self, video_name: str) -> int:
        return self.videos[video_name][1]

    def load(self, video_name: str) -> np.ndarray:
        """Copy the clips of one video out of the map: float32 [num_clips, channels]."""
        offset, length = self.videos[video_name]
        return np.array(self.array[offset:offset + length], dtype=np.float32)


class FeatureReader:
    """Reader of the features of one stream (domain-agnostic or domain-aware) in one subset folder.

    The layout is detected once, at construction: ``<root>/<subset>/index.json`` selects the
    packed store, otherwise per-video pickles are read.
    """

    def __init__(self, root: Union[str, Path], subset: str, channels: Optional[int] = None) -> None:
        self.root = Path(root)
        self.subset = subset
        self.channels = channels  # expected width of one clip feature; None accepts any
        folder = self.root / subset
        self.packed: Optional[PackedStore] = PackedStore(folder) if (folder / PACKED_INDEX).is_file() else None
        if self.packed is not None and channels is not None and self.packed.channels != channels:
            raise ValueError(f"{self.packed.index_path}: clip features are {self.packed.channels}-d, expected "
                             f"{channels} (--video_input_dim)")

    def __repr__(self) -> str:
        layout = "packed" if self.packed is not None else "pickles"
        return f"FeatureReader(root={str(self.root)!r}, subset={self.subset!r}, layout={layout!r})"

    def path(self, video_name: str) -> Path:
        """Return the file that contains the video: its pickle, or the packed features array."""
        if self.packed is not None:
            return self.packed.features_path
        return self.root / self.subset / f"{video_name}.pkl"

    def describe(self, video_name: str) -> str:
        """Name the video's storage for messages: the pickle path, or ``features.npy[video_name]``."""
        if self.packed is not None:
            return f"{self.packed.features_path}[{video_name}]"
        return str(self.path(video_name))

    def exists(self, video_name: str) -> bool:
        if self.packed is not None:
            return video_name in self.packed.videos
        return self.path(video_name).is_file()

    def load(self, video_name: str) -> np.ndarray:
        """Load and validate the features of one video: float32 [num_clips, channels] (channels = 1024 for I3D).

        Raises:
            FileNotFoundError: the file (or the packed entry) is missing; the message names the expected layout.
            UnsafePickleError: the pickle names a global other than numpy arrays and builtin containers.
            ValueError: the file is unreadable or its array fails :func:`check_feature_array`.
        """
        if self.packed is None:
            return read_feature_pickle(self.path(video_name), self.channels)
        if video_name not in self.packed.videos:
            raise FileNotFoundError(f"video {video_name} not found in the packed store {self.packed.index_path}; "
                                    "pack the split again with this video")
        return check_feature_array(self.packed.load(video_name), self.describe(video_name), self.channels)


def diagnose_feature_root(root: Union[str, Path], subset: str, video_names: list[str]) -> str:
    """Guess why most feature files of a split are missing; return a hint sentence, or '' without a guess.

    It checks three causes on a few of ``video_names``. The root may be the split folder itself. The
    split folder may be missing while another folder under the root contains the files. Or the files
    may be in another split folder.
    """
    root = Path(root)
    sample = video_names[:20]

    def holds(folder: Path) -> bool:
        if (folder / PACKED_INDEX).is_file():
            return True
        return sum((folder / f"{name}.pkl").is_file() for name in sample) > len(sample) // 2

    if holds(root):
        return (f"The files are directly in {root}, which looks like the split folder itself: pass its parent "
                f"{root.parent} as the feature root (the code appends /{subset}).")
    candidates = []
    if root.is_dir():
        for child in sorted(root.iterdir()):
            if not child.is_dir() or child.name == subset:
                continue
            if holds(child / subset):
                candidates.append(f"{child} (it has {subset}/)")
            elif holds(child):
                candidates.append(f"{child} (as split folder {child.name}/)")
    if candidates:
        return f"Matching files were found under {', '.join(candidates[:3])}; point the feature root there."
    if not (root / subset).is_dir():
        return f"The folder {root / subset} does not exist; the feature root must contain one folder per split."
    return ""


@dataclass
class PackReport:
    """Outcome of :func:`pack_split`: counts and the skipped files as (video name, path, reason)."""

    folder: Path
    num_videos: int = 0
    num_clips: int = 0
    channels: Optional[int] = None
    invalid: list[tuple[str, str, str]] = field(default_factory=list)


def _progress(items: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit="file", mininterval=1.0)


def pack_split(
    src_root: Union[str, Path],
    split: str,
    dst_root: Union[str, Path],
    *,
    video_names: Optional[Iterable[str]] = None,
    channels: Optional[int] = 1024,
    skip_invalid: bool = False,
    progress: bool = True,
) -> PackReport:
    """Pack the per-video pickles ``<src_root>/<split>/*.pkl`` into ``<dst_root>/<split>/{features.npy, index.json}``.

    Each pickle is read once, with the restricted unpickler, and validated like :meth:`FeatureReader.load`.
    The features are concatenated as float32 [total_clips, channels] in the order of ``video_names``
    (default: the sorted file names). Both files are written under temporary names and renamed into
    place, the index last, so a reader never pairs a half-written array with a fresh index. A store
    whose two files disagree is rejected on load.

    Args:
        src_root: feature root of the per-video pickles.
        split: subset folder, e.g. ``train``.
        dst_root: root of the packed store; may equal ``src_root`` (the pickles stay in place).
        video_names: the videos to pack; default every ``*.pkl`` in the folder.
        channels: expected feature width (1024 for I3D); None takes the first file's width.
        skip_invalid: leave out invalid files and list them in the report instead of raising.
        progress: show a tqdm bar.

    Raises:
        FileNotFoundError: the source folder is missing, or a named video has no file (unless skip_invalid).
        ValueError: a file is invalid (unless ``skip_invalid``), or no valid video is left.
    """
    src_folder = Path(src_root) / split
    dst_folder = Path(dst_root) / split
    if not src_folder.is_dir():
        raise FileNotFoundError(f"feature folder not found: {src_folder}; {PICKLE_LAYOUT_HINT}")
    names = sorted(path.stem for path in src_folder.glob("*.pkl")) if video_names is None else list(video_names)
    if len(set(names)) != len(names):
        raise ValueError(f"video_names lists some videos twice; pack each video of {src_folder} once")
    if not names:
        raise ValueError(f"no *.pkl feature files in {src_folder}")

    dst_folder.mkdir(parents=True, exist_ok=True)
    report = PackReport(folder=dst_folder, channels=channels)
    suffix = f".tmp-{os.getpid()}"
    features_tmp = dst_folder / (PACKED_FEATURES + suffix)
    index_tmp = dst_folder / (PACKED_INDEX + suffix)
    videos: dict[str, list[int]] = {}
    try:
        with features_tmp.open("wb") as handle:
            # The header is written for zero rows and rewritten at the end. numpy pads the header so
            # that the row count can grow to 21 digits without moving the data.
            header_size = None
            for name in _progress(names, len(names), f"packing {src_folder}", progress):
                path = src_folder / f"{name}.pkl"
                try:
                    features = read_feature_pickle(path, report.channels)
                except (FileNotFoundError, ValueError) as error:  # UnsafePickleError is a ValueError too
                    if not skip_invalid:
                        raise
                    logger.warning("skipping %s: %s", path, error)
                    report.invalid.append((name, str(path), str(error)))
                    continue
                if header_size is None:
                    report.channels = features.shape[1]
                    header_size = _write_npy_header(handle, (0, report.channels))
                handle.write(np.ascontiguousarray(features, dtype="<f4").tobytes())
                videos[name] = [report.num_clips, features.shape[0]]
                report.num_clips += features.shape[0]
            if header_size is None:
                raise ValueError(f"no valid feature file in {src_folder}; {len(report.invalid)} invalid")
            handle.seek(0)
            if _write_npy_header(handle, (report.num_clips, report.channels)) != header_size:
                raise RuntimeError(f"{features_tmp}: the .npy header changed size; the store is too large")
            handle.flush()
            os.fsync(handle.fileno())

        report.num_videos = len(videos)
        index = {
            "format": PACKED_FORMAT,
            "version": PACKED_VERSION,
            "dtype": "float32",
            "channels": report.channels,
            "total_clips": report.num_clips,
            "source": str(src_folder),
            "videos": videos,
        }
        index_tmp.write_text(json.dumps(index), encoding="utf-8")
        os.replace(features_tmp, dst_folder / PACKED_FEATURES)
        os.replace(index_tmp, dst_folder / PACKED_INDEX)
    finally:
        for leftover in (features_tmp, index_tmp):
            leftover.unlink(missing_ok=True)
    logger.info("packed %d videos (%d clips, %d-d float32) from %s into %s; %d invalid files skipped",
                report.num_videos, report.num_clips, report.channels, src_folder, dst_folder, len(report.invalid))
    return report


def _write_npy_header(handle, shape: tuple[int, int]) -> int:
    """Write a version 1.0 .npy header for little-endian float32 C-order data; return its size in bytes."""
    start = handle.tell()
    np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return handle.tell() - start


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
