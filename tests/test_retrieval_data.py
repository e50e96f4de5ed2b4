import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dataloaders.annotations import SentenceRecord, VideoRecord
from dataloaders.features import FeatureReader
from dataloaders.retrieval import EvalTextDataset, EvalVideoDataset, TrainDataset, drop_videos_without_features
from dataloaders.text import ClipTokenizer

CHANNELS = 1024
FEATURE_LEN = 8
ALPHA = 0.8

# Clip counts per video: shorter and longer than FEATURE_LEN.
VIDEO_CLIPS = {"s0_a": 5, "s0_b": 12, "s0_c": 3, "s1_a": 20, "s2_a": 8}


def agnostic_value(video_index: int) -> float:
    return float(video_index + 1)


def aware_value(video_index: int) -> float:
    return -10.0 * (video_index + 1)


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[list[SentenceRecord], FeatureReader, FeatureReader]:
    """Three sentences (three, one and one videos); each stream's features are constant per video."""
    for video_index, (name, num_clips) in enumerate(VIDEO_CLIPS.items()):
        for stream, value in (("agnostic", agnostic_value(video_index)), ("aware", aware_value(video_index))):
            path = tmp_path / stream / "train" / f"{name}.pkl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("wb") as handle:
                pickle.dump({"feature": np.full((num_clips, CHANNELS), value, dtype=np.float32)}, handle)

    records = [
        SentenceRecord("s0", "the man opens the door slowly", [VideoRecord(n, None) for n in ("s0_a", "s0_b", "s0_c")]),
        SentenceRecord("s1", "Hi!", [VideoRecord("s1_a", None)]),
        SentenceRecord("s2", "rain in the north tomorrow", [VideoRecord("s2_a", None)]),
    ]
    return records, FeatureReader(tmp_path / "agnostic", "train"), FeatureReader(tmp_path / "aware", "train")


def expected_fused(video_name: str) -> float:
    video_index = list(VIDEO_CLIPS).index(video_name)
    return (1 - ALPHA) * aware_value(video_index) + ALPHA * agnostic_value(video_index)


def chosen_video(item: dict[str, torch.Tensor], candidates: list[str]) -> str:
    """Identify the video of an item from its fused feature value."""
    value = item["video"][0, 0].item()
    matches = [name for name in candidates if abs(expected_fused(name) - value) < 1e-4]
    assert len(matches) == 1, f"value {value} matches {matches}"
    return matches[0]


def make_train_dataset(corpus, **overrides) -> TrainDataset:
    records, agnostic, aware = corpus
    options = dict(alpha=ALPHA, feature_len=FEATURE_LEN, text_aug_p=0.5, seed=42)
    options.update(overrides)
    return TrainDataset(records, agnostic, aware, ClipTokenizer(32), **options)


def test_train_item_shapes_and_values(corpus) -> None:
    dataset = make_train_dataset(corpus)
    item = dataset[0]

    assert len(dataset) == 3
    assert item["text_ids"].shape == (32,)
    assert item["text_ids"].dtype == torch.long
    assert item["text_aug_ids"].shape == (32,)
    assert item["text_aug_ids"].dtype == torch.long
    assert item["video"].shape == (FEATURE_LEN, CHANNELS)
    assert item["video"].dtype == torch.float32
    assert item["video_mask"].shape == (1 + FEATURE_LEN,)
    assert item["video_mask"].dtype == torch.long
    assert item["index"].item() == 0
    assert item["text_ids"].tolist() == ClipTokenizer(32).encode("the man opens the door slowly").tolist()

    name = chosen_video(item, ["s0_a", "s0_b", "s0_c"])
    num_kept = min(VIDEO_CLIPS[name], FEATURE_LEN)
    assert item["video_mask"].tolist() == [0] + [1] * num_kept + [0] * (FEATURE_LEN - num_kept)
    assert torch.all(item["video"][num_kept:] == 0)


def test_train_item_deterministic(corpus) -> None:
    first = make_train_dataset(corpus)
    second = make_train_dataset(corpus)
    for epoch in (0, 3):
        first.set_epoch(epoch)
        second.set_epoch(epoch)
        for index in range(3):
            a, b = first[index], second[index]
            for key in a:
                assert torch.equal(a[key], b[key]), (epoch, index, key)


def test_train_item_changes_across_epochs(corpus) -> None:
    dataset = make_train_dataset(corpus, text_aug_p=1.0)
    videos, augmented = set(), set()
    for epoch in range(12):
        dataset.set_epoch(epoch)
        item = dataset[0]
        videos.add(chosen_video(item, ["s0_a", "s0_b", "s0_c"]))
        augmented.add(tuple(item["text_aug_ids"].tolist()))
    assert len(videos) > 1
    assert len(augmented) > 1


def test_train_augmentation_off(corpus) -> None:
    dataset = make_train_dataset(corpus, text_aug_p=0.0)
    for epoch in range(5):
        dataset.set_epoch(epoch)
        item = dataset[2]
        assert torch.equal(item["text_ids"], item["text_aug_ids"])


def test_train_loader_workers_match_main_process(corpus) -> None:
    dataset = make_train_dataset(corpus)
    dataset.set_epoch(2)
    single = list(DataLoader(dataset, batch_size=2, num_workers=0))
    workers = list(DataLoader(dataset, batch_size=2, num_workers=2))

    assert len(single) == len(workers) == 2
    for batch_a, batch_b in zip(single, workers):
        for key in batch_a:
            assert torch.equal(batch_a[key], batch_b[key]), key


def test_eval_video_order(corpus) -> None:
    records, agnostic, aware = corpus
    dataset = EvalVideoDataset(records, agnostic, aware, alpha=ALPHA, feature_len=FEATURE_LEN)

    assert len(dataset) == 5
    assert dataset.video_to_sentence.dtype == np.int64
    assert dataset.video_to_sentence.tolist() == [0, 0, 0, 1, 2]
    for index, name in enumerate(VIDEO_CLIPS):
        item = dataset[index]
        assert item["sentence_index"].item() == dataset.video_to_sentence[index]
        assert item["video"][0, 0].item() == pytest.approx(expected_fused(name))
        assert item["video_mask"].sum().item() == min(VIDEO_CLIPS[name], FEATURE_LEN)


def test_eval_text_items(corpus) -> None:
    records, _, _ = corpus
    dataset = EvalTextDataset(records, ClipTokenizer(32))
    assert len(dataset) == 3
    assert dataset[1]["text_ids"].tolist() == ClipTokenizer(32).encode("Hi!").tolist()


def test_datasets_are_picklable(corpus) -> None:
    records, agnostic, aware = corpus
    for dataset in (make_train_dataset(corpus), EvalVideoDataset(records, agnostic, aware, ALPHA, FEATURE_LEN),
                    EvalTextDataset(records, ClipTokenizer(32))):
        restored = pickle.loads(pickle.dumps(dataset))
        assert len(restored) == len(dataset)


def test_drop_videos_without_features(corpus, tmp_path: Path) -> None:
    records, agnostic, aware = corpus
    (tmp_path / "aware" / "train" / "s0_b.pkl").unlink()
    (tmp_path / "agnostic" / "train" / "s1_a.pkl").unlink()

    kept = drop_videos_without_features(records, [agnostic, aware])
    assert [record.sentence_id for record in kept] == ["s0", "s2"]
    assert [video.name for video in kept[0].videos] == ["s0_a", "s0_c"]
    assert len(records[0].videos) == 3
