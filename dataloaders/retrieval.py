"""Training and evaluation datasets for sign-video / sentence retrieval.

Training yields one item per sentence: its text, a random-swap augmented copy of the text, and
one of its videos drawn at random. Evaluation yields every video and every sentence once. Video
features are the fusion of the two I3D streams, resampled to ``feature_len`` clip slots.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from dataloaders.annotations import SentenceRecord, VideoRecord
from dataloaders.features import FeatureReader, fuse_streams, sample_clips
from dataloaders.text import ClipTokenizer, augment_text

logger = logging.getLogger(__name__)


def drop_videos_without_features(
    records: Sequence[SentenceRecord],
    readers: Sequence[FeatureReader],
) -> list[SentenceRecord]:
    """Keep only the videos whose feature file exists in every reader, and the sentences left with one.

    Records built from the realigned How2Sign CSV name every segment, including those that the
    feature extraction skipped (no person bounding box, or two frames or fewer).
    """
    kept_records = []
    num_dropped_videos = 0
    for record in records:
        videos = [video for video in record.videos if all(reader.exists(video.name) for reader in readers)]
        num_dropped_videos += len(record.videos) - len(videos)
        if videos:
            kept_records.append(SentenceRecord(sentence_id=record.sentence_id, text=record.text, videos=videos))
    if num_dropped_videos:
        layouts = ", ".join(str(reader.path("<video_name>")) for reader in readers)
        logger.warning("dropped %d videos without feature files in %s; %d of %d sentences remain",
                       num_dropped_videos, layouts, len(kept_records), len(records))
    return kept_records


def _load_fused(video: VideoRecord, agnostic: FeatureReader, aware: FeatureReader, alpha: float,
                feature_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Load, fuse and resample one video; return video [feature_len, C] float32 and mask [1 + feature_len] long."""
    try:
        fused = fuse_streams(agnostic.load(video.name), aware.load(video.name), alpha)
    except ValueError as error:
        raise ValueError(f"video {video.name}: {error}") from error
    frames, mask = sample_clips(fused, feature_len)
    return torch.from_numpy(frames), torch.from_numpy(mask)


class TrainDataset(Dataset):
    """Training dataset: one item per sentence, with a random video and an augmented text.

    Every random choice of an item comes from an RNG seeded with ``(seed, epoch, index)``, so an item
    is the same whatever worker loads it and changes from epoch to epoch through ``set_epoch``.

    Items (shapes per item):
        text_ids: long [max_words], the original text.
        text_aug_ids: long [max_words], the text after ``augment_text`` (equal to text_ids when no
            swap fired).
        video: float32 [feature_len, C], fused features of one of the sentence's videos.
        video_mask: long [1 + feature_len], 0 at the CLS slot, 1 for real clips, 0 for padding.
        index: long scalar, the sentence index in ``records``.
    """

    def __init__(
        self,
        records: Sequence[SentenceRecord],
        agnostic: FeatureReader,
        aware: FeatureReader,
        tokenizer: ClipTokenizer,
        alpha: float,
        feature_len: int,
        text_aug_p: float = 0.5,
        seed: int = 42,
    ) -> None:
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.records = list(records)
        self.agnostic = agnostic
        self.aware = aware
        self.tokenizer = tokenizer
        self.alpha = alpha
        self.feature_len = feature_len
        self.text_aug_p = text_aug_p
        self.seed = seed
        # NOTE: DataLoader workers receive a copy of the dataset when an epoch's iterator starts, so
        # with persistent_workers=True they keep the epoch of the first iteration.
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def item_rng(self, index: int) -> random.Random:
        """Return the RNG of one item, seeded from (seed, epoch, index) through a numpy SeedSequence."""
        state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(2, dtype=np.uint64)
        return random.Random((int(state[0]) << 64) | int(state[1]))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        record = self.records[index]
        rng = self.item_rng(index)
        video = record.videos[rng.randrange(len(record.videos))]
        augmented_text = augment_text(record.text, rng, self.text_aug_p)

        frames, mask = _load_fused(video, self.agnostic, self.aware, self.alpha, self.feature_len)
        return {
            "text_ids": torch.from_numpy(self.tokenizer.encode(record.text)),
            "text_aug_ids": torch.from_numpy(self.tokenizer.encode(augmented_text)),
            "video": frames,
            "video_mask": mask,
            "index": torch.tensor(index, dtype=torch.long),
        }


class EvalVideoDataset(Dataset):
    """Evaluation dataset of videos: one item per video, in record order (sentence 0's videos, then sentence 1's, ...).

    Items: ``video`` float32 [feature_len, C], ``video_mask`` long [1 + feature_len] and
    ``sentence_index`` long scalar. ``video_to_sentence`` (int64 [num_videos]) maps each video to
    its sentence index, the grouping used by the retrieval metrics.
    """

    def __init__(
        self,
        records: Sequence[SentenceRecord],
        agnostic: FeatureReader,
        aware: FeatureReader,
        alpha: float,
        feature_len: int,
    ) -> None:
        self.agnostic = agnostic
        self.aware = aware
        self.alpha = alpha
        self.feature_len = feature_len
        self.videos: list[VideoRecord] = []
        sentence_indices = []
        for sentence_index, record in enumerate(records):
            for video in record.videos:
                self.videos.append(video)
                sentence_indices.append(sentence_index)
        self.video_to_sentence = np.asarray(sentence_indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        frames, mask = _load_fused(self.videos[index], self.agnostic, self.aware, self.alpha, self.feature_len)
        return {
            "video": frames,
            "video_mask": mask,
            "sentence_index": torch.tensor(self.video_to_sentence[index], dtype=torch.long),
        }


class EvalTextDataset(Dataset):
    """Evaluation dataset of texts: one item per sentence, ``text_ids`` long [max_words], without augmentation."""

    def __init__(self, records: Sequence[SentenceRecord], tokenizer: ClipTokenizer) -> None:
        self.texts = [record.text for record in records]
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"text_ids": torch.from_numpy(self.tokenizer.encode(self.texts[index]))}
