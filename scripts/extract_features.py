"""Extract I3D clip features from sign-language videos into the layout that training reads.

Each video becomes ``<features_root>/<split>/<video_name>.pkl`` holding ``{'feature': float32
[num_clips, D]}`` (D = 1024 for the real I3D): one embedding per 16-frame window with stride 1, so
``num_clips = max(1, num_frames - 15)``. A video shorter than 16 frames is padded with its last frame.
Frames are resized so that their shorter side is 256 pixels, centre-cropped to 224 x 224, scaled to
[0, 1] and shifted by -0.5. For the 256 x 256 frames of prepared How2Sign clips this is the CiCo
extractor's evaluation transform.

Examples:
    # domain-agnostic features of How2Sign test clips with the BSL-1K weights, on a GPU
    python scripts/extract_features.py clips/test --split test \\
        --features_root data/sign_feature/h2s_domain_agnostic --i3d_checkpoint bsl5k.pth.tar --device cuda
    # PHOENIX-2014T frame folders (fullFrame-210x260px/test/<id>/imagesNNNN.png)
    python scripts/extract_features.py phoenix/fullFrame-210x260px/test --split test \\
        --features_root data/sign_feature/ph_domain_agnostic --i3d_checkpoint bsl5k.pth.tar

INPUT is one video file, one frame folder, or a folder whose video files and frame sub-folders are
the videos. It can also be a text file with one video file or frame folder per line, optionally
followed by a tab and the video name. A rerun skips the videos whose feature file already exists.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dataloaders.features import pack_split, read_feature_pickle  # noqa: E402
from dataloaders.video import (  # noqa: E402
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    VideoReadError,
    is_video_source,
    read_video,
)
from modules.i3d import CROP_SIZE, WINDOW_FRAMES, InceptionI3d, build_i3d, describe  # noqa: E402

logger = logging.getLogger("extract_features")

# The frames' shorter side before the centre crop: the prepared How2Sign clips are 256 x 256,
# of which the extractor keeps the central 224 x 224.
# NOTE: the transform behind the released PHOENIX-2014T and CSL-Daily features is not known, so
# their frames (210 x 260 and others) get this same rule.
RESIZE_SHORT_SIDE = 256


@dataclass
class VideoJob:
    """One video to extract: its name (the feature file stem) and its file or frame folder."""

    name: str
    source: Path


@dataclass
class VideoOutcome:
    """The result of one video for the summary: status is ``extracted``, ``skipped`` or ``failed``."""

    name: str
    status: str
    num_frames: Optional[int] = None
    num_clips: Optional[int] = None
    seconds: float = 0.0
    error: str = ""


def list_videos(input_path: Path) -> list[VideoJob]:
    """List the videos of a folder, of a list file, or the single video file or frame folder given.

    A folder's video files and frame sub-folders are sorted by name.

    Raises:
        FileNotFoundError: the input or a listed path does not exist.
        ValueError: no video was found, or two videos share a name.
    """
    if input_path.suffix.lower() in VIDEO_EXTENSIONS and input_path.is_file():
        jobs = [VideoJob(input_path.stem, input_path)]
    elif input_path.is_dir() and any(path.suffix.lower() in IMAGE_EXTENSIONS for path in input_path.iterdir()):
        jobs = [VideoJob(input_path.name, input_path)]
    elif input_path.is_dir():
        jobs = [VideoJob(child.stem if child.is_file() else child.name, child)
                for child in sorted(input_path.iterdir()) if is_video_source(child)]
        if not jobs:
            raise ValueError(f"no videos in {input_path}: expected video files ({', '.join(VIDEO_EXTENSIONS)}) or "
                             "sub-folders of numbered frame images. Deeper folders are not searched: pass each "
                             "folder of videos on its own, or a list file with one video path per line")
    elif input_path.is_file():
        jobs = []
        for line_number, line in enumerate(input_path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            path_text, _, name = line.rstrip("\n").partition("\t")
            source = Path(path_text.strip()).expanduser()
            if not source.is_absolute():
                source = input_path.parent / source
            if not source.exists():
                raise FileNotFoundError(f"{input_path}:{line_number}: video not found: {source}")
            jobs.append(VideoJob(name.strip() or (source.stem if source.is_file() else source.name), source))
        if not jobs:
            raise ValueError(f"{input_path} lists no videos; write one video file or frame folder per line")
    else:
        raise FileNotFoundError(f"input not found: {input_path}; pass a folder of videos or a list file")

    seen: dict[str, Path] = {}
    for job in jobs:
        if job.name in seen:
            raise ValueError(f"two videos would write the feature file {job.name}.pkl: {seen[job.name]} and "
                             f"{job.source}; rename one, or give names in a list file (path<TAB>name)")
        seen[job.name] = job.source
    return jobs


def center_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """Cut the central ``size`` x ``size`` region out of frames [T, H, W, 3], which must be at least that large."""
    height, width = frames.shape[1:3]
    if height < size or width < size:
        raise ValueError(f"frames of {height}x{width} pixels are smaller than the {size}x{size} crop")
    top, left = (height - size) // 2, (width - size) // 2
    return frames[:, top:top + size, left:left + size]


def num_windows(num_frames: int) -> int:
    """Return the number of 16-frame windows with stride 1: ``max(1, num_frames - 15)``."""
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_frames}")
    return max(1, num_frames - WINDOW_FRAMES + 1)


def pad_to_window(frames: np.ndarray) -> np.ndarray:
    """Repeat the last frame of a video shorter than one window until it has 16 frames."""
    missing = WINDOW_FRAMES - frames.shape[0]
    if missing <= 0:
        return frames
    return np.concatenate([frames, np.repeat(frames[-1:], missing, axis=0)])


def iter_window_batches(frames: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield the 16-frame windows (stride 1) of frames [T, H, W, 3] in batches [B, 3, 16, H, W], uint8 as given."""
    windows = frames.unfold(0, WINDOW_FRAMES, 1)  # [N, H, W, 3, 16], a view
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start:start + batch_size].permute(0, 3, 4, 1, 2)


