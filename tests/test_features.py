import pickle
from pathlib import Path

import numpy as np
import pytest

from dataloaders.features import FeatureReader, fuse_streams, sample_clips
from dataloaders.safe_pickle import UnsafePickleError, loads_pickle


def write_features(root: Path, subset: str, video_name: str, content: object) -> Path:
    path = root / subset / f"{video_name}.pkl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        pickle.dump(content, handle)
    return path


def row_indexed(num_clips: int, channels: int = 3) -> np.ndarray:
    """Features whose every entry equals its row index plus one, so zero padding stays distinguishable."""
    return np.repeat(np.arange(1, num_clips + 1, dtype=np.float32)[:, None], channels, axis=1)


def test_reader_path_and_load(tmp_path: Path) -> None:
    features = np.arange(6, dtype=np.float64).reshape(3, 2)
    written = write_features(tmp_path, "test", "clip_a", {"name": "/videos/a.mp4", "feature": features})
    reader = FeatureReader(tmp_path, "test")

    assert reader.path("clip_a") == written
    assert reader.exists("clip_a")
    loaded = reader.load("clip_a")
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, features)


def test_reader_missing_file(tmp_path: Path) -> None:
    reader = FeatureReader(tmp_path, "train")
    with pytest.raises(FileNotFoundError) as error:
        reader.load("absent")
    message = str(error.value)
    assert str(tmp_path / "train" / "absent.pkl") in message
    assert "<subset>/<video_name>.pkl" in message


@pytest.mark.parametrize(
    "content", [{"feat": np.zeros((2, 4))}, {"feature": np.zeros(4)}, {"feature": np.zeros((0, 4))}]
)
def test_reader_invalid_content(tmp_path: Path, content: dict) -> None:
    write_features(tmp_path, "train", "bad", content)
    with pytest.raises(ValueError, match="bad.pkl"):
        FeatureReader(tmp_path, "train").load("bad")


def test_fuse_streams_weights_agnostic() -> None:
    agnostic = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    aware = np.array([[10.0, 20.0], [30.0, 40.0]], dtype=np.float32)
    fused = fuse_streams(agnostic, aware, alpha=0.8)

    expected = np.array([[0.2 * 10 + 0.8 * 1, 0.2 * 20 + 0.8 * 2],
                         [0.2 * 30 + 0.8 * 3, 0.2 * 40 + 0.8 * 4]])
    assert fused.dtype == np.float32
    np.testing.assert_allclose(fused, expected, rtol=1e-6)
    np.testing.assert_array_equal(fuse_streams(agnostic, aware, alpha=1.0), agnostic)
    np.testing.assert_array_equal(fuse_streams(agnostic, aware, alpha=0.0), aware)


