"""Retrieval metrics for a video-by-sentence score matrix: R@1/5/10, median rank and mean rank.

The score matrix has one row per video and one column per sentence, and ``video_to_sentence[i]`` is the
column of video ``i``'s own sentence. A sentence may have several videos (the same sentence signed
several times), and together they form that sentence's group.

Directions:

- V2T: every video is a query ranked against all sentences, and its positive is its own sentence.
- T2V, ``"groups"`` (the published protocol): every sentence is a query ranked against the sentence
  groups. A group's score is the maximum over its videos, so a group with several videos is represented
  by its best video only.
- T2V, ``"videos"``: every sentence ranks all videos, and its rank is the best rank among its positive
  videos. Positives are ranked against the negatives only, so they never count against each other.

Ties are pessimistic: rank = 1 + the number of negatives whose score is >= the positive's score, so a
positive tied with a negative loses the tie. A NaN score never beats the positive, and a NaN positive gets
the worst rank, 1 + the number of negatives (the gallery size in V2T and in group T2V). Inside a group
the maximum ignores NaN scores, so a group is NaN only when all of its videos are. That keeps the group
protocol consistent with the "any positive counts" rule of the videos protocol.

Everything is vectorised with NumPy, with no loop over queries: memory is O(num_videos * num_sentences),
and tests/test_metrics.py checks that a 2,348 x 1,969 matrix takes well under a second.
"""
from typing import Any, Dict, Tuple

import numpy as np

__all__ = [
    "retrieval_metrics",
    "v2t_ranks",
    "t2v_group_ranks",
    "t2v_video_ranks",
    "group_max_scores",
    "summarize_ranks",
    "format_metrics_table",
]

T2V_GALLERIES = ("groups", "videos")

# A NumPy array, a (nested) sequence or a torch tensor on any device.
ArrayLike = Any


def _to_numpy(array: ArrayLike) -> np.ndarray:
    """Convert a NumPy array, a sequence or a torch tensor (any device, any dtype) to a NumPy array."""
    if hasattr(array, "detach") and hasattr(array, "cpu"):
        tensor = array.detach().cpu()
        # NumPy has no bfloat16, so floats narrower than 32 bits are widened to float32, which represents them exactly.
        if tensor.is_floating_point() and tensor.element_size() < 4:
            tensor = tensor.float()
        return tensor.numpy()
    return np.asarray(array)


