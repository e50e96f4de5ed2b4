"""Tests of scripts/make_surrogate_features.py on the real PHOENIX-2014T alignments and the demo corpus."""

import gzip
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPTS_DIR = Path(__file__).resolve().parents[1] / "scripts"
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

import make_surrogate_features as surrogate  # noqa: E402

LIMIT = 15
WINDOW = 16
DIM = 1024
STREAM_DIRS = ("ph_domain_agnostic", "ph_domain_aware")


def read_records(path: Path, limit: int) -> list:
    """Read the first ``limit`` alignment records without the code under test."""
    records = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            if len(records) == limit:
                break
            records.append(json.loads(line))
    return records


def load_feature(root: Path, stream_dir: str, name: str) -> np.ndarray:
    subset, video_id = name.split("/", 1)
    with open(root / stream_dir / subset / f"{video_id}.pkl", "rb") as handle:
        return pickle.load(handle)["feature"]


@pytest.fixture(scope="module")
def alignment_files(shared_data: Path) -> list:
    return [shared_data / "alignments" / f"phoenix-2014t.{split}.jsonl.gz" for split in ("train", "dev")]


@pytest.fixture(scope="module")
def records(alignment_files: list) -> list:
    return [record for path in alignment_files for record in read_records(path, LIMIT)]