def test_fuse_streams_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(4, 2\)"):
        fuse_streams(np.zeros((3, 2)), np.zeros((4, 2)), alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        fuse_streams(np.zeros((3, 2)), np.zeros((3, 2)), alpha=1.5)


def test_sample_clips_pads_short_video() -> None:
    video, mask = sample_clips(row_indexed(3), feature_len=5)

    assert video.shape == (5, 3)
    assert video.dtype == np.float32
    np.testing.assert_array_equal(video[:, 0], [1, 2, 3, 0, 0])
    assert mask.dtype == np.int64
    np.testing.assert_array_equal(mask, [0, 1, 1, 1, 0, 0])


@pytest.mark.parametrize(
    ("num_clips", "expected_rows"),
    [
        (8, [0, 1, 2, 3, 4, 5, 6, 7]),
        # 63 / 7 = 9 exactly.
        (64, [0, 9, 18, 27, 36, 45, 54, 63]),
        # 99 / 7 = 14.142857..., floored: 14.14, 28.29, 42.43, 56.57, 70.71, 84.86.
        (100, [0, 14, 28, 42, 56, 70, 84, 99]),
    ],
)
def test_sample_clips_uniform_rows(num_clips: int, expected_rows: list[int]) -> None:
    video, mask = sample_clips(row_indexed(num_clips), feature_len=8)

    np.testing.assert_array_equal(video[:, 0], np.array(expected_rows) + 1)
    np.testing.assert_array_equal(mask, [0] + [1] * 8)


def test_sample_clips_rejects_empty() -> None:
    with pytest.raises(ValueError, match="num_clips"):
        sample_clips(np.zeros((0, 3), dtype=np.float32), feature_len=4)


def test_truncated_pickle_names_the_file(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "broken.pkl").write_bytes(pickle.dumps({"feature": np.ones((3, 4), dtype=np.float32)})[:20])
    with pytest.raises(ValueError, match="broken.pkl: not a readable feature pickle"):
        FeatureReader(tmp_path, "train").load("broken")


def test_wrong_channel_count_rejected(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    with open(folder / "narrow.pkl", "wb") as handle:
        pickle.dump({"feature": np.ones((3, 512), dtype=np.float32)}, handle)
    with pytest.raises(ValueError, match="512-d, expected 1024"):
        FeatureReader(tmp_path, "train", channels=1024).load("narrow")
    assert FeatureReader(tmp_path, "train").load("narrow").shape == (3, 512)


class _CreatesMarker:
    """Unpickling this object would call os.system and create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


class _ExecsCode:
    """Unpickling this object would run Python code through builtins.exec."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("payload", [_CreatesMarker, _ExecsCode])
def test_malicious_pickle_rejected(tmp_path: Path, payload) -> None:
    marker = tmp_path / "marker"
    path = write_features(tmp_path, "train", "evil", {"feature": payload(marker)})
    with pytest.raises(UnsafePickleError) as error:
        FeatureReader(tmp_path, "train").load("evil")
    assert str(path) in str(error.value)
    assert "rejected the global" in str(error.value)
    assert not marker.exists()


def test_restricted_unpickler_reads_numpy_pickles() -> None:
    content = {"feature": np.arange(12, dtype=np.float32).reshape(3, 4), "fps": np.float64(25.0),
               "num_frames": np.int64(18), "name": "a.mp4", "shape": (3, 4), "tags": ["x"], "raw": b"\x00\xff"}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        loaded = loads_pickle(pickle.dumps(content, protocol=protocol))
        np.testing.assert_array_equal(loaded["feature"], content["feature"])
        assert loaded["feature"].dtype == np.float32
        assert loaded["fps"] == 25.0
        assert loaded["num_frames"] == 18
        assert loaded["name"] == "a.mp4"
        assert loaded["shape"] == (3, 4)
        assert loaded["raw"] == b"\x00\xff"


def test_numpy1_global_names_accepted() -> None:
    # numpy 1.x writes numpy.core.multiarray; build such a pickle by renaming the numpy 2.x module.
    data = pickle.dumps({"feature": np.ones((2, 3), dtype=np.float32)}, protocol=2)
    legacy = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert legacy != data
    np.testing.assert_array_equal(loads_pickle(legacy)["feature"], np.ones((2, 3)))


@pytest.mark.parametrize("bad, fragment", [
    (np.array([[1.0, np.nan]], dtype=np.float32), "1 of 1 clips hold NaN or infinite values"),
    (np.array([[1.0, 2.0], [np.inf, 0.0]], dtype=np.float32), "(first clip 1)"),
    (np.array([["a", "b"]]), "numeric numpy array"),
    ([[1.0, 2.0]], "numeric numpy array, got list"),
])
def test_reader_rejects_values(tmp_path: Path, bad, fragment: str) -> None:
    write_features(tmp_path, "train", "bad", {"feature": bad})
    with pytest.raises(ValueError) as error:
        FeatureReader(tmp_path, "train").load("bad")
    assert "bad.pkl" in str(error.value)
    assert fragment in str(error.value)
