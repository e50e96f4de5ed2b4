"""End to end: real clips -> I3D features -> a few training steps -> scripts/search.py.

A small random I3D extracts features of the shared clips. Their captions (How2Sign's own
sentence, made-up ones for the others) go into annotation pickles of the demo layout. The driver
trains a tiny model for two steps (one epoch at batch 2), and the search script ranks the clips. Plain loops over the
trained model's token features check the scores and uncertainties.
"""

import importlib
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dataloaders.features import FeatureReader, sample_clips
from dataloaders.text import ClipTokenizer
from loop_reference import dot, softmax_average, unit
from modules.clip import CLIPConfig
from modules.model import RetrievalModel

REPO_ROOT = Path(__file__).resolve().parents[1]
for folder in (REPO_ROOT / "scripts", REPO_ROOT / "CLCL"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
extract = importlib.import_module("extract_features")
search = importlib.import_module("search")
driver = importlib.import_module("main_task_retrieval")

HOW2SIGN_NAME = "_fZbAxSSbX4_0-5-rgb_front"
VIDEOS = {
    HOW2SIGN_NAME: "videos/how2sign/_fZbAxSSbX4_0-5-rgb_front.mp4",
    "25October_2010_Monday_tagesschau-17": "videos/phoenix-2014t/25October_2010_Monday_tagesschau-17",
    "signer0_sample1000_color": "videos/autsl/signer0_sample1000_color.mp4",
    "test_video": "videos/pose-test/test_video.mp4",
}
MADE_UP_CAPTIONS = {
    "25October_2010_Monday_tagesschau-17": "tomorrow it stays windy in the north with some rain",
    "signer0_sample1000_color": "she signs a single word with both hands",
    "test_video": "a man waves at the camera and smiles",
}
FEATURE_DIM = 64
MODEL_FLAGS = [
    "--embed_dim", "16", "--text_width", "16", "--text_layers", "1", "--text_heads", "2",
    "--video_width", "16", "--video_layers", "1", "--video_heads", "2", "--dist_heads", "2",
    "--feature_len", "8", "--video_input_dim", str(FEATURE_DIM), "--num_workers", "0", "--batch_size_val", "4",
    "--log_every", "0",
]
TAU, DUAL_MIX = 0.07, 0.5


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory):
    """Extract the clips, write train/dev/test annotations over them and return (folder, captions)."""
    folder = tmp_path_factory.mktemp("search")
    listing = folder / "videos.txt"
    listing.write_text("".join(f"{shared_data / path}\t{name}\n" for name, path in VIDEOS.items()))
    features = folder / "features"
    extract.main([str(listing), "--split", "train", "--features_root", str(features), "--random_init",
                  "--width_mult", str(FEATURE_DIM / 1024), "--resize", "36", "--crop", "32", "--device", "cpu"])
    for split in ("dev", "test"):
        shutil.copytree(features / "train", features / split)

    how2sign_text = (shared_data / VIDEOS[HOW2SIGN_NAME]).with_suffix(".txt").read_text().strip()
    captions = {HOW2SIGN_NAME: how2sign_text, **MADE_UP_CAPTIONS}
    annotations = folder / "annotations"
    annotations.mkdir()
    content = {f"S{index:03d}": [{"text": text, "video_name": name, "num_frames": None}]
               for index, (name, text) in enumerate(captions.items())}
    for split in ("train", "dev", "test"):
        with open(annotations / f"{split}.pkl", "wb") as handle:
            pickle.dump(content, handle)
    return folder, captions


def _train(folder: Path, method: str) -> Path:
    output_dir = folder / f"run_{method}"
    driver.main([
        "--config", str(REPO_ROOT / "configs" / "demo.yaml"), "--data_path", str(folder / "annotations"),
        "--features_path", str(folder / "features"), "--features_path_retrain", str(folder / "features"),
        "--output_dir", str(output_dir), "--do_train", "--epochs", "1", "--batch_size", "2", "--method", method,
        *MODEL_FLAGS,
    ])
    return output_dir / "checkpoint_best.pt"


@pytest.fixture(scope="module")
def upret_checkpoint(corpus):
    return _train(corpus[0], "upret")


def _reference_model(checkpoint: Path) -> RetrievalModel:
    sizes = dict(embed_dim=16, text_width=16, text_layers=1, text_heads=2, video_width=16, video_layers=1,
                 video_heads=2, video_input_dim=FEATURE_DIM, feature_len=8)
    model = RetrievalModel(CLIPConfig(**sizes), method="upret", sample_num=2, dist_heads=2)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    return model.eval()


def _loop_score(video: dict, text: dict) -> float:
    """d * I2T + (1 - d) * T2I of one video and one sentence, every softmax over all positions."""
    video_tokens = [unit(row) for row in video["tokens"][0]]
    text_tokens = [unit(row) for row in text["tokens"][0]]
    sims = [[dot(v, t) for t in text_tokens] for v in video_tokens]
    i2t = sum(float(video["weights"][0, i]) * softmax_average(sims[i], TAU) for i in range(len(video_tokens)))
    t2i = sum(float(text["weights"][0, j]) * softmax_average([row[j] for row in sims], TAU)
              for j in range(len(text_tokens)))
    return DUAL_MIX * i2t + (1 - DUAL_MIX) * t2i


def _loop_sigma(out: dict) -> float:
    values = [math.exp(float(x)) for i, valid in enumerate(out["mask"][0]) if valid
              for x in out["log_sigma"][0, i]]
    return sum(values) / len(values)


