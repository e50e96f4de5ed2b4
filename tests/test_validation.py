"""Checks of bad annotations, bad feature files and bad configurations before training starts."""

import importlib
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from dataloaders.annotations import InvalidItem, SentenceRecord, VideoRecord, find_invalid_records
from dataloaders.features import FeatureReader, diagnose_feature_root
from dataloaders.validation import (
    drop_invalid_items,
    find_invalid_videos,
    find_invalid_videos_on_main,
    read_invalid_list,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = [
    "--embed_dim", "16", "--text_width", "16", "--text_layers", "1", "--text_heads", "2",
    "--video_width", "16", "--video_layers", "1", "--video_heads", "2", "--dist_heads", "2",
    "--feature_len", "8", "--num_workers", "0", "--batch_size_val", "16", "--log_every", "0",
    "--epochs", "1", "--batch_size", "8",
]


def record(sentence_id: str, text: str, *videos: str) -> SentenceRecord:
    return SentenceRecord(sentence_id, text, [VideoRecord(name, None) for name in videos])


def write_pickle(path: Path, content: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        pickle.dump(content, handle)
    return path


def write_streams(root: Path, name: str, agnostic: np.ndarray, aware: np.ndarray = None) -> None:
    write_pickle(root / "agnostic" / "train" / f"{name}.pkl", {"feature": agnostic})
    write_pickle(root / "aware" / "train" / f"{name}.pkl", {"feature": agnostic if aware is None else aware})


def readers(root: Path, channels: int = 4) -> list[FeatureReader]:
    return [FeatureReader(root / "agnostic", "train", channels), FeatureReader(root / "aware", "train", channels)]


# Annotation records.

def test_records_empty_text_flagged() -> None:
    records = [record("s0", "a sentence", "v0"), record("s1", "", "v1"), record("s2", "  \t\n", "v2")]
    invalid = find_invalid_records(records, "train.pkl")

    assert [(item.sentence_id, item.video_name) for item in invalid] == [("s1", None), ("s2", None)]
    assert all("empty or whitespace-only text" in item.reason for item in invalid)
    assert all(item.path == "train.pkl" for item in invalid)


def test_records_duplicate_video_flagged() -> None:
    records = [record("s0", "one", "v0", "v1"), record("s1", "two", "v1"), record("s2", "three", "v2", "v2")]
    invalid = find_invalid_records(records, "train.pkl")

    assert [(item.sentence_id, item.video_name) for item in invalid] == [("s1", "v1"), ("s2", "v2")]
    assert "already listed under sentence 's0'" in invalid[0].reason
    assert "already listed under sentence 's2'" in invalid[1].reason


def test_records_valid_pass() -> None:
    assert find_invalid_records([record("s0", "one", "v0"), record("s1", "two", "v1", "v2")], "x") == []


def test_drop_items_removes_listings() -> None:
    records = [record("s0", "one", "v0", "v1"), record("s1", "two", "v1"), record("s2", "three", "v2", "v2"),
               record("s3", "", "v3"), record("s4", "four", "v4")]
    invalid = [InvalidItem("s1", "v1", "f", "duplicate"), InvalidItem("s2", "v2", "f", "duplicate"),
               InvalidItem("s3", None, "f", "empty"), InvalidItem("s4", "v4", "f", "NaN")]
    kept = drop_invalid_items(records, invalid)

    assert [r.sentence_id for r in kept] == ["s0", "s2"]
    assert [v.name for v in kept[0].videos] == ["v0", "v1"]
    assert [v.name for v in kept[1].videos] == ["v2"]


# Feature files.

@pytest.fixture()
def bad_corpus(tmp_path: Path) -> tuple[Path, list[SentenceRecord]]:
    """Eight videos of four clips and four channels: one valid, the others each broken in one way."""
    good = np.ones((4, 4), dtype=np.float32)
    write_streams(tmp_path, "good", good)
    write_streams(tmp_path, "nan", good, np.where(np.eye(4, dtype=bool), np.nan, 1.0).astype(np.float32))
    write_streams(tmp_path, "inf", np.full((4, 4), np.inf, dtype=np.float32), good)
    write_streams(tmp_path, "narrow", np.ones((4, 3), dtype=np.float32))
    write_streams(tmp_path, "empty", np.zeros((0, 4), dtype=np.float32))
    write_streams(tmp_path, "short", good, np.ones((3, 4), dtype=np.float32))
    write_streams(tmp_path, "truncated", good)
    path = tmp_path / "aware" / "train" / "truncated.pkl"
    path.write_bytes(path.read_bytes()[:40])
    write_streams(tmp_path, "text", good)
    (tmp_path / "agnostic" / "train" / "text.pkl").write_text("feature,0.1,0.2\n")
    write_pickle(tmp_path / "agnostic" / "train" / "missing.pkl", {"feature": good})
    names = ["good", "nan", "inf", "narrow", "empty", "short", "truncated", "text", "missing"]
    return tmp_path, [record(f"s_{name}", f"text {name}", name) for name in names]


def test_find_invalid_videos_reasons(bad_corpus) -> None:
    root, records = bad_corpus
    invalid, num_missing = find_invalid_videos(records, readers(root), progress=False)
    by_video = {item.video_name: item for item in invalid}

    assert "good" not in by_video
    assert len(invalid) == 8
    assert num_missing == 1
    assert "NaN or infinite" in by_video["nan"].reason
    assert by_video["nan"].path.endswith("aware/train/nan.pkl")
    assert "4 of 4 clips hold NaN or infinite" in by_video["inf"].reason
    assert by_video["inf"].path.endswith("agnostic/train/inf.pkl")
    assert "3-d, expected 4" in by_video["narrow"].reason
    assert "num_clips >= 1" in by_video["empty"].reason
    assert "4 and 3 clips" in by_video["short"].reason
    assert "not a readable feature pickle" in by_video["truncated"].reason
    assert by_video["truncated"].path.endswith("aware/train/truncated.pkl")
    assert "not a readable feature pickle" in by_video["text"].reason
    assert by_video["missing"].reason == "feature file not found"
    assert by_video["missing"].path.endswith("aware/train/missing.pkl")


def test_find_invalid_videos_threads_agree(bad_corpus) -> None:
    root, records = bad_corpus
    serial, _ = find_invalid_videos(records, readers(root), progress=False, num_threads=1)
    threaded, _ = find_invalid_videos(records, readers(root), progress=False, num_threads=4)
    assert serial == threaded


def test_check_on_main_shares_result(bad_corpus) -> None:
    root, records = bad_corpus
    sent = []

    def broadcast(payload):
        sent.append(payload)
        return payload

    invalid, num_missing = find_invalid_videos_on_main(records, readers(root), True, broadcast)
    assert len(sent) == 1
    assert len(sent[0]["invalid"]) == 8
    assert len(invalid) == 8
    # A non-main rank reads nothing and takes the main rank's result.
    received, received_missing = find_invalid_videos_on_main([], [], False, lambda _: sent[0])
    assert received == invalid
    assert received_missing == num_missing == 1


def test_check_on_main_error_reaches_all_ranks() -> None:
    with pytest.raises(RuntimeError, match="failed on the main process: boom"):
        find_invalid_videos_on_main([], [], False, lambda _: {"error": "boom"})


def test_diagnose_root_is_split_folder(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        write_pickle(tmp_path / "ph_agnostic" / "train" / f"{name}.pkl", {"feature": np.ones((1, 4))})
    hint = diagnose_feature_root(tmp_path / "ph_agnostic" / "train", "train", ["a", "b", "c"])
    assert "looks like the split folder itself" in hint
    assert str(tmp_path / "ph_agnostic") in hint


def test_diagnose_root_one_level_up(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        write_pickle(tmp_path / "ph_agnostic" / "train" / f"{name}.pkl", {"feature": np.ones((1, 4))})
    hint = diagnose_feature_root(tmp_path, "train", ["a", "b", "c"])
    assert f"{tmp_path / 'ph_agnostic'} (it has train/)" in hint


def test_diagnose_root_no_split_folder(tmp_path: Path) -> None:
    assert "does not exist" in diagnose_feature_root(tmp_path, "train", ["a"])


# Driver runs on the demo corpus.

def _import_from(folder: Path, name: str):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def driver():
    return _import_from(REPO_ROOT / "CLCL", "main_task_retrieval")


@pytest.fixture(scope="module")
def demo_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    _import_from(REPO_ROOT / "scripts", "make_surrogate_features").main([
        "demo", "--out", str(root), "--train_sentences", "32", "--dev_sentences", "12",
        "--test_sentences", "12", "--min_frames", "10", "--max_frames", "40",
    ])
    return root


def _args(corpus: Path, output_dir: Path) -> list[str]:
    return [
        "--config", str(REPO_ROOT / "configs" / "demo.yaml"),
        "--data_path", str(corpus / "annotations"),
        "--features_path", str(corpus / "features" / "domain_agnostic"),
        "--features_path_retrain", str(corpus / "features" / "domain_aware"),
        "--output_dir", str(output_dir), *TINY_RUN,
    ]


def _break_corpus(corpus: Path, copy: Path) -> dict[str, str]:
    """Copy the corpus and break one training video in three ways and one sentence's text; return video -> how."""
    shutil.copytree(corpus, copy)
    train_features = copy / "features" / "domain_aware" / "train"
    names = sorted(path.stem for path in train_features.glob("*.pkl"))
    nan_video, truncated_video, missing_video = names[0], names[10], names[20]

    path = train_features / f"{nan_video}.pkl"
    with path.open("rb") as handle:
        content = pickle.load(handle)
    content["feature"][2, 5] = np.nan
    write_pickle(path, content)
    path = train_features / f"{truncated_video}.pkl"
    path.write_bytes(path.read_bytes()[:100])
    (train_features / f"{missing_video}.pkl").unlink()

    annotations = copy / "annotations" / "train.pkl"
    with annotations.open("rb") as handle:
        entries = pickle.load(handle)
    last_id = list(entries)[-1]
    for entry in entries[last_id]:
        entry["text"] = "   "
    write_pickle(annotations, entries)
    return {nan_video: "NaN", truncated_video: "not a readable", missing_video: "not found", last_id: "empty"}


def test_driver_stops_on_invalid_features(driver, demo_corpus, tmp_path) -> None:
    copy = tmp_path / "corpus"
    broken = _break_corpus(demo_corpus, copy)
    train_pkl = copy / "annotations" / "train.pkl"
    output_dir = tmp_path / "run"

    with pytest.raises(ValueError) as error:
        driver.main(_args(copy, output_dir) + ["--do_train"])
    message = str(error.value)
    assert f"{train_pkl}: sentence {list(broken)[-1]!r}: empty or whitespace-only text" in message
    assert "--skip_invalid" in message
    assert not (output_dir / "checkpoint_last.pt").exists()

    # With the text repaired, the features of the same split stop the run, naming the bad files.
    shutil.copy(demo_corpus / "annotations" / "train.pkl", train_pkl)
    with pytest.raises(ValueError) as error:
        driver.main(_args(copy, output_dir) + ["--do_train"])
    message = str(error.value)
    assert "3 of 60 videos of the train split are invalid" in message
    for video in list(broken)[:3]:
        assert f"domain_aware/train/{video}.pkl" in message
    assert not (output_dir / "checkpoint_last.pt").exists()


def test_driver_skip_invalid_trains(driver, demo_corpus, tmp_path) -> None:
    broken = _break_corpus(demo_corpus, tmp_path / "corpus")
    output_dir = tmp_path / "run"
    results = driver.main(_args(tmp_path / "corpus", output_dir) + ["--do_train", "--do_eval", "--skip_invalid"])

    rows = read_invalid_list(output_dir / "invalid_items.tsv")
    listed = {row["video_name"] or row["sentence_id"]: row for row in rows}
    assert set(listed) == set(broken)
    for name, reason in broken.items():
        assert reason in listed[name]["reason"]
        assert listed[name]["split"] == "train"
    assert listed[list(broken)[0]]["file"].endswith(f"domain_aware/train/{list(broken)[0]}.pkl")
    assert len(results["history"]) == 1
    assert (output_dir / "checkpoint_last.pt").is_file()
    assert results["eval"]["t2v"]["num_queries"] == 12


def test_driver_wrong_feature_root_hint(driver, demo_corpus, tmp_path) -> None:
    args = _args(demo_corpus, tmp_path / "run")
    root = args.index("--features_path") + 1
    args[root] = str(demo_corpus / "features" / "domain_agnostic" / "train")
    with pytest.raises(FileNotFoundError) as error:
        driver.main(args + ["--do_train"])
    message = str(error.value)
    assert "60 of 120 feature files of the train split are missing" in message
    assert "looks like the split folder itself" in message
    assert f"pass its parent {demo_corpus / 'features' / 'domain_agnostic'}" in message


def test_driver_missing_split_annotations(driver, demo_corpus, tmp_path) -> None:
    copy = tmp_path / "corpus"
    shutil.copytree(demo_corpus, copy)
    (copy / "annotations" / "dev.pkl").unlink()
    with pytest.raises(FileNotFoundError, match="annotation file not found: .*dev.pkl"):
        driver.main(_args(copy, tmp_path / "run") + ["--do_train"])
    assert not (tmp_path / "run" / "checkpoint_last.pt").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--feature_len", "0", "--feature_len must be positive"),
    ("--alpha", "-0.1", "--alpha must lie in [0, 1]"),
])
def test_config_ranges_rejected(driver, demo_corpus, tmp_path, capsys, flag, value, message) -> None:
    with pytest.raises(SystemExit):
        driver.parse_args(_args(demo_corpus, tmp_path) + ["--do_train", flag, value])
    assert message in capsys.readouterr().err


def test_config_skip_invalid_key(driver, tmp_path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("datatype: demo\nskip_invalid: true\n")
    args = driver.parse_args(["--config", str(config), "--do_train", "--data_path", "a", "--features_path", "b",
                              "--features_path_retrain", "c"])
    assert args.skip_invalid is True


def test_torchrun_skip_invalid_ranks_agree(demo_corpus, tmp_path) -> None:
    """Two processes drop the same items: the run finishes and both ranks take the same number of steps."""
    import json
    import os
    import socket
    import subprocess

    broken = _break_corpus(demo_corpus, tmp_path / "corpus")
    output_dir = tmp_path / "run"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--nproc_per_node=2", f"--master_port={port}", str(REPO_ROOT / "CLCL" / "main_task_retrieval.py"),
               *_args(tmp_path / "corpus", output_dir), "--do_train", "--skip_invalid"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    rows = read_invalid_list(output_dir / "invalid_items.tsv")
    assert {row["video_name"] or row["sentence_id"] for row in rows} == set(broken)
    results = json.loads((output_dir / "results.json").read_text())
    log = (output_dir / "log.txt").read_text()
    num_sentences = int(log.split("training upret: ")[1].split(" sentences")[0])
    with (tmp_path / "corpus" / "annotations" / "train.pkl").open("rb") as handle:
        entries = pickle.load(handle)
    expected = [sentence_id for sentence_id, videos in entries.items()
                if sentence_id not in broken and any(video["video_name"] not in broken for video in videos)]
    assert num_sentences == len(expected)
    assert results["steps"] == num_sentences // 8


def test_eval_only_list_name(driver, demo_corpus, tmp_path) -> None:
    """An evaluation-only run writes its own list, so the list of a training run in the same folder survives."""
    train_args = driver.parse_args(_args(demo_corpus, tmp_path) + ["--do_train"])
    eval_args = driver.parse_args(_args(demo_corpus, tmp_path) + ["--do_eval", "--eval_split", "dev"])
    assert driver.Data(train_args).invalid_list_path == tmp_path / "invalid_items.tsv"
    assert driver.Data(eval_args).invalid_list_path == tmp_path / "eval_dev_invalid_items.tsv"