@torch.inference_mode()
def extract_video_features(
    model: InceptionI3d,
    frames: np.ndarray,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
) -> np.ndarray:
    """Embed every 16-frame window of one video.

    Args:
        model: the I3D in eval mode, on ``device``.
        frames: uint8 RGB [T, S, S, 3] frames, already resized and cropped.
        batch_size: windows per forward pass.
        device: where the network runs.
        precision: ``fp32``, or ``bf16`` autocast on CUDA.

    Returns:
        float32 [max(1, T - 15), embed_dim].
    """
    video = torch.from_numpy(pad_to_window(frames)).to(device)
    # NOTE: the bf16 path has not been run on a GPU yet; fp32 is the reference.
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    outputs = []
    for batch in iter_window_batches(video, batch_size):
        clips = batch.float().div_(255.0).sub_(0.5)  # pixels in [0, 1], shifted by -0.5 with unit scale
        with autocast:
            outputs.append(model.embed(clips).float().cpu())
    return torch.cat(outputs).numpy()


def write_features_atomic(path: Path, features: np.ndarray) -> None:
    """Write ``{'feature': features}`` to ``path`` through a temporary file and a rename, so no partial file is left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            pickle.dump({"feature": np.ascontiguousarray(features, dtype=np.float32)}, handle,
                        protocol=pickle.HIGHEST_PROTOCOL)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load_frames(source: Path, resize: int, crop: int, fps: Optional[float]) -> tuple[np.ndarray, int]:
    """Decode, resize and centre-crop one video; return uint8 frames [T, crop, crop, 3] and T."""
    video = read_video(source, fps=fps, short_side=resize)
    return center_crop(video.frames, crop), video.num_frames


def process_video(job: VideoJob, out_path: Path, model: InceptionI3d, args: argparse.Namespace,
                  device: torch.device) -> VideoOutcome:
    """Extract one video unless its feature file is already there and readable."""
    if out_path.is_file() and not args.overwrite:
        try:
            return VideoOutcome(job.name, "skipped", num_clips=read_feature_pickle(out_path).shape[0])
        except ValueError as error:
            logger.warning("%s exists but is unreadable (%s); extracting it again", out_path, error)

    start = time.time()
    try:
        frames, total_frames = load_frames(job.source, args.resize, args.crop, args.fps)
    except (VideoReadError, ValueError) as error:
        logger.error("skipping video %s: %s", job.name, error)
        return VideoOutcome(job.name, "failed", error=str(error))

    features = extract_video_features(model, frames, args.batch_size, device, args.precision)
    expected = num_windows(total_frames)
    if features.shape[0] != expected:
        raise RuntimeError(f"{job.source}: got {features.shape[0]} clip features for {total_frames} frames, "
                           f"expected {expected}")
    write_features_atomic(out_path, features)
    return VideoOutcome(job.name, "extracted", total_frames, features.shape[0], time.time() - start)


def format_summary(outcomes: Sequence[VideoOutcome]) -> str:
    """Return a table of frames and clips per video, and a count per status."""
    width = max([len("video")] + [len(outcome.name) for outcome in outcomes])
    lines = [f"{'video':<{width}}  {'status':<9}  {'frames':>6}  {'clips':>6}  {'seconds':>7}"]
    for outcome in outcomes:
        frames = "-" if outcome.num_frames is None else str(outcome.num_frames)
        clips = "-" if outcome.num_clips is None else str(outcome.num_clips)
        seconds = f"{outcome.seconds:.2f}" if outcome.status == "extracted" else "-"
        line = f"{outcome.name:<{width}}  {outcome.status:<9}  {frames:>6}  {clips:>6}  {seconds:>7}"
        lines.append(line + (f"  {outcome.error}" if outcome.error else ""))
    counts = {status: sum(outcome.status == status for outcome in outcomes)
              for status in ("extracted", "skipped", "failed")}
    clips = sum(outcome.num_clips or 0 for outcome in outcomes)
    lines.append(f"{counts['extracted']} extracted, {counts['skipped']} skipped, {counts['failed']} failed; "
                 f"{clips} clips in total")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="a video file, a frame folder, a folder of either, or a list file")
    parser.add_argument("--split", required=True, help="subset folder under --features_root, e.g. train or test")
    parser.add_argument("--features_root", type=Path, required=True, help="root of the feature files")
    parser.add_argument("--i3d_checkpoint", type=Path, default=None,
                        help="I3D weights, e.g. bsl5k.pth.tar (BSL-1K) or a domain-aware fine-tuned I3D")
    parser.add_argument("--random_init", action="store_true",
                        help="use a randomly initialised I3D instead of a checkpoint (tests and demos only)")
    parser.add_argument("--allow_partial", action="store_true",
                        help="load a checkpoint whose keys do not all match, logging the others")
    parser.add_argument("--width_mult", type=float, default=1.0,
                        help="channel multiplier of the I3D; 1.0 is the real network (1024-d features), smaller "
                             "values give a small network for tests")
    parser.add_argument("--batch_size", type=int, default=32, help="16-frame windows per forward pass")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the I3D runs; auto picks CUDA when available")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32, or bf16 autocast of the I3D on CUDA (features are then rounded to bf16 "
                             "precision inside the network)")
    parser.add_argument("--resize", type=int, default=RESIZE_SHORT_SIDE,
                        help="shorter side of the frames in pixels before the centre crop")
    parser.add_argument("--crop", type=int, default=CROP_SIZE, help="side of the square centre crop in pixels")
    parser.add_argument("--fps", type=float, default=None,
                        help="frame rate of frame folders (default 25) or override of the container's rate")
    parser.add_argument("--overwrite", action="store_true", help="extract again even if the feature file exists")
    parser.add_argument("--packed", type=Path, default=None,
                        help="after extraction, pack <features_root>/<split> into <PACKED>/<split>/features.npy "
                             "with index.json (see scripts/pack_features.py)")
    parser.add_argument("--num_threads", type=int, default=None, help="CPU threads of torch (default: torch's)")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.i3d_checkpoint is None and not args.random_init:
        parser.error("pass --i3d_checkpoint PATH (e.g. bsl5k.pth.tar); --random_init gives meaningless features "
                     "and is only for tests and demos")
    if args.i3d_checkpoint is not None and args.random_init:
        parser.error("--i3d_checkpoint and --random_init exclude each other")
    if args.crop < 1 or args.resize < args.crop:
        parser.error(f"--resize {args.resize} must be at least --crop {args.crop}, and both positive")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be positive, got {args.batch_size}")
    if not args.width_mult > 0:
        parser.error(f"--width_mult must be positive, got {args.width_mult}")
    if args.precision == "bf16" and args.device == "cpu":
        parser.error("--precision bf16 is meant for CUDA; use fp32 on the CPU")
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def main(argv: Optional[Sequence[str]] = None) -> list[VideoOutcome]:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(message)s",
                            datefmt="%Y-%m-%d %H:%M:%S")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = resolve_device(args.device)

    try:
        jobs = list_videos(args.input)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    out_folder = args.features_root / args.split
    try:
        model = build_i3d(args.i3d_checkpoint, width_mult=args.width_mult, allow_partial=args.allow_partial)
    except (FileNotFoundError, ValueError) as error:
        # A missing or unreadable weight file: the message names it and the fix.
        raise SystemExit(f"error: {error}") from None
    model = model.to(device)
    if args.random_init:
        logger.warning("the I3D is randomly initialised: these features carry no sign information")
    summary = describe(model)
    logger.info("I3D %s on %s (%s), %d videos -> %s", summary, device, args.precision, len(jobs), out_folder)

    outcomes = []
    progress = tqdm(jobs, desc="videos", unit="video", mininterval=1.0 if sys.stderr.isatty() else 30.0)
    for job in progress:
        outcome = process_video(job, out_folder / f"{job.name}.pkl", model, args, device)
        outcomes.append(outcome)
        progress.set_postfix(video=job.name, status=outcome.status, refresh=False)

    print(format_summary(outcomes))
    failed = [outcome for outcome in outcomes if outcome.status == "failed"]
    if args.packed is not None:
        if failed:
            logger.warning("packing without the %d failed videos", len(failed))
        report = pack_split(args.features_root, args.split, args.packed, channels=model.embed_dim)
        print(f"packed {report.num_videos} videos ({report.num_clips} clips) into {report.folder}")
    if failed:
        names = ", ".join(outcome.name for outcome in failed[:5])
        raise SystemExit(f"{len(failed)} of {len(jobs)} videos failed ({names}); see the errors above")
    return outcomes


if __name__ == "__main__":
    main()
