"""Annotation readers for How2Sign, PHOENIX-2014T, CSL-Daily and the demo corpus.

Every reader returns the same records: one ``SentenceRecord`` per sentence id, holding the English
text and the videos that sign it. Only the English ``text`` field of the published pickles is used.
The published pickles are keyed by sentence id, except PHOENIX-2014T, whose keys are video names
with one video per sentence.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd

from dataloaders.safe_pickle import UnsafePickleError, load_pickle

logger = logging.getLogger(__name__)

DATATYPES = ("h2s", "ph", "csl", "demo")
SPLITS = ("train", "dev", "test")

# Share of the training sentences held out as the dev split where no dev annotation is published.
DEFAULT_DEV_SIZE = 0.05

HOW2SIGN_CSV_COLUMNS = (
    "VIDEO_ID",
    "VIDEO_NAME",
    "SENTENCE_ID",
    "SENTENCE_NAME",
    "START_REALIGNED",
    "END_REALIGNED",
    "SENTENCE",
)


@dataclass
class VideoRecord:
    """One sign video: its feature file stem and its length in frames (None when unknown)."""

    name: str
    num_frames: Optional[int]


@dataclass
class SentenceRecord:
    """One sentence id with its English text and every video that signs it (at least one)."""

    sentence_id: str
    text: str
    videos: list[VideoRecord]


@dataclass
class Split:
    """The records of one split and the feature folder (``train``, ``dev`` or ``test``) of its videos."""

    name: str
    records: list[SentenceRecord]
    feature_subset: str
    source: str = ""  # the annotation file(s) the records came from, for error messages

    @property
    def num_videos(self) -> int:
        return sum(len(record.videos) for record in self.records)


def _video_from_entry(entry: object, path: Path, key: str) -> tuple[str, VideoRecord]:
    """Validate one inner annotation dict and return its text and video."""
    if not isinstance(entry, Mapping):
        raise ValueError(
            f"{path}: entry {key!r} must be a dict with 'text' and 'video_name', got {type(entry).__name__}"
        )
    for field in ("text", "video_name"):
        if field not in entry:
            raise ValueError(f"{path}: entry {key!r} has no {field!r} field (fields: {sorted(entry)})")
    text, video_name = entry["text"], entry["video_name"]
    if not isinstance(text, str) or not isinstance(video_name, str):
        raise ValueError(f"{path}: entry {key!r} must have string 'text' and 'video_name'")
    num_frames = entry.get("num_frames")
    return text, VideoRecord(name=video_name, num_frames=None if num_frames is None else int(num_frames))


def read_annotation_pickle(path: Union[str, Path]) -> list[SentenceRecord]:
    """Read a published retrieval annotation pickle into sentence records, in the file's order.

    Two layouts are accepted, also mixed within one file:
    - PHOENIX-2014T: ``{video_name: {'text', 'video_name', 'num_frames', ...}}``, one video per sentence;
    - How2Sign and CSL-Daily: ``{sentence_id: [{'text', 'video_name', 'num_frames', ...}, ...]}``.

    Raises:
        FileNotFoundError: the file does not exist.
        UnsafePickleError: the pickle names a global other than numpy arrays and builtin containers.
        ValueError: the file is not a readable pickle, the structure is not one of the layouts, or an
            entry lacks 'text' or 'video_name'.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        data = load_pickle(path)
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, ValueError, TypeError,
            KeyError, OverflowError, MemoryError) as error:
        raise ValueError(f"{path}: not a readable annotation pickle ({type(error).__name__}: {error}); the file is "
                         "truncated or of another format, so copy it again") from error
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a dict keyed by sentence id or video name, got {type(data).__name__}")

    records = []
    num_mixed_texts = 0
    for key, value in data.items():
        key = str(key)
        if isinstance(value, Mapping):
            text, video = _video_from_entry(value, path, key)
            records.append(SentenceRecord(sentence_id=key, text=text, videos=[video]))
            continue
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"{path}: entry {key!r} must be a dict or a non-empty list of dicts")

        entries = [_video_from_entry(item, path, key) for item in value]
        texts = {text for text, _ in entries}
        if len(texts) > 1:
            num_mixed_texts += 1
        records.append(SentenceRecord(sentence_id=key, text=entries[0][0], videos=[video for _, video in entries]))

    if num_mixed_texts:
        logger.warning("%s: %d sentence ids list videos with different texts; the first text is used",
                       path, num_mixed_texts)
    return records


def _frames_in_segment(start_s: float, end_s: float, fps: float) -> int:
    """Count the frames of a segment cut from frame floor(start * fps) to frame ceil(end * fps), inclusive."""
    return math.ceil(end_s * fps) - math.floor(start_s * fps) + 1


