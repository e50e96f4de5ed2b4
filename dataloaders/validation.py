"""Checks of the annotation records and feature files of a split, run once before training.

Every video is loaded once from each feature stream with the same checks that the datasets apply
when they read it (see :meth:`dataloaders.features.FeatureReader.load`), so a run that passes the
check cannot stop later on a bad file. Invalid items either stop the run with an error that lists
the first few and their count, or, with ``--skip_invalid``, are left out of the run. In both cases
they are written to ``invalid_items.tsv`` in the run folder.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from dataloaders.annotations import InvalidItem, SentenceRecord
from dataloaders.features import FeatureReader

logger = logging.getLogger(__name__)

INVALID_LIST_NAME = "invalid_items.tsv"
INVALID_LIST_COLUMNS = ("split", "sentence_id", "video_name", "file", "reason")
MISSING_REASON = "feature file not found"


class InvalidDataError(ValueError):
    """Invalid annotations or feature files of a split; the message names the items and the fix."""

# Invalid items logged one by one; beyond this many, the log gives only their count.
MAX_LOGGED_ITEMS = 100
# Items named in an error message.
MAX_ITEMS_IN_ERROR = 5


def _check_video(video_name: str, readers: Sequence[FeatureReader]) -> Optional[tuple[str, str, int]]:
    """Load one video from every reader; return None when it is valid, else (file, reason, missing files)."""
    problem: Optional[tuple[str, str]] = None
    num_missing = 0
    num_clips = []
    for reader in readers:
        try:
            num_clips.append(reader.load(video_name).shape[0])
        except FileNotFoundError:
            num_missing += 1
            problem = problem or (reader.describe(video_name), MISSING_REASON)
        except (ValueError, OSError) as error:
            # The messages of FeatureReader.load start with the file, which the item names already.
            reason = str(error).removeprefix(f"{reader.describe(video_name)}: ")
            problem = problem or (reader.describe(video_name), reason)
    if problem is not None:
        return problem[0], problem[1], num_missing
    if len(set(num_clips)) > 1:
        files = " and ".join(reader.describe(video_name) for reader in readers)
        counts = " and ".join(map(str, num_clips))
        return files, f"the feature streams have {counts} clips; extract both streams from the same frames", 0
    return None


def find_invalid_videos(
    records: Sequence[SentenceRecord],
    readers: Sequence[FeatureReader],
    progress: bool = True,
    num_threads: int = 8,
    description: str = "checking features",
) -> tuple[list[InvalidItem], int]:
    """Load every video of ``records`` once from each reader and list the videos that fail.

    A video fails when a feature file is missing, unreadable, unsafe (a pickle that names a foreign
    global), of the wrong width, without clips or non-finite, or when the streams differ in their
    number of clips. ``num_threads`` threads read the files, because the check waits on file reads.

    Returns:
        (invalid, num_missing_files): one :class:`InvalidItem` per failing video listing, in record
        order, and the number of feature files that do not exist.

    NOTE: no result is cached between runs, so every run reads every file again. With warm page
    caches that took 0.2 s for 2,000 pickles of about 70 clips on a 2-core machine. On a cold network
    disk the file reads bound it, and the packed store turns them into reads of one file.
    """
    from tqdm import tqdm

    videos = [(record.sentence_id, video.name) for record in records for video in record.videos]
    readers = list(dict.fromkeys(readers))
    invalid: list[InvalidItem] = []
    num_missing = 0
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        results = pool.map(lambda item: _check_video(item[1], readers), videos)
        for (sentence_id, video_name), problem in tqdm(zip(videos, results), total=len(videos), desc=description,
                                                       unit="video", disable=not progress, mininterval=1.0):
            if problem is not None:
                path, reason, missing = problem
                num_missing += missing
                invalid.append(InvalidItem(sentence_id, video_name, path, reason))
    return invalid, num_missing


def find_invalid_videos_on_main(
    records: Sequence[SentenceRecord],
    readers: Sequence[FeatureReader],
    is_main: bool,
    broadcast: Callable[[Any], Any],
    description: str = "checking features",
) -> tuple[list[InvalidItem], int]:
    """Run :func:`find_invalid_videos` on the main rank only and send its result to every rank.

    Every rank then drops the same items. An unexpected error of the main rank is sent too and
    raised on every rank, so that no rank waits for a broadcast that never comes.
    """
    payload: Optional[dict[str, Any]] = None
    if is_main:
        try:
            invalid, num_missing = find_invalid_videos(records, readers, description=description)
            payload = {"invalid": [asdict(item) for item in invalid], "num_missing": num_missing}
        except Exception as error:  # noqa: BLE001 (re-raised below on every rank)
            payload = {"error": f"{type(error).__name__}: {error}"}
            logger.exception("the feature check failed")
    payload = broadcast(payload)
    if "error" in payload:
        raise RuntimeError(f"the feature check failed on the main process: {payload['error']}")
    return [InvalidItem(**item) for item in payload["invalid"]], int(payload["num_missing"])


def drop_invalid_items(records: Sequence[SentenceRecord], invalid: Iterable[InvalidItem]) -> list[SentenceRecord]:
    """Remove the invalid sentences and videos, and every sentence left without a video.

    An item with ``video_name`` None removes its whole sentence. Otherwise each item removes one
    listing of the video in its sentence, the last listing first, so a video named twice in one
    sentence keeps its first listing when only the repeat is invalid.
    """
    invalid = list(invalid)
    whole = {item.sentence_id for item in invalid if item.video_name is None}
    num_removed: dict[tuple[str, str], int] = {}
    for item in invalid:
        if item.video_name is not None:
            key = (item.sentence_id, item.video_name)
            num_removed[key] = num_removed.get(key, 0) + 1

    kept = []
    for record in records:
        if record.sentence_id in whole:
            continue
        num_listed: dict[str, int] = {}
        for video in record.videos:
            num_listed[video.name] = num_listed.get(video.name, 0) + 1
        num_seen: dict[str, int] = {}
        videos = []
        for video in record.videos:
            num_seen[video.name] = num_seen.get(video.name, 0) + 1
            num_kept = num_listed[video.name] - num_removed.get((record.sentence_id, video.name), 0)
            if num_seen[video.name] <= num_kept:
                videos.append(video)
        if videos:
            kept.append(SentenceRecord(sentence_id=record.sentence_id, text=record.text, videos=videos))
    return kept


def write_invalid_list(path: Path, rows: Sequence[tuple[str, InvalidItem]]) -> None:
    """Write (split, item) rows as a tab-separated file with the columns of ``INVALID_LIST_COLUMNS``, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(INVALID_LIST_COLUMNS)
        for split, item in rows:
            reason = " ".join(item.reason.split())  # one line per item
            writer.writerow((split, item.sentence_id, item.video_name or "", item.path, reason))
    os.replace(tmp, path)


