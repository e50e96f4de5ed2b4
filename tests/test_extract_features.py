"""Tests of scripts/extract_features.py with a small random I3D on the real clips of the shared data."""

import importlib
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dataloaders.features import FeatureReader
from modules.i3d import InceptionI3d

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
extract = importlib.import_module("extract_features")

CLIPS = {
    "_fZbAxSSbX4_0-5-rgb_front": "videos/how2sign/_fZbAxSSbX4_0-5-rgb_front.mp4",
    "25October_2010_Monday_tagesschau-17": "videos/phoenix-2014t/25October_2010_Monday_tagesschau-17",
    "signer0_sample1000_color": "videos/autsl/signer0_sample1000_color.mp4",
    "test_video": "videos/pose-test/test_video.mp4",
}
# A width of 1/16 and 32 x 32 crops keep the network at 64-d features and a few milliseconds per window.
TINY = ["--random_init", "--width_mult", "0.0625", "--resize", "36", "--crop", "32", "--batch_size", "8",
        "--device", "cpu"]


def _count_frames(path: Path) -> int:
    """Count frames independently of the reader: decode a file to the end, or count a folder's images."""
    if path.is_dir():
        return len(list(path.glob("*.png")))
    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count


def _list_file(shared_data: Path, folder: Path) -> Path:
    listing = folder / "videos.txt"
    listing.write_text("# real clips\n" + "".join(f"{shared_data / path}\t{name}\n" for name, path in CLIPS.items()))
    return listing


@pytest.fixture(scope="module")
def extracted(shared_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("extract")
    root = folder / "features"
    outcomes = extract.main([str(_list_file(shared_data, folder)), "--split", "test", "--features_root", str(root),
                             *TINY])
    return root, outcomes


def test_clips_per_video(shared_data, extracted):
    root, outcomes = extracted
    reader = FeatureReader(root, "test")
    assert sorted(outcome.name for outcome in outcomes) == sorted(CLIPS)
    for name, relative in CLIPS.items():
        frames = _count_frames(shared_data / relative)
        features = reader.load(name)
        assert features.shape == (max(1, frames - 15), 64), name
        assert features.dtype == np.float32
        assert np.isfinite(features).all()


def test_rerun_skips_files(shared_data, extracted, capsys):
    root, _ = extracted
    paths = sorted((root / "test").glob("*.pkl"))
    assert len(paths) == len(CLIPS)
    stamps = {path: path.stat().st_mtime_ns for path in paths}
    outcomes = extract.main([str(_list_file(shared_data, root.parent)), "--split", "test", "--features_root",
                             str(root), *TINY])
    assert {outcome.status for outcome in outcomes} == {"skipped"}
    assert {path: path.stat().st_mtime_ns for path in paths} == stamps
    assert "0 extracted, 4 skipped, 0 failed" in capsys.readouterr().out
    assert not list((root / "test").glob(".*.tmp"))


def _reference_windows(model: InceptionI3d, frames: np.ndarray) -> np.ndarray:
    """Embed each 16-frame window one at a time, padding a short video with its last frame."""
    frames = list(frames)
    while len(frames) < 16:
        frames.append(frames[-1])
    rows = []
    for start in range(len(frames) - 15):
        window = torch.from_numpy(np.stack(frames[start:start + 16])).float()  # [16, H, W, 3]
        clip = window.permute(3, 0, 1, 2) / 255.0 - 0.5  # [3, 16, H, W]
        with torch.no_grad():
            rows.append(model.embed(clip[None])[0])
    return torch.stack(rows).numpy()


@pytest.mark.parametrize("num_frames", [1, 5, 16, 19])
def test_windows_match_loop(num_frames):
    torch.manual_seed(0)
    model = InceptionI3d(width_mult=1 / 16).eval()
    frames = np.random.default_rng(num_frames).integers(0, 256, size=(num_frames, 32, 32, 3), dtype=np.uint8)
    features = extract.extract_video_features(model, frames, batch_size=3, device=torch.device("cpu"))
    expected = _reference_windows(model, frames)
    assert features.shape == (max(1, num_frames - 15), model.embed_dim)
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)


def test_center_crop_region():
    frames = np.arange(1 * 6 * 8 * 3, dtype=np.uint8).reshape(1, 6, 8, 3)
    np.testing.assert_array_equal(extract.center_crop(frames, 4), frames[:, 1:5, 2:6])
    with pytest.raises(ValueError, match="smaller"):
        extract.center_crop(frames, 7)


def test_corrupt_video_reported(shared_data, tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "broken.mp4").write_bytes(b"not a video" * 50)
    os.symlink(shared_data / CLIPS["test_video"], videos / "test_video.mp4")
    root = tmp_path / "features"
    with pytest.raises(SystemExit, match="1 of 2 videos failed"):
        extract.main([str(videos), "--split", "train", "--features_root", str(root), *TINY])
    output = capsys.readouterr().out
    assert "broken" in output
    assert "1 extracted, 0 skipped, 1 failed" in output
    assert (root / "train" / "test_video.pkl").is_file()
    assert not (root / "train" / "broken.pkl").exists()


def test_packed_store_written(shared_data, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    os.symlink(shared_data / CLIPS["25October_2010_Monday_tagesschau-17"], videos / "ph_video")
    root, packed = tmp_path / "features", tmp_path / "packed"
    extract.main([str(videos), "--split", "dev", "--features_root", str(root), "--packed", str(packed), *TINY])
    from_pickle = FeatureReader(root, "dev").load("ph_video")
    store = FeatureReader(packed, "dev")
    assert store.packed is not None
    np.testing.assert_array_equal(store.load("ph_video"), from_pickle)


def test_checkpoint_or_random_init_required(tmp_path):
    with pytest.raises(SystemExit):
        extract.parse_args([str(tmp_path), "--split", "test", "--features_root", str(tmp_path)])


def test_duplicate_names_rejected(tmp_path):
    (tmp_path / "a").mkdir()
    cv2.imwrite(str(tmp_path / "a" / "0001.png"), np.zeros((4, 4, 3), dtype=np.uint8))
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'a'}\tsame\n{tmp_path / 'a'}\tsame\n")
    with pytest.raises(ValueError, match="same.pkl"):
        extract.list_videos(listing)


def test_single_video_inputs(shared_data):
    video_file = shared_data / CLIPS["test_video"]
    assert [(job.name, job.source) for job in extract.list_videos(video_file)] == [("test_video", video_file)]
    frame_folder = shared_data / CLIPS["25October_2010_Monday_tagesschau-17"]
    jobs = extract.list_videos(frame_folder)
    assert [(job.name, job.source) for job in jobs] == [("25October_2010_Monday_tagesschau-17", frame_folder)]


def test_nested_folder_message(shared_data, tmp_path, capsys):
    # The shared videos folder has one sub-folder per dataset and no video directly inside it.
    with pytest.raises(SystemExit) as error:
        extract.main([str(shared_data / "videos"), "--split", "test", "--features_root", str(tmp_path), *TINY])
    assert str(error.value).startswith(f"error: no videos in {shared_data / 'videos'}")
    assert "list file" in str(error.value)
    assert not (tmp_path / "test").exists()


def test_missing_checkpoint_message(shared_data, tmp_path):
    video = shared_data / CLIPS["test_video"]
    with pytest.raises(SystemExit) as error:
        extract.main([str(video), "--split", "test", "--features_root", str(tmp_path),
                      "--i3d_checkpoint", str(tmp_path / "absent.pth.tar")])
    assert str(error.value).startswith(f"error: I3D checkpoint not found: {tmp_path / 'absent.pth.tar'}")