def _validate_inputs(sim: ArrayLike, video_to_sentence: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    """Convert and check the score matrix and the video-to-sentence map.

    Returns:
        sim: float array [num_videos, num_sentences] (float input keeps its dtype, other input becomes
            float64, which is exact for the comparisons below).
        video_to_sentence: int64 array [num_videos] with values in [0, num_sentences).

    Raises:
        ValueError: on a wrong shape, an empty axis, a non-integer or out-of-range sentence index, or a
            sentence without any video.
    """
    scores = _to_numpy(sim)
    if scores.ndim != 2:
        raise ValueError(f"sim must be a 2-D [num_videos, num_sentences] matrix, got shape {scores.shape}")
    num_videos, num_sentences = scores.shape
    if num_videos == 0 or num_sentences == 0:
        raise ValueError(f"sim must have at least one video and one sentence, got shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.floating):
        if not (np.issubdtype(scores.dtype, np.integer) or scores.dtype == np.bool_):
            raise ValueError(f"sim must contain real numbers, got dtype {scores.dtype}")
        scores = scores.astype(np.float64)

    mapping = _to_numpy(video_to_sentence)
    if mapping.ndim != 1 or mapping.shape[0] != num_videos:
        raise ValueError(
            f"video_to_sentence must be 1-D with one entry per video ({num_videos}, the rows of sim), "
            f"got shape {mapping.shape}"
        )
    if not np.issubdtype(mapping.dtype, np.integer):
        raise ValueError(f"video_to_sentence must contain integer sentence indices, got dtype {mapping.dtype}")
    mapping = mapping.astype(np.int64)
    out_of_range = np.flatnonzero((mapping < 0) | (mapping >= num_sentences))
    if out_of_range.size:
        first = int(out_of_range[0])
        raise ValueError(
            f"video_to_sentence[{first}] = {int(mapping[first])} is not a sentence index in "
            f"[0, {num_sentences}) ({out_of_range.size} invalid entries)"
        )

    videos_per_sentence = np.bincount(mapping, minlength=num_sentences)
    empty = np.flatnonzero(videos_per_sentence == 0)
    if empty.size:
        listed = ", ".join(str(int(j)) for j in empty[:10])
        more = f" and {empty.size - 10} more" if empty.size > 10 else ""
        raise ValueError(
            f"sentence {int(empty[0])} has no video: every sentence (column of sim) needs at least one video "
            f"in video_to_sentence (sentences without a video: {listed}{more})"
        )
    return scores, mapping


def _pessimistic_ranks(beats_positive: np.ndarray, positive: np.ndarray, num_negatives: np.ndarray) -> np.ndarray:
    """Turn per-query counts of negatives that reach the positive into 1-based ranks.

    Args:
        beats_positive: int [num_queries], negatives with score >= the positive's score.
        positive: float [num_queries], the positive's score.
        num_negatives: int [num_queries] or a scalar, the number of negatives of each query.

    Returns:
        int64 [num_queries] ranks. A NaN positive gets 1 + num_negatives, the worst rank.
    """
    ranks = 1 + beats_positive.astype(np.int64)
    worst = 1 + np.broadcast_to(np.asarray(num_negatives, dtype=np.int64), ranks.shape)
    return np.where(np.isnan(positive), worst, ranks)


def v2t_ranks(sim: ArrayLike, video_to_sentence: ArrayLike) -> np.ndarray:
    """Rank each video's own sentence among all sentences (pessimistic ties).

    Args:
        sim: scores [num_videos, num_sentences].
        video_to_sentence: int [num_videos], the column of each video's sentence.

    Returns:
        int64 [num_videos], 1-based ranks in [1, num_sentences].
    """
    scores, mapping = _validate_inputs(sim, video_to_sentence)
    num_videos, num_sentences = scores.shape
    rows = np.arange(num_videos)
    positive = scores[rows, mapping]  # [V]

    # NaN compares False, so a NaN negative never reaches the positive.
    reaches = scores >= positive[:, None]  # [V, S]
    reaches[rows, mapping] = False
    return _pessimistic_ranks(reaches.sum(axis=1), positive, num_sentences - 1)


def group_max_scores(sim: ArrayLike, video_to_sentence: ArrayLike) -> np.ndarray:
    """Score every sentence group against every sentence by the maximum over the group's videos.

    NaN scores are ignored inside the maximum (``np.fmax``), so a group score is NaN only when all of the
    group's videos score NaN for that sentence.

    Args:
        sim: scores [num_videos, num_sentences].
        video_to_sentence: int [num_videos], the column of each video's sentence.

    Returns:
        [num_sentences (groups), num_sentences (query sentences)] with entry [g, j] = max over videos v of
        group g of sim[v, j].
    """
    scores, mapping = _validate_inputs(sim, video_to_sentence)
    num_sentences = scores.shape[1]
    order = np.argsort(mapping, kind="stable")
    videos_per_sentence = np.bincount(mapping, minlength=num_sentences)
    group_starts = np.concatenate(([0], np.cumsum(videos_per_sentence)[:-1]))
    # Rows sorted by sentence make every group a contiguous block, which reduceat maximises in one pass.
    return np.fmax.reduceat(scores[order], group_starts, axis=0)


def t2v_group_ranks(sim: ArrayLike, video_to_sentence: ArrayLike) -> np.ndarray:
    """Rank each sentence's own group among all sentence groups (the published T2V protocol).

    Args:
        sim: scores [num_videos, num_sentences].
        video_to_sentence: int [num_videos], the column of each video's sentence.

    Returns:
        int64 [num_sentences], 1-based ranks in [1, num_sentences].
    """
    group_scores = group_max_scores(sim, video_to_sentence)  # [G = S, S]
    num_sentences = group_scores.shape[1]
    positive = np.diagonal(group_scores).copy()  # [S]

    reaches = group_scores >= positive[None, :]  # [G, S]
    np.fill_diagonal(reaches, False)
    return _pessimistic_ranks(reaches.sum(axis=0), positive, num_sentences - 1)


def t2v_video_ranks(sim: ArrayLike, video_to_sentence: ArrayLike) -> np.ndarray:
    """Rank all videos for each sentence and keep the best rank among its positive videos.

    Each positive video is ranked against the negative videos only, so the positives of one sentence
    never push each other down. The best of those ranks is 1 + the number of negatives that reach the best
    (NaN-ignoring) positive score.

    Args:
        sim: scores [num_videos, num_sentences].
        video_to_sentence: int [num_videos], the column of each video's sentence.

    Returns:
        int64 [num_sentences], 1-based ranks in [1, 1 + number of negatives of that sentence]. When all
        positives of a sentence score NaN, the rank is that upper bound.
    """
    scores, mapping = _validate_inputs(sim, video_to_sentence)
    num_videos, num_sentences = scores.shape
    best_positive = np.diagonal(group_max_scores(scores, mapping)).copy()  # [S]

    reaches = scores >= best_positive[None, :]  # [V, S]
    reaches[np.arange(num_videos), mapping] = False
    num_negatives = num_videos - np.bincount(mapping, minlength=num_sentences)
    return _pessimistic_ranks(reaches.sum(axis=0), best_positive, num_negatives)


def summarize_ranks(ranks: ArrayLike) -> Dict[str, float]:
    """Summarise 1-based ranks as R@1, R@5, R@10 (percent), MedR, MnR and the number of queries.

    MedR is ``np.median`` of the ranks, so an even count gives the mean of the two middle ranks.
    """
    # NOTE: the released evaluation differs in three small ways, so its numbers can differ slightly from
    # these: V2T broke ties by sort order and took the lower middle rank as MedR, and T2V counted a query
    # once for every gallery item whose score equalled the positive's.
    rank_array = np.asarray(ranks)
    if rank_array.ndim != 1 or rank_array.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-D array, got shape {rank_array.shape}")
    summary: Dict[str, float] = {}
    for k in (1, 5, 10):
        summary[f"R{k}"] = float(100.0 * np.mean(rank_array <= k))
    summary["MedR"] = float(np.median(rank_array))
    summary["MnR"] = float(np.mean(rank_array))
    summary["num_queries"] = int(rank_array.size)
    return summary


def retrieval_metrics(
    sim: ArrayLike, video_to_sentence: ArrayLike, t2v_gallery: str = "groups"
) -> Dict[str, Dict[str, float]]:
    """Compute text-to-video and video-to-text retrieval metrics from a score matrix.

    Args:
        sim: scores [num_videos, num_sentences] (NumPy array or torch tensor), higher is more similar.
        video_to_sentence: int [num_videos], entry i is the column of video i's sentence. Every sentence
            needs at least one video.
        t2v_gallery: ``"groups"`` (the published protocol) ranks each sentence against the sentence
            groups, a group scored by its best video. ``"videos"`` ranks each sentence against all
            videos, and its best positive video counts.

    Returns:
        ``{"t2v": {...}, "v2t": {...}}``. Each has ``R1``, ``R5``, ``R10`` (percent of queries whose rank
        is <= k), ``MedR`` and ``MnR`` (median and mean 1-based rank) and ``num_queries`` (sentences for
        T2V, videos for V2T).

    Raises:
        ValueError: on an unknown ``t2v_gallery`` or invalid inputs (see the module docstring).
    """
    if t2v_gallery not in T2V_GALLERIES:
        raise ValueError(f"t2v_gallery must be one of {T2V_GALLERIES}, got {t2v_gallery!r}")
    scores, mapping = _validate_inputs(sim, video_to_sentence)
    if t2v_gallery == "groups":
        t2v = t2v_group_ranks(scores, mapping)
    else:
        t2v = t2v_video_ranks(scores, mapping)
    return {"t2v": summarize_ranks(t2v), "v2t": summarize_ranks(v2t_ranks(scores, mapping))}


def format_metrics_table(metrics: Dict[str, Dict[str, float]]) -> str:
    """Render the T2V and V2T rows of ``retrieval_metrics`` output as a fixed-width text table.

    Columns: R@1, R@5, R@10 (percent, one decimal), MedR, MnR (one decimal) and the number of queries.
    """
    header = f"{'':<4} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'MedR':>7} {'MnR':>7} {'queries':>8}"
    lines = [header]
    for key, label in (("t2v", "T2V"), ("v2t", "V2T")):
        if key not in metrics:
            raise KeyError(f"metrics has no {key!r} entry: pass the output of retrieval_metrics")
        row = metrics[key]
        lines.append(
            f"{label:<4} {row['R1']:>6.1f} {row['R5']:>6.1f} {row['R10']:>6.1f} "
            f"{row['MedR']:>7.1f} {row['MnR']:>7.1f} {int(row['num_queries']):>8d}"
        )
    return "\n".join(lines)