def build_how2sign_records(
    csv_path: Union[str, Path],
    fps: Union[float, Mapping[str, float], None] = None,
) -> list[SentenceRecord]:
    """Build How2Sign sentence records from a realigned How2Sign CSV (tab-separated).

    Each row is one segment of a source video. Segments of one source video are numbered
    ``k = 0, 1, ...`` in order of ``START_REALIGNED`` and named ``<VIDEO_NAME>_clip<k>``, which is
    the naming of the feature files and of the published ``data_h2`` pickles. Segments are grouped by
    ``SENTENCE_ID``: one sentence is signed in several source videos (camera takes). Sentences and
    their videos come in the order of the segments sorted by source video (first appearance in the
    CSV) and start time, which reproduces the published test pickle's order.

    The CSV lists every segment, while the published pickles left out segments without a person
    bounding box, so the records can name videos that have no feature file.

    Args:
        csv_path: the realigned CSV with the columns VIDEO_ID, VIDEO_NAME, SENTENCE_ID, SENTENCE_NAME,
            START_REALIGNED, END_REALIGNED (seconds) and SENTENCE.
        fps: frame rate of the source videos, one value or a mapping VIDEO_NAME -> fps. The CSV does
            not store it (How2Sign mixes 24, 30, 50 and 60 fps sources). Where it is known,
            ``num_frames = ceil(end * fps) - floor(start * fps) + 1``, else None.

    Raises:
        FileNotFoundError: the CSV does not exist.
        ValueError: a required column is missing.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"How2Sign realigned CSV not found: {csv_path}")
    string_columns = {column: str for column in HOW2SIGN_CSV_COLUMNS if "REALIGNED" not in column}
    table = pd.read_csv(csv_path, sep="\t", dtype=string_columns, keep_default_na=False)
    missing = [column for column in HOW2SIGN_CSV_COLUMNS if column not in table.columns]
    if missing:
        raise ValueError(f"{csv_path}: missing columns {missing}; expected the tab-separated columns "
                         f"{list(HOW2SIGN_CSV_COLUMNS)}")

    # Number the segments of each source video by start time. The stable sort keeps the CSV order
    # for equal start times.
    table["video_order"] = pd.factorize(table["VIDEO_NAME"])[0]
    table = table.sort_values(["video_order", "START_REALIGNED"], kind="stable")
    table["clip_index"] = table.groupby("VIDEO_NAME", sort=False).cumcount()

    records: dict[str, SentenceRecord] = {}
    for row in table.itertuples(index=False):
        num_frames = None
        video_fps = fps.get(row.VIDEO_NAME) if isinstance(fps, Mapping) else fps
        if video_fps is not None:
            num_frames = _frames_in_segment(row.START_REALIGNED, row.END_REALIGNED, video_fps)
        video = VideoRecord(name=f"{row.VIDEO_NAME}_clip{row.clip_index}", num_frames=num_frames)

        record = records.get(row.SENTENCE_ID)
        if record is None:
            records[row.SENTENCE_ID] = SentenceRecord(sentence_id=row.SENTENCE_ID, text=row.SENTENCE, videos=[video])
        else:
            record.videos.append(video)
    return list(records.values())


def split_dev_records(
    records: list[SentenceRecord],
    dev_size: Union[int, float],
    seed: int,
) -> tuple[list[SentenceRecord], list[SentenceRecord]]:
    """Hold out a fixed, seeded set of sentences as the dev split.

    Args:
        records: the training sentences.
        dev_size: a number of sentences (an integer >= 1), or a fraction of them when below 1.
        seed: seed of the numpy Generator that draws the dev sentences. Keep it apart from the
            training seed, so that the dev split stays the same across training runs.

    Returns:
        (train, dev), both in the order of ``records``.
    """
    num_sentences = len(records)
    if 0 < dev_size < 1:
        num_dev = max(1, round(dev_size * num_sentences))
    elif dev_size >= 1 and float(dev_size).is_integer():
        num_dev = int(dev_size)
    else:
        raise ValueError(f"dev_size must be a fraction in (0, 1) or a whole number of sentences, got {dev_size}")
    if num_dev >= num_sentences:
        raise ValueError(f"dev_size {dev_size} leaves no training sentences out of {num_sentences}")

    generator = np.random.default_rng(seed)
    is_dev = np.zeros(num_sentences, dtype=bool)
    is_dev[generator.permutation(num_sentences)[:num_dev]] = True
    train = [record for record, dev in zip(records, is_dev) if not dev]
    dev = [record for record, dev in zip(records, is_dev) if dev]
    return train, dev


def _require_file(path: Path, hint: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}. {hint}")
    return path


def _read_how2sign_train(data_path: Path) -> list[SentenceRecord]:
    """Read the How2Sign training sentences from train.pkl, else build them from the realigned CSV."""
    pickle_path = data_path / "train.pkl"
    csv_path = data_path / "how2sign_realigned_train.csv"
    if pickle_path.is_file():
        return read_annotation_pickle(pickle_path)
    if csv_path.is_file():
        logger.info("%s not found; building the How2Sign training records from %s", pickle_path, csv_path)
        return build_how2sign_records(csv_path)
    raise FileNotFoundError(
        f"How2Sign training annotations not found in {data_path}: put the CiCo training pickle at {pickle_path} "
        f"or the realigned How2Sign training table (tab-separated) at {csv_path}"
    )


def _load_phoenix(data_path: Path, split: str) -> Split:
    hint = "Put the PHOENIX-2014T retrieval pickles train.pkl, dev.pkl and test.pkl in this folder."
    if split == "test":
        return Split("test", read_annotation_pickle(_require_file(data_path / "test.pkl", hint)), "test")
    train = read_annotation_pickle(_require_file(data_path / "train.pkl", hint))
    if split == "train":
        return Split("train", train, "train")

    # The published dev.pkl repeats every training entry before the official dev entries.
    train_ids = {record.sentence_id for record in train}
    dev = [record for record in read_annotation_pickle(_require_file(data_path / "dev.pkl", hint))
           if record.sentence_id not in train_ids]
    return Split("dev", dev, "dev")


def _annotation_file(datatype: str, data_path: Path, split: str) -> Path:
    """Return the file that the records of a split were read from."""
    if datatype in ("ph", "demo") or split == "test":
        return data_path / f"{split}.pkl"
    if datatype == "h2s" and not (data_path / "train.pkl").is_file():
        return data_path / "how2sign_realigned_train.csv"
    return data_path / "train.pkl"


@dataclass
class InvalidItem:
    """A sentence or video left out of a run (or that stops it), with the file and the reason.

    ``video_name`` is None when the whole sentence is invalid (for example an empty text).
    """

    sentence_id: str
    video_name: Optional[str]
    path: str
    reason: str

    def describe(self) -> str:
        target = f"sentence {self.sentence_id!r}" if self.video_name is None else (
            f"video {self.video_name!r} (sentence {self.sentence_id!r})")
        return f"{self.path}: {target}: {self.reason}"


def find_invalid_records(records: list[SentenceRecord], source: str) -> list[InvalidItem]:
    """List the sentences with an empty or whitespace-only text and the videos named twice.

    A video listed under two sentences would count as the match of both, so every listing after
    the first is invalid, as is a second listing of a video within one sentence.

    Args:
        records: the sentence records of one split.
        source: the annotation file, named in each item.
    """
    invalid = []
    first_sentence: dict[str, str] = {}
    for record in records:
        if not record.text.strip():
            invalid.append(InvalidItem(record.sentence_id, None, source,
                                       "empty or whitespace-only text; write its sentence or remove the entry"))
            continue
        for video in record.videos:
            if not video.name.strip():
                invalid.append(InvalidItem(record.sentence_id, video.name, source,
                                           "empty video name; name its feature file or remove the entry"))
            elif video.name in first_sentence:
                invalid.append(InvalidItem(record.sentence_id, video.name, source,
                                           f"duplicate video name, already listed under sentence "
                                           f"{first_sentence[video.name]!r}; keep one of the two entries"))
            else:
                first_sentence[video.name] = record.sentence_id
    return invalid


def load_split(
    datatype: str,
    data_path: Union[str, Path],
    split: str,
    dev_size: Union[int, float] = DEFAULT_DEV_SIZE,
    seed: int = 0,
) -> Split:
    """Load the sentence records of one split.

    - ``ph``: train.pkl, the official dev split (dev.pkl entries whose ids are not in train.pkl),
      and test.pkl; each split reads its own feature folder.
    - ``csl`` and ``h2s``: test.pkl for ``test``. No dev annotation is published, so ``dev`` is a
      seeded slice of the training sentences (see ``split_dev_records``) and ``train`` is the rest.
      Both read the ``train`` feature folder. How2Sign training sentences come from train.pkl or,
      where it is absent, from how2sign_realigned_train.csv.
    - ``demo``: train.pkl, dev.pkl and test.pkl, each with its own feature folder.

    Args:
        datatype: one of ``h2s``, ``ph``, ``csl``, ``demo``.
        data_path: folder with the annotation files.
        split: one of ``train``, ``dev``, ``test``.
        dev_size: number (or fraction, when below 1) of training sentences held out as dev for
            ``csl`` and ``h2s``.
        seed: seed of the dev slice, independent of the training seed.
    """
    if datatype not in DATATYPES:
        raise ValueError(f"unknown datatype {datatype!r}; valid: {', '.join(DATATYPES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    data_path = Path(data_path)

    if datatype == "ph":
        result = _load_phoenix(data_path, split)
    elif datatype == "demo":
        hint = "The demo corpus needs train.pkl, dev.pkl and test.pkl in this folder."
        result = Split(split, read_annotation_pickle(_require_file(data_path / f"{split}.pkl", hint)), split)
    elif split == "test":
        hint = f"Put the published {datatype} retrieval test pickle there."
        result = Split("test", read_annotation_pickle(_require_file(data_path / "test.pkl", hint)), "test")
    else:
        if datatype == "h2s":
            records = _read_how2sign_train(data_path)
        else:
            hint = "Put the published CSL-Daily retrieval training pickle there."
            records = read_annotation_pickle(_require_file(data_path / "train.pkl", hint))
        train, dev = split_dev_records(records, dev_size, seed)
        result = Split(split, train if split == "train" else dev, "train")

    result.source = str(_annotation_file(datatype, data_path, split))
    logger.info("%s %s: %d sentences, %d videos (features from %r)",
                datatype, split, len(result.records), result.num_videos, result.feature_subset)
    return result
