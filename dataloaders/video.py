"""Reading sign-language videos into RGB frames with OpenCV.

Two sources are accepted:
- a video file that OpenCV's FFmpeg backend decodes (mp4, avi, mkv, ...);
- a folder of frame images in the datasets' layouts, such as PHOENIX-2014T
  ``<split>/<video id>/images0001.png`` or CSL-Daily ``<video id>/000000.jpg``. The frames are
  ordered by the number in their file name, so ``images10.png`` follows ``images9.png``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import cv2
import numpy as np

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")

# PHOENIX-2014T and CSL-Daily frame folders were turned into 25 fps videos for feature extraction.
DEFAULT_FOLDER_FPS = 25.0

_FRAME_NUMBER = re.compile(r"(\d+)(?!.*\d)")


class VideoReadError(RuntimeError):
    """Raised when a video file or frame folder is missing, empty, corrupt or unreadable."""


@dataclass
class DecodedVideo:
    """The decoded frames of one video.

    Attributes:
        frames: uint8 RGB array [T, H, W, 3].
        fps: frames per second, read from the container or given by the caller for frame folders.
        num_frames: T, the number of decoded frames.
        source: the file or folder that was read.
    """

    frames: np.ndarray
    fps: float
    num_frames: int
    source: Path


def is_video_source(path: Union[str, Path]) -> bool:
    """Return True for a video file with a known extension or a folder that contains frame images."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() in VIDEO_EXTENSIONS
    if path.is_dir():
        return any(child.suffix.lower() in IMAGE_EXTENSIONS for child in path.iterdir() if child.is_file())
    return False


def resize_short_side(frame: np.ndarray, short_side: int) -> np.ndarray:
    """Resize an [H, W, 3] frame so that its shorter side is ``short_side`` pixels, keeping the aspect ratio.

    Shrinking uses area interpolation, which averages the source pixels and so does not alias;
    enlarging uses bilinear interpolation.
    """
    height, width = frame.shape[:2]
    if min(height, width) == short_side:
        return frame
    scale = short_side / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # cv2 takes (width, height)
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(frame, size, interpolation=interpolation)


def _stack_frames(frames: list[np.ndarray], source: Path) -> np.ndarray:
    shapes = {frame.shape for frame in frames}
    if len(shapes) > 1:
        raise VideoReadError(f"{source}: frames differ in size {sorted(shapes)}; resize them to one size first")
    return np.stack(frames)


def _read_video_file(path: Path, short_side: Optional[int]) -> tuple[np.ndarray, float]:
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise VideoReadError(f"{path}: OpenCV cannot open this video; the file is corrupt or its codec is "
                                 "not supported. Re-encode it, for example with ffmpeg to H.264 mp4.")
        fps = float(capture.get(cv2.CAP_PROP_FPS))
        reported_frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        frames = []
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frame = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            frames.append(frame if short_side is None else resize_short_side(frame, short_side))
    finally:
        capture.release()

    if not frames:
        raise VideoReadError(f"{path}: no frame could be decoded; the video is empty or corrupt")
    if reported_frames > 0 and reported_frames != len(frames):
        # Containers often store an estimate, so the decoded count is the one that is used.
        logger.warning("%s: the container reports %d frames but %d were decoded", path, reported_frames, len(frames))
    if not fps > 0:
        raise VideoReadError(f"{path}: the container stores no valid frame rate ({fps}); re-encode the video")
    return _stack_frames(frames, path), fps


def frame_files(folder: Union[str, Path]) -> list[Path]:
    """List the frame images of a folder, ordered by the last number in their file names.

    Raises:
        VideoReadError: the folder has no images, an image name has no number, or two images share one.
    """
    folder = Path(folder)
    images = [child for child in folder.iterdir() if child.is_file() and child.suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        raise VideoReadError(f"{folder}: no frame images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")

    numbered = []
    for image in images:
        match = _FRAME_NUMBER.search(image.stem)
        if match is None:
            raise VideoReadError(f"{image}: the frame file name has no frame number; name frames like "
                                 "images0001.png or 000000.jpg")
        numbered.append((int(match.group(1)), image))
    numbered.sort()
    numbers = [number for number, _ in numbered]
    duplicates = sorted({number for number in numbers if numbers.count(number) > 1})
    if duplicates:
        raise VideoReadError(f"{folder}: several images carry frame number {duplicates[0]}; keep one file per frame")
    return [image for _, image in numbered]


def _read_frame_folder(folder: Path, short_side: Optional[int]) -> np.ndarray:
    frames = []
    for image_path in frame_files(folder):
        image = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
        if image is None:
            raise VideoReadError(f"{image_path}: OpenCV cannot read this image; the file is corrupt or not an image")
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        frames.append(image if short_side is None else resize_short_side(image, short_side))
    return _stack_frames(frames, folder)


def read_video(
    path: Union[str, Path],
    fps: Optional[float] = None,
    short_side: Optional[int] = None,
) -> DecodedVideo:
    """Decode a video file or a frame folder into RGB frames.

    Args:
        path: a video file, or a folder of numbered frame images.
        fps: frame rate of a frame folder (default 25, the rate at which PHOENIX-2014T and CSL-Daily
            frames were encoded for feature extraction). For a video file it overrides the
            container's rate.
        short_side: when given, each frame is resized as it is decoded so that its shorter side has
            this many pixels. This keeps the memory of long high-resolution videos small.

    Returns:
        A :class:`DecodedVideo` with uint8 RGB frames [T, H, W, 3], T >= 1.

    Raises:
        VideoReadError: the path does not exist, or the video is empty, corrupt or unreadable.
    """
    path = Path(path)
    if short_side is not None and short_side < 1:
        raise ValueError(f"short_side must be a positive number of pixels, got {short_side}")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")

    if path.is_dir():
        frames = _read_frame_folder(path, short_side)
        frame_rate = DEFAULT_FOLDER_FPS if fps is None else float(fps)
    elif path.is_file():
        frames, container_fps = _read_video_file(path, short_side)
        frame_rate = container_fps if fps is None else float(fps)
    else:
        raise VideoReadError(f"{path}: no such video file or frame folder")
    return DecodedVideo(frames=frames, fps=frame_rate, num_frames=int(frames.shape[0]), source=path)
