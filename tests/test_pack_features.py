"""The packed feature store: packing, reading through FeatureReader, atomic writes and bad inputs."""

import importlib
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from dataloaders.features import PACKED_FEATURES, PACKED_INDEX, FeatureReader, pack_split
from dataloaders.retrieval import EvalVideoDataset
from dataloaders.annotations import SentenceRecord, VideoRecord
from dataloaders.validation import read_invalid_list

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_video(root: Path, split: str, name: str, content: object) -> Path:
    path = root / split / f"{name}.pkl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        pickle.dump(content, handle)
    return path


@pytest.fixture()
def pickles(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    generator = np.random.default_rng(0)
    videos = {f"v{i}": generator.standard_normal((1 + 3 * i, 8)).astype(np.float32) for i in range(4)}
    root = tmp_path / "src"
    for name, features in videos.items():
        write_video(root, "train", name, {"feature": features, "name": f"{name}.mp4"})
    return root, videos


def test_pack_round_trip(pickles, tmp_path: Path) -> None:
    root, videos = pickles
    report = pack_split(root, "train", tmp_path / "dst", channels=8, progress=False)

    assert report.num_videos == 4
    assert report.num_clips == sum(len(features) for features in videos.values()) == 22
    packed = FeatureReader(tmp_path / "dst", "train", channels=8)
    plain = FeatureReader(root, "train", channels=8)
    assert packed.packed is not None
    assert plain.packed is None
    for name, features in videos.items():
        assert packed.exists(name)
        loaded = packed.load(name)
        assert loaded.dtype == np.float32
        np.testing.assert_array_equal(loaded, features)
        np.testing.assert_array_equal(loaded, plain.load(name))
    assert not packed.exists("v9")
    with pytest.raises(FileNotFoundError, match="v9 not found in the packed store"):
        packed.load("v9")


def test_pack_files_are_plain(pickles, tmp_path: Path) -> None:
    root, videos = pickles
    pack_split(root, "train", tmp_path / "dst", channels=8, progress=False)
    folder = tmp_path / "dst" / "train"

    array = np.load(folder / PACKED_FEATURES, allow_pickle=False)
    index = json.loads((folder / PACKED_INDEX).read_text())
    assert array.shape == (22, 8)
    assert array.dtype == np.float32
    assert index["total_clips"] == 22
    assert index["channels"] == 8
    offset, length = index["videos"]["v2"]
    np.testing.assert_array_equal(array[offset:offset + length], videos["v2"])
    assert sorted(path.name for path in folder.iterdir()) == [PACKED_FEATURES, PACKED_INDEX]


def test_pack_in_place_read_instead(pickles) -> None:
    root, videos = pickles
    pack_split(root, "train", root, channels=8, progress=False)
    reader = FeatureReader(root, "train")
    assert reader.packed is not None
    assert reader.describe("v1").endswith(f"{PACKED_FEATURES}[v1]")
    np.testing.assert_array_equal(reader.load("v1"), videos["v1"])


def test_pack_rejects_invalid(pickles, tmp_path: Path) -> None:
    root, _ = pickles
    write_video(root, "train", "v_nan", {"feature": np.full((2, 8), np.nan, dtype=np.float32)})
    with pytest.raises(ValueError, match="v_nan.pkl: 2 of 2 clips hold NaN"):
        pack_split(root, "train", tmp_path / "dst", channels=8, progress=False)
    assert not (tmp_path / "dst" / "train" / PACKED_INDEX).exists()
    assert list((tmp_path / "dst" / "train").iterdir()) == []


def test_pack_skip_invalid_lists(pickles, tmp_path: Path) -> None:
    root, videos = pickles
    write_video(root, "train", "v_narrow", {"feature": np.ones((2, 4), dtype=np.float32)})
    (root / "train" / "v_cut.pkl").write_bytes(b"\x80\x04\x95")
    report = pack_split(root, "train", tmp_path / "dst", channels=8, skip_invalid=True, progress=False)

    assert report.num_videos == 4
    assert sorted(name for name, _, _ in report.invalid) == ["v_cut", "v_narrow"]
    assert not FeatureReader(tmp_path / "dst", "train").exists("v_narrow")


def test_pack_failure_keeps_old_store(pickles, tmp_path: Path) -> None:
    root, videos = pickles
    pack_split(root, "train", tmp_path / "dst", channels=8, progress=False)
    write_video(root, "train", "v_bad", {"feature": np.ones((0, 8), dtype=np.float32)})
    with pytest.raises(ValueError):
        pack_split(root, "train", tmp_path / "dst", channels=8, progress=False)

    reader = FeatureReader(tmp_path / "dst", "train", channels=8)
    np.testing.assert_array_equal(reader.load("v3"), videos["v3"])
    assert sorted(p.name for p in (tmp_path / "dst" / "train").iterdir()) == [PACKED_FEATURES, PACKED_INDEX]


def test_packed_store_mismatch_detected(pickles, tmp_path: Path) -> None:
    root, _ = pickles
    pack_split(root, "train", tmp_path / "dst", channels=8, progress=False)
    np.save(tmp_path / "dst" / "train" / PACKED_FEATURES, np.zeros((5, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="does not match"):
        FeatureReader(tmp_path / "dst", "train").load("v0")


def test_packed_store_wrong_channels(pickles, tmp_path: Path) -> None:
    root, _ = pickles
    pack_split(root, "train", tmp_path / "dst", channels=8, progress=False)
    with pytest.raises(ValueError, match="8-d, expected 1024"):
        FeatureReader(tmp_path / "dst", "train", channels=1024)


def test_packed_dataset_in_workers(pickles, tmp_path: Path) -> None:
    """A dataset over a packed store survives pickling into DataLoader workers and matches the pickles."""
    import torch

    root, videos = pickles
    pack_split(root, "train", tmp_path / "dst", channels=8, progress=False)
    records = [SentenceRecord(f"s{i}", f"text {i}", [VideoRecord(name, None)]) for i, name in enumerate(videos)]
    packed = FeatureReader(tmp_path / "dst", "train")
    packed.load("v0")  # opens the map before the dataset is sent to the workers
    plain = FeatureReader(root, "train")
    expected = EvalVideoDataset(records, plain, plain, alpha=0.5, feature_len=4)
    dataset = EvalVideoDataset(records, packed, packed, alpha=0.5, feature_len=4)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1)
    batches = list(loader)
    for index in range(len(videos)):
        batch = batches[index // 2]
        torch.testing.assert_close(batch["video"][index % 2], expected[index]["video"], rtol=0, atol=0)


def test_pack_script_cli(pickles, tmp_path: Path, capsys) -> None:
    root, _ = pickles
    write_video(root, "train", "v_inf", {"feature": np.full((2, 8), np.inf, dtype=np.float32)})
    if str(REPO_ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / "scripts"))
    script = importlib.import_module("pack_features")
    code = script.main(["--src", str(root), "--dst", str(tmp_path / "dst"), "--splits", "train", "dev",
                        "--channels", "8", "--skip_invalid", "--no_progress"])

    assert code == 0
    output = capsys.readouterr().out
    assert "train: 4 videos, 22 clips of 8 channels" in output
    assert "dev: no folder" in output
    rows = read_invalid_list(tmp_path / "dst" / "train" / "invalid_items.tsv")
    assert [row["video_name"] for row in rows] == ["v_inf"]
    assert "NaN or infinite" in rows[0]["reason"]


def test_pack_script_invalid_message(pickles, tmp_path: Path, capsys) -> None:
    root, _ = pickles
    (root / "train" / "v_cut.pkl").write_bytes(b"\x80\x04\x95")
    if str(REPO_ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / "scripts"))
    script = importlib.import_module("pack_features")
    code = script.main(["--src", str(root), "--dst", str(tmp_path / "dst"), "--splits", "train",
                        "--channels", "8", "--no_progress"])

    assert code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: train: ")
    assert str(root / "train" / "v_cut.pkl") in error
    assert "--skip_invalid" in error