def _run_search(*flags: str) -> list:
    command = [sys.executable, str(REPO_ROOT / "scripts" / "search.py"), *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def test_text_query_ranks_clips(corpus, upret_checkpoint):
    folder, captions = corpus
    query = captions[HOW2SIGN_NAME]
    answers = _run_search("--checkpoint", str(upret_checkpoint), "--query", query, "--json", "--top_k", "4")
    assert len(answers) == 1
    answer = answers[0]
    assert answer["query"] == query
    assert answer["type"] == "text"
    results = answer["results"]
    assert [result["rank"] for result in results] == [1, 2, 3, 4]
    assert sorted(result["video"] for result in results) == sorted(VIDEOS)
    scores = [result["score"] for result in results]
    assert scores == sorted(scores, reverse=True)

    # Independent check of the scores and uncertainties with plain loops.
    model = _reference_model(upret_checkpoint)
    reader = FeatureReader(folder / "features", "test")
    ids = torch.from_numpy(ClipTokenizer(32).encode(query))[None]
    with torch.no_grad():
        text = model.encode_text(ids, with_distribution=True)
        assert answer["uncertainty"] == pytest.approx(_loop_sigma(text), rel=1e-5)
        for result in results:
            clips, mask = sample_clips(reader.load(result["video"]), 8)
            video = model.encode_video(torch.from_numpy(clips)[None], torch.from_numpy(mask)[None],
                                       with_distribution=True)
            assert result["score"] == pytest.approx(_loop_score(video, text), abs=1e-5), result["video"]
            assert result["uncertainty"] == pytest.approx(_loop_sigma(video), rel=1e-5), result["video"]
    assert (upret_checkpoint.parent / "search_index_test.pt").is_file()


def test_video_query_ranks_sentences(corpus, upret_checkpoint, capsys):
    folder, captions = corpus
    answers = search.main(["--checkpoint", str(upret_checkpoint), "--video", HOW2SIGN_NAME, "--annotations",
                           str(folder / "annotations" / "test.pkl"), "--json", "--top_k", "4"])
    answer = answers[0]
    assert answer["type"] == "video"
    assert answer["uncertainty"] > 0
    assert sorted(result["text"] for result in answer["results"]) == sorted(captions.values())
    assert all(result["uncertainty"] > 0 for result in answer["results"])
    printed = json.loads(capsys.readouterr().out.splitlines()[0])
    assert printed == answer


def test_index_rebuilt_on_new_features(corpus, upret_checkpoint, caplog):
    folder, captions = corpus
    flags = ["--checkpoint", str(upret_checkpoint), "--query", captions["test_video"], "--json", "--top_k", "9",
             "--index", str(folder / "index.pt")]
    caplog.set_level("INFO", logger="search")
    first = search.main(flags)[0]
    again = search.main(flags)[0]
    assert "using the index" in caplog.text
    assert again == first
    assert len(first["results"]) == len(VIDEOS)

    test_folder = folder / "features" / "test"
    shutil.copy(test_folder / "test_video.pkl", test_folder / "test_video_copy.pkl")
    try:
        caplog.clear()
        grown = search.main(flags)[0]
    finally:
        (test_folder / "test_video_copy.pkl").unlink()
    assert "rebuilding" in caplog.text
    assert len(grown["results"]) == len(VIDEOS) + 1
    scores = {result["video"]: result["score"] for result in grown["results"]}
    assert scores["test_video_copy"] == pytest.approx(scores["test_video"], abs=1e-6)


def test_stdin_queries(corpus, upret_checkpoint, monkeypatch, capsys):
    folder, captions = corpus
    lines = f"{captions['test_video']}\nvideo:test_video\n\nignored after the empty line\n"
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO(lines))
    answers = search.main(["--checkpoint", str(upret_checkpoint), "--annotations",
                           str(folder / "annotations" / "test.pkl"), "--top_k", "2"])
    assert [answer["type"] for answer in answers] == ["text", "video"]
    output = capsys.readouterr().out
    assert "sentence query:" in output
    assert "video query: test_video" in output


def test_video_query_needs_annotations(tmp_path):
    # The check runs before the checkpoint is read, so a missing checkpoint is not reported first.
    with pytest.raises(SystemExit, match="--video .* pass --annotations PATH"):
        search.main(["--checkpoint", str(tmp_path / "absent.pt"), "--video", "test_video"])


def test_stdin_video_without_annotations(corpus, upret_checkpoint, monkeypatch, caplog):
    folder, captions = corpus
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO(f"video:test_video\n{captions['test_video']}\n"))
    answers = search.main(["--checkpoint", str(upret_checkpoint), "--top_k", "2"])
    assert [answer["type"] for answer in answers] == ["text"]
    assert "skipped 'video:test_video': a video query needs --annotations" in caplog.text


def test_split_folder_as_root_named(tmp_path):
    split_folder = tmp_path / "features" / "test"
    split_folder.mkdir(parents=True)
    (split_folder / "clip.pkl").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as error:
        search.list_feature_videos(FeatureReader(split_folder, "test"))
    assert f"pass --features_root {tmp_path / 'features'} --split test" in str(error.value)


def test_cico_has_no_uncertainty(corpus):
    folder, captions = corpus
    checkpoint = _train(folder, "cico")
    answer = search.main(["--checkpoint", str(checkpoint), "--query", captions[HOW2SIGN_NAME], "--json"])[0]
    assert answer["uncertainty"] is None
    assert all(result["uncertainty"] is None for result in answer["results"])
    assert "unavailable" in answer["note"]
    assert len(answer["results"]) == len(VIDEOS)