@pytest.fixture(scope="module")
def phoenix_runs(alignment_files: list, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run the phoenix mode four times: seed 0 twice, seed 1, and seed 0 without stream noise."""
    runs = {
        "seed0": ["--seed", "0"],
        "seed0_again": ["--seed", "0"],
        "seed1": ["--seed", "1"],
        "noise_free": ["--seed", "0", "--aware_noise", "0", "--agnostic_noise", "0"],
    }
    roots = {}
    for label, extra in runs.items():
        root = tmp_path_factory.mktemp(label)
        argv = ["phoenix", "--out", str(root), "--limit", str(LIMIT), "--alignments", *map(str, alignment_files)]
        surrogate.main(argv + extra)
        roots[label] = root
    return roots


def dominant_gloss_clips(records: list, root: Path, stream_dir: str, min_share: int = 10):
    """Collect clips whose window is mostly one gloss, labelled by that gloss and the video's signer.

    Gloss labels come straight from the alignment: states 1 + 3k .. 3 + 3k form gloss k, 0 is silence.
    """
    features, glosses, videos, signers = [], [], [], []
    for video_index, record in enumerate(records):
        states = np.asarray(record["alignments"]["pami0"])
        gloss = np.where(states == 0, -1, (states - 1) // 3)
        feature = load_feature(root, stream_dir, record["name"])
        for clip in range(feature.shape[0]):
            values, counts = np.unique(gloss[clip:clip + WINDOW], return_counts=True)
            best = counts.argmax()
            if counts[best] >= min_share and values[best] >= 0:
                features.append(feature[clip])
                glosses.append(values[best])
                videos.append(video_index)
                signers.append(record["signer"])
    return np.stack(features), np.asarray(glosses), np.asarray(videos), np.asarray(signers)


# ---------------------------------------------------------------------------------------------
# Phoenix mode
# ---------------------------------------------------------------------------------------------


def test_phoenix_clip_counts_and_dtype(phoenix_runs: dict, records: list) -> None:
    assert len(records) == 2 * LIMIT
    for record in records:
        for stream_dir in STREAM_DIRS:
            subset, video_id = record["name"].split("/", 1)
            with open(phoenix_runs["seed0"] / stream_dir / subset / f"{video_id}.pkl", "rb") as handle:
                content = pickle.load(handle)
            assert "feature" in content
            assert content["name"] == record["name"]
            feature = content["feature"]
            assert feature.dtype == np.float32
            assert feature.shape == (max(1, record["num_frames"] - 15), DIM)
            assert np.isfinite(feature).all()


def test_phoenix_writes_only_limited_videos(phoenix_runs: dict) -> None:
    for stream_dir in STREAM_DIRS:
        for subset in ("train", "dev"):
            assert len(list((phoenix_runs["seed0"] / stream_dir / subset).glob("*.pkl"))) == LIMIT


def test_phoenix_seed_determinism(phoenix_runs: dict, records: list) -> None:
    for record in records:
        for stream_dir in STREAM_DIRS:
            first = load_feature(phoenix_runs["seed0"], stream_dir, record["name"])
            again = load_feature(phoenix_runs["seed0_again"], stream_dir, record["name"])
            other = load_feature(phoenix_runs["seed1"], stream_dir, record["name"])
            assert first.tobytes() == again.tobytes()
            assert first.shape == other.shape
            assert not np.allclose(first, other)


def test_phoenix_ids_match_annotations(shared_data: Path, records: list) -> None:
    annotation_dir = shared_data / "annotations" / "data_ph"
    with open(annotation_dir / "train.pkl", "rb") as handle:
        train = pickle.load(handle)
    with open(annotation_dir / "dev.pkl", "rb") as handle:
        dev_only = {key: value for key, value in pickle.load(handle).items() if key not in train}
    for record in records:
        subset, video_id = record["name"].split("/", 1)
        annotations = train if subset == "train" else dev_only
        assert video_id in annotations, f"{record['name']} not in data_ph {subset} annotations"
        assert annotations[video_id]["video_name"] == video_id
        assert annotations[video_id]["num_frames"] == record["num_frames"]


def test_phoenix_clips_carry_gloss_identity(phoenix_runs: dict, records: list) -> None:
    features, glosses, videos, signers = dominant_gloss_clips(records, phoenix_runs["seed0"], "ph_domain_aware")
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    cosine = unit @ unit.T
    other_signer = (videos[:, None] != videos[None, :]) & (signers[:, None] != signers[None, :])
    same_gloss = glosses[:, None] == glosses[None, :]

    assert (same_gloss & other_signer).sum() >= 50, "too few same-gloss clip pairs to compare"
    same_mean = cosine[same_gloss & other_signer].mean()
    different_mean = cosine[~same_gloss & other_signer].mean()
    assert same_mean > different_mean + 0.2


def test_phoenix_agnostic_stream_also_carries_gloss(phoenix_runs: dict, records: list) -> None:
    features, glosses, videos, _ = dominant_gloss_clips(records, phoenix_runs["seed0"], "ph_domain_agnostic")
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    cosine = unit @ unit.T
    other_video = videos[:, None] != videos[None, :]
    same_gloss = glosses[:, None] == glosses[None, :]
    assert cosine[same_gloss & other_video].mean() > cosine[~same_gloss & other_video].mean() + 0.1


def test_fusion_closer_to_signal(phoenix_runs: dict, records: list) -> None:
    squared_error = {"domain_aware": 0.0, "domain_agnostic": 0.0, "fused": 0.0}
    for record in records:
        signal = load_feature(phoenix_runs["noise_free"], "ph_domain_aware", record["name"])
        signal_copy = load_feature(phoenix_runs["noise_free"], "ph_domain_agnostic", record["name"])
        np.testing.assert_array_equal(signal, signal_copy)

        aware = load_feature(phoenix_runs["seed0"], "ph_domain_aware", record["name"]).astype(np.float64)
        agnostic = load_feature(phoenix_runs["seed0"], "ph_domain_agnostic", record["name"]).astype(np.float64)
        fused = 0.5 * aware + 0.5 * agnostic
        squared_error["domain_aware"] += ((aware - signal) ** 2).sum()
        squared_error["domain_agnostic"] += ((agnostic - signal) ** 2).sum()
        squared_error["fused"] += ((fused - signal) ** 2).sum()

    assert squared_error["domain_aware"] < squared_error["domain_agnostic"]
    assert squared_error["fused"] < squared_error["domain_aware"]
    assert squared_error["fused"] < squared_error["domain_agnostic"]


def test_stream_noise_matches_flags(phoenix_runs: dict, records: list) -> None:
    defaults = surrogate.SurrogateConfig()
    expected_noise = {"ph_domain_aware": defaults.aware_noise, "ph_domain_agnostic": defaults.agnostic_noise}
    for stream_dir, expected in expected_noise.items():
        residuals = [
            load_feature(phoenix_runs["seed0"], stream_dir, record["name"])
            - load_feature(phoenix_runs["noise_free"], stream_dir, record["name"])
            for record in records
        ]
        measured = np.concatenate(residuals).std()
        assert measured == pytest.approx(expected, rel=0.03)


def test_workers_and_skip_existing(alignment_files: list, phoenix_runs: dict, tmp_path: Path) -> None:
    argv = ["phoenix", "--out", str(tmp_path), "--limit", "3", "--alignments", *map(str, alignment_files)]
    summary = surrogate.main(argv + ["--workers", "2"])
    assert sum(len(clips) for clips in summary.clips.values()) == 6

    for path in (tmp_path / "ph_domain_aware").rglob("*.pkl"):
        relative = path.relative_to(tmp_path)
        assert path.read_bytes() == (phoenix_runs["seed0"] / relative).read_bytes(), relative

    modified = {path: os.stat(path).st_mtime_ns for path in tmp_path.rglob("*.pkl")}
    summary = surrogate.main(argv + ["--skip_existing"])
    assert sum(summary.skipped.values()) == 6
    assert summary.bytes_written == 0
    assert {path: os.stat(path).st_mtime_ns for path in tmp_path.rglob("*.pkl")} == modified


def test_missing_alignment_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="alignment file not found"):
        surrogate.main(["phoenix", "--out", str(tmp_path), "--alignments", str(tmp_path / "absent.jsonl.gz")])


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_frames", [1, 5, 15, 16, 17, 40])
def test_window_means_match_loop(num_frames: int) -> None:
    frames = np.random.default_rng(num_frames).standard_normal((num_frames, 6)).astype(np.float32)
    padded = list(frames) + [frames[-1]] * max(0, WINDOW - num_frames)
    expected = np.stack([np.mean(padded[start:start + WINDOW], axis=0) for start in range(len(padded) - WINDOW + 1)])

    result = surrogate.window_means(frames, WINDOW)
    assert result.shape == (max(1, num_frames - 15), 6)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)


def test_every_flag_has_help() -> None:
    parser = surrogate.build_parser()
    subparsers = next(action for action in parser._actions if action.dest == "mode").choices
    for mode, subparser in subparsers.items():
        for action in subparser._actions:
            assert action.help, f"{mode} flag {action.option_strings} has no help text"


# ---------------------------------------------------------------------------------------------
# Demo mode
# ---------------------------------------------------------------------------------------------


def run_demo(out: Path, *extra: str) -> dict:
    argv = ["demo", "--out", str(out), "--train_sentences", "12", "--dev_sentences", "4", "--test_sentences", "4"]
    surrogate.main(argv + list(extra))
    annotations = {}
    for split in ("train", "dev", "test"):
        with open(out / "annotations" / f"{split}.pkl", "rb") as handle:
            annotations[split] = pickle.load(handle)
    return annotations


def test_demo_rejects_too_few_signers(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as error:
        surrogate.main(["demo", "--out", str(tmp_path), "--max_videos", "4", "--num_signers", "3"])
    assert error.value.code == 2
    assert not (tmp_path / "annotations").exists()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, "--min_videos", "2", "--max_videos", "3")


def test_demo_annotation_layout(demo_run) -> None:
    _, annotations = demo_run
    assert {split: len(entries) for split, entries in annotations.items()} == {"train": 12, "dev": 4, "test": 4}
    for entries in annotations.values():
        for videos in entries.values():
            assert isinstance(videos, list) and videos
            assert {video["text"] for video in videos} == {videos[0]["text"]}
            for video in videos:
                assert set(video) == {"text", "video_name", "num_frames"}
                assert 40 <= video["num_frames"] <= 120
                assert 3 <= len(video["text"].split()) <= 8


def test_demo_splits_disjoint(demo_run) -> None:
    _, annotations = demo_run
    ids = [set(entries) for entries in annotations.values()]
    texts = [{videos[0]["text"] for videos in entries.values()} for entries in annotations.values()]
    for first in range(3):
        for second in range(first + 1, 3):
            assert not ids[first] & ids[second]
            assert not texts[first] & texts[second]


def test_demo_several_videos_by_distinct_signers(demo_run) -> None:
    _, annotations = demo_run
    video_names = []
    for entries in annotations.values():
        for videos in entries.values():
            video_names += [video["video_name"] for video in videos]
    assert len(video_names) == len(set(video_names))
    for entries in annotations.values():
        for sentence_id, videos in entries.items():
            assert 2 <= len(videos) <= 3
            signers = [video["video_name"].split("_")[1] for video in videos]
            assert len(set(signers)) == len(signers), sentence_id


def test_demo_feature_files_per_stream(demo_run) -> None:
    out, annotations = demo_run
    for split, entries in annotations.items():
        for videos in entries.values():
            for video in videos:
                for stream in ("domain_agnostic", "domain_aware"):
                    with open(out / "features" / stream / split / f"{video['video_name']}.pkl", "rb") as handle:
                        feature = pickle.load(handle)["feature"]
                    assert feature.dtype == np.float32
                    assert feature.shape == (max(1, video["num_frames"] - 15), DIM)


def test_demo_deterministic(demo_run, tmp_path: Path) -> None:
    out, annotations = demo_run
    again = run_demo(tmp_path, "--min_videos", "2", "--max_videos", "3")
    assert again == annotations
    name = next(iter(annotations["train"].values()))[0]["video_name"]
    relative = Path("features") / "domain_aware" / "train" / f"{name}.pkl"
    assert (tmp_path / relative).read_bytes() == (out / relative).read_bytes()


def test_demo_short_video_single_clip(tmp_path: Path) -> None:
    annotations = run_demo(tmp_path, "--min_frames", "6", "--max_frames", "12")
    for split, entries in annotations.items():
        for videos in entries.values():
            for video in videos:
                assert video["num_frames"] < WINDOW
                path = tmp_path / "features" / "domain_agnostic" / split / f"{video['video_name']}.pkl"
                with open(path, "rb") as handle:
                    assert pickle.load(handle)["feature"].shape == (1, DIM)


def test_demo_sign_order_differs() -> None:
    rng = np.random.default_rng(0)
    reordered = 0
    for _ in range(50):
        text, signs = surrogate.sample_demo_sentence(rng)
        assert set(signs) <= set(surrogate.DEMO_LEXICON)
        words = [word.upper() for word in text.split()]
        signed_words = [sign for sign in signs if sign in words]
        english_order = [word for word in words if word in signed_words]
        reordered += signed_words != english_order
    assert reordered > 0
