"""Tests of dataloaders/video.py on real sign clips and on files written here."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from dataloaders.video import VideoReadError, frame_files, is_video_source, read_video, resize_short_side

HOW2SIGN = Path("videos/how2sign/_fZbAxSSbX4_0-5-rgb_front.mp4")
PHOENIX = Path("videos/phoenix-2014t/25October_2010_Monday_tagesschau-17")
AUTSL = Path("videos/autsl/signer0_sample1000_color.mp4")
POSE_TEST = Path("videos/pose-test/test_video.mp4")

# (path, frames, fps, height, width) as documented with the shared clips.
REAL_CLIPS = [
    (HOW2SIGN, 47, 24.0, 720, 1280),
    (AUTSL, 43, 30.0, 512, 512),
    (POSE_TEST, 58, 29.9, 720, 540),
]


def _write_avi(path: Path, colours_bgr: list, fps: float = 10.0, size=(32, 24)) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened()
    for colour in colours_bgr:
        writer.write(np.full((size[1], size[0], 3), colour, dtype=np.uint8))
    writer.release()


@pytest.mark.parametrize("relative, frames, fps, height, width", REAL_CLIPS)
def test_read_real_clip(shared_data, relative, frames, fps, height, width):
    video = read_video(shared_data / relative)
    assert video.frames.dtype == np.uint8
    assert video.frames.shape == (frames, height, width, 3)
    assert video.num_frames == frames
    assert video.fps == pytest.approx(fps, abs=0.1)
    assert video.source == shared_data / relative


def test_read_resizes_short_side(shared_data):
    video = read_video(shared_data / HOW2SIGN, short_side=36)
    assert video.frames.shape == (47, 36, 64, 3)  # 1280 * 36 / 720 = 64


def test_read_frame_folder_phoenix(shared_data):
    folder = shared_data / PHOENIX
    video = read_video(folder)
    assert video.frames.shape == (2, 260, 210, 3)
    assert video.fps == 25.0
    assert read_video(folder, fps=30.0).fps == 30.0
    first = cv2.cvtColor(cv2.imread(str(folder / "images0001.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(video.frames[0], first)


def test_read_returns_rgb(tmp_path):
    path = tmp_path / "red.avi"
    _write_avi(path, [(0, 0, 255)] * 5)  # pure red in OpenCV's BGR order
    video = read_video(path)
    assert video.num_frames == 5
    assert video.fps == 10.0
    red, green, blue = video.frames[..., 0].mean(), video.frames[..., 1].mean(), video.frames[..., 2].mean()
    assert red > 200
    assert green < 50
    assert blue < 50


def test_frame_folder_numeric_order(tmp_path):
    # Lexicographic order would put images10 before images2.
    for number in (1, 2, 10):
        cv2.imwrite(str(tmp_path / f"images{number}.png"), np.full((4, 6, 3), number, dtype=np.uint8))
    assert [path.name for path in frame_files(tmp_path)] == ["images1.png", "images2.png", "images10.png"]
    video = read_video(tmp_path)
    assert video.frames[:, 0, 0, 0].tolist() == [1, 2, 10]


def test_frame_folder_csl_names(tmp_path):
    for number in range(3):
        cv2.imwrite(str(tmp_path / f"{number:06d}.jpg"), np.zeros((8, 8, 3), dtype=np.uint8))
    assert read_video(tmp_path).num_frames == 3
    assert is_video_source(tmp_path)


@pytest.mark.parametrize("content", [b"", b"not a video at all" * 100, b"\x00\x00\x00\x18ftypmp42" + bytes(500)])
def test_corrupt_file_raises(tmp_path, content):
    path = tmp_path / "broken.mp4"
    path.write_bytes(content)
    with pytest.raises(VideoReadError, match="broken.mp4"):
        read_video(path)


def test_truncated_real_clip_raises(shared_data, tmp_path):
    path = tmp_path / "truncated.mp4"
    path.write_bytes((shared_data / HOW2SIGN).read_bytes()[:2000])
    with pytest.raises(VideoReadError, match="truncated.mp4"):
        read_video(path)


def test_missing_path_raises(tmp_path):
    with pytest.raises(VideoReadError, match="nothing.mp4"):
        read_video(tmp_path / "nothing.mp4")


def test_empty_folder_raises(tmp_path):
    with pytest.raises(VideoReadError, match="no frame images"):
        read_video(tmp_path)


def test_unreadable_frame_raises(tmp_path):
    cv2.imwrite(str(tmp_path / "images0001.png"), np.zeros((4, 4, 3), dtype=np.uint8))
    (tmp_path / "images0002.png").write_bytes(b"garbage")
    with pytest.raises(VideoReadError, match="images0002.png"):
        read_video(tmp_path)


def test_duplicate_frame_numbers_raise(tmp_path):
    for name in ("images01.png", "images1.png"):
        cv2.imwrite(str(tmp_path / name), np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(VideoReadError, match="frame number 1"):
        read_video(tmp_path)


def test_frame_sizes_must_match(tmp_path):
    cv2.imwrite(str(tmp_path / "0.png"), np.zeros((4, 4, 3), dtype=np.uint8))
    cv2.imwrite(str(tmp_path / "1.png"), np.zeros((5, 4, 3), dtype=np.uint8))
    with pytest.raises(VideoReadError, match="differ in size"):
        read_video(tmp_path)


def test_resize_short_side_keeps_aspect():
    frame = np.zeros((100, 300, 3), dtype=np.uint8)
    assert resize_short_side(frame, 50).shape == (50, 150, 3)
    assert resize_short_side(frame, 200).shape == (200, 600, 3)
    assert resize_short_side(frame, 100) is frame