def read_invalid_list(path: Path) -> list[dict[str, str]]:
    """Read a file written by :func:`write_invalid_list` into one dict per row."""
    with Path(path).open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def log_invalid_items(split: str, invalid: Sequence[InvalidItem], list_path: Path) -> None:
    """Log the dropped items one by one, up to ``MAX_LOGGED_ITEMS``, and then their count."""
    for item in invalid[:MAX_LOGGED_ITEMS]:
        logger.warning("%s split: leaving out %s", split, item.describe())
    if len(invalid) > MAX_LOGGED_ITEMS:
        logger.warning("%s split: %d more invalid items left out, listed in %s", split,
                       len(invalid) - MAX_LOGGED_ITEMS, list_path)


def format_invalid_error(what: str, split: str, invalid: Sequence[InvalidItem], total: int, list_path: Path,
                         hint: str = "") -> str:
    """Build the message of a run stopped by invalid items: their count, the first few and the fixes."""
    examples = "\n  ".join(item.describe() for item in invalid[:MAX_ITEMS_IN_ERROR])
    more = f"\n  ... and {len(invalid) - MAX_ITEMS_IN_ERROR} more" if len(invalid) > MAX_ITEMS_IN_ERROR else ""
    hint = f"\n{hint}" if hint else ""
    return (f"{len(invalid)} of {total} {what} of the {split} split are invalid:\n  {examples}{more}\n"
            f"All of them are listed in {list_path}. Fix or re-create these files, or pass --skip_invalid to leave "
            f"the invalid videos and sentences out of the run.{hint}")
