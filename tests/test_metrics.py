"""Tests for modules.metrics: hand-computed ranks, a slow loop reference and input errors."""
import math

import numpy as np
import pytest
import torch

from modules.metrics import (
    format_metrics_table,
    retrieval_metrics,
    t2v_group_ranks,
    t2v_video_ranks,
    v2t_ranks,
)

NAN = float("nan")

# Three sentences and four videos. Sentence 1 has two videos (rows 1 and 2).
# Group scores (max over each group's rows): g0 = [0.9, 0.2, 0.1], g1 = [0.3, 0.8, 0.6], g2 = [0.2, 0.7, 0.4].
BASIC_SIM = np.array(
    [
        [0.9, 0.2, 0.1],
        [0.3, 0.5, 0.6],
        [0.1, 0.8, 0.4],
        [0.2, 0.7, 0.4],
    ]
)
BASIC_MAP = np.array([0, 1, 1, 2])


# Slow references: one Python loop per query, written straight from the rank definition.
def _rank_against(positive: float, negatives: list) -> int:
    if math.isnan(positive):
        return 1 + len(negatives)
    return 1 + sum(1 for score in negatives if not math.isnan(score) and score >= positive)


def _max_ignoring_nan(values: list) -> float:
    finite_or_inf = [value for value in values if not math.isnan(value)]
    return max(finite_or_inf) if finite_or_inf else NAN


def _loop_v2t(sim: np.ndarray, mapping: np.ndarray) -> list:
    ranks = []
    for video in range(sim.shape[0]):
        own = mapping[video]
        negatives = [sim[video, j] for j in range(sim.shape[1]) if j != own]
        ranks.append(_rank_against(sim[video, own], negatives))
    return ranks


def _loop_t2v_groups(sim: np.ndarray, mapping: np.ndarray) -> list:
    num_sentences = sim.shape[1]
    ranks = []
    for sentence in range(num_sentences):
        group_score = [
            _max_ignoring_nan([sim[v, sentence] for v in range(sim.shape[0]) if mapping[v] == group])
            for group in range(num_sentences)
        ]
        negatives = [group_score[g] for g in range(num_sentences) if g != sentence]
        ranks.append(_rank_against(group_score[sentence], negatives))
    return ranks


def _loop_t2v_videos(sim: np.ndarray, mapping: np.ndarray) -> list:
    ranks = []
    for sentence in range(sim.shape[1]):
        positives = [sim[v, sentence] for v in range(sim.shape[0]) if mapping[v] == sentence]
        negatives = [sim[v, sentence] for v in range(sim.shape[0]) if mapping[v] != sentence]
        ranks.append(min(_rank_against(score, negatives) for score in positives))
    return ranks


# Hand-computed ranks.
def test_v2t_ranks_by_hand():
    # v0: 0.9 beats 0.2, 0.1 -> 1. v1: 0.6 >= 0.5 -> 2. v2: 0.8 -> 1. v3: 0.7 >= 0.4 -> 2.
    assert v2t_ranks(BASIC_SIM, BASIC_MAP).tolist() == [1, 2, 1, 2]


def test_t2v_group_ranks_by_hand():
    # s0: 0.9 vs 0.3, 0.2 -> 1. s1: 0.8 vs 0.2, 0.7 -> 1. s2: 0.4 vs 0.1, 0.6 -> 2.
    assert t2v_group_ranks(BASIC_SIM, BASIC_MAP).tolist() == [1, 1, 2]


def test_t2v_video_ranks_by_hand():
    # s2: positive v3 = 0.4 against negatives v0 0.1, v1 0.6, v2 0.4 (a tie) -> 3, where the group
    # protocol gives 2 because v1 and v2 form one group.
    assert t2v_video_ranks(BASIC_SIM, BASIC_MAP).tolist() == [1, 1, 3]


def test_positive_ties_not_counted_in_videos_protocol():
    # Sentence 0 has videos 0 and 1, tied at 0.9, and one negative (video 2, 0.7). Counting the other
    # positive against the tie would give rank 2, but ranking among negatives only gives 1.
    sim = np.array([[0.9, 0.0], [0.9, 0.0], [0.7, 1.0]])
    mapping = np.array([0, 0, 1])
    assert t2v_video_ranks(sim, mapping).tolist() == [1, 1]
    # Both positives below the negative: rank 2 (one negative above), not 3.
    sim[0, 0] = 0.5
    sim[1, 0] = 0.6
    assert t2v_video_ranks(sim, mapping).tolist() == [2, 1]


def test_metrics_summary_by_hand():
    metrics = retrieval_metrics(BASIC_SIM, BASIC_MAP)
    v2t, t2v = metrics["v2t"], metrics["t2v"]
    # V2T ranks [1, 2, 1, 2]: an even count, so MedR is the mean of the middle ranks 1 and 2.
    assert v2t["R1"] == pytest.approx(50.0)
    assert v2t["R5"] == pytest.approx(100.0)
    assert v2t["R10"] == pytest.approx(100.0)
    assert v2t["MedR"] == pytest.approx(1.5)
    assert v2t["MnR"] == pytest.approx(1.5)
    assert v2t["num_queries"] == 4
    # T2V group ranks [1, 1, 2].
    assert t2v["R1"] == pytest.approx(200.0 / 3.0)
    assert t2v["MedR"] == pytest.approx(1.0)
    assert t2v["MnR"] == pytest.approx(4.0 / 3.0)
    assert t2v["num_queries"] == 3


def test_metrics_videos_gallery_by_hand():
    t2v = retrieval_metrics(BASIC_SIM, BASIC_MAP, t2v_gallery="videos")["t2v"]
    # T2V video ranks [1, 1, 3].
    assert t2v["R1"] == pytest.approx(200.0 / 3.0)
    assert t2v["R5"] == pytest.approx(100.0)
    assert t2v["MedR"] == pytest.approx(1.0)
    assert t2v["MnR"] == pytest.approx(5.0 / 3.0)


def test_recall_at_five_and_ten_by_hand():
    # Twelve sentences with one video each. The positive of video i is beaten by exactly i negatives,
    # so V2T ranks are 1..12: R@1 = 1/12, R@5 = 5/12, R@10 = 10/12, MedR = 6.5, MnR = 6.5.
    num = 12
    sim = np.zeros((num, num))
    for video in range(num):
        sim[video, video] = 0.5
        sim[video, [j for j in range(num) if j != video][:video]] = 1.0
    v2t = retrieval_metrics(sim, np.arange(num))["v2t"]
    assert v2t["R1"] == pytest.approx(100.0 / 12)
    assert v2t["R5"] == pytest.approx(500.0 / 12)
    assert v2t["R10"] == pytest.approx(1000.0 / 12)
    assert v2t["MedR"] == pytest.approx(6.5)
    assert v2t["MnR"] == pytest.approx(6.5)


def test_ties_and_nan_by_hand():
    sim = np.array(
        [
            [NAN, 0.5, 0.1],  # NaN positive -> worst rank 3
            [NAN, 0.4, 0.3],  # NaN negative never beats 0.4 -> 1
            [0.2, 0.2, 0.2],  # both negatives tie the positive -> 3
        ]
    )
    mapping = np.array([0, 1, 2])
    assert v2t_ranks(sim, mapping).tolist() == [3, 1, 3]
    # s0: NaN positive -> 3. s1: 0.4 vs 0.5, 0.2 -> 2. s2: 0.2 vs 0.1, 0.3 -> 2.
    assert t2v_group_ranks(sim, mapping).tolist() == [3, 2, 2]
    assert t2v_video_ranks(sim, mapping).tolist() == [3, 2, 2]


def test_nan_inside_group_by_hand():
    # Group 0 = videos 0 and 1. Video 0 scores NaN for sentence 0, so the group takes video 1's 0.3.
    sim = np.array([[NAN, 0.1], [0.3, 0.9], [0.5, 0.2]])
    mapping = np.array([0, 0, 1])
    assert t2v_group_ranks(sim, mapping).tolist() == [2, 2]
    assert t2v_video_ranks(sim, mapping).tolist() == [2, 2]
    # All positives of sentence 0 NaN: worst rank = 1 + one negative = 2 in both protocols.
    sim[1, 0] = NAN
    sim[2, 0] = -5.0
    assert t2v_group_ranks(sim, mapping).tolist()[0] == 2
    assert t2v_video_ranks(sim, mapping).tolist()[0] == 2


def test_infinite_scores_by_hand():
    sim = np.array([[np.inf, np.inf], [-np.inf, -np.inf]])
    mapping = np.array([0, 1])
    # Video 0: +inf ties +inf -> 2. Video 1: -inf ties -inf -> 2.
    assert v2t_ranks(sim, mapping).tolist() == [2, 2]
    # s0: +inf vs -inf -> 1. s1: -inf vs +inf -> 2.
    assert t2v_group_ranks(sim, mapping).tolist() == [1, 2]


# Random matrices against the loop reference.
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_matrices_match_loop_reference(seed):
    rng = np.random.default_rng(seed)
    num_sentences = int(rng.integers(2, 12))
    extra_videos = int(rng.integers(0, 10))
    mapping = np.concatenate([np.arange(num_sentences), rng.integers(0, num_sentences, extra_videos)])
    rng.shuffle(mapping)
    # Few distinct values make ties common, and some NaN entries test the NaN rules.
    sim = rng.integers(0, 4, size=(mapping.size, num_sentences)).astype(np.float64)
    sim[rng.random(sim.shape) < 0.1] = NAN

    assert v2t_ranks(sim, mapping).tolist() == _loop_v2t(sim, mapping)
    assert t2v_group_ranks(sim, mapping).tolist() == _loop_t2v_groups(sim, mapping)
    assert t2v_video_ranks(sim, mapping).tolist() == _loop_t2v_videos(sim, mapping)


def test_random_metrics_match_loop_reference():
    rng = np.random.default_rng(7)
    mapping = np.concatenate([np.arange(30), rng.integers(0, 30, 20)])
    sim = rng.normal(size=(mapping.size, 30))
    for gallery, reference in (("groups", _loop_t2v_groups), ("videos", _loop_t2v_videos)):
        metrics = retrieval_metrics(sim, mapping, t2v_gallery=gallery)
        for direction, ranks in (("t2v", reference(sim, mapping)), ("v2t", _loop_v2t(sim, mapping))):
            ranks = sorted(ranks)
            count = len(ranks)
            middle = (ranks[(count - 1) // 2] + ranks[count // 2]) / 2
            assert metrics[direction]["R1"] == pytest.approx(100.0 * sum(r <= 1 for r in ranks) / count)
            assert metrics[direction]["R5"] == pytest.approx(100.0 * sum(r <= 5 for r in ranks) / count)
            assert metrics[direction]["R10"] == pytest.approx(100.0 * sum(r <= 10 for r in ranks) / count)
            assert metrics[direction]["MedR"] == pytest.approx(middle)
            assert metrics[direction]["MnR"] == pytest.approx(sum(ranks) / count)
            assert metrics[direction]["num_queries"] == count


def test_torch_inputs_match_numpy():
    rng = np.random.default_rng(3)
    mapping = np.concatenate([np.arange(6), [0, 2, 5]])
    sim = rng.normal(size=(9, 6)).astype(np.float32)
    expected = retrieval_metrics(sim, mapping)
    assert retrieval_metrics(torch.from_numpy(sim), torch.from_numpy(mapping)) == expected
    assert retrieval_metrics(sim, mapping.tolist()) == expected
    # bfloat16 has no NumPy dtype. Its rounding may create ties, so compare against its float32 values.
    sim_bf16 = torch.from_numpy(sim).bfloat16()
    assert retrieval_metrics(sim_bf16, torch.from_numpy(mapping)) == retrieval_metrics(
        sim_bf16.float().numpy(), mapping
    )


# Input errors.
def test_sentence_without_video_raises():
    with pytest.raises(ValueError, match="sentence 1 has no video"):
        retrieval_metrics(np.zeros((2, 3)), np.array([0, 2]))


def test_wrong_shapes_raise():
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(np.zeros(3), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="one entry per video"):
        retrieval_metrics(np.zeros((3, 3)), np.array([0, 1]))
    with pytest.raises(ValueError, match="one entry per video"):
        retrieval_metrics(np.zeros((2, 2)), np.array([[0, 1]]))
    with pytest.raises(ValueError, match="at least one video"):
        retrieval_metrics(np.zeros((0, 2)), np.array([], dtype=np.int64))


def test_invalid_sentence_indices_raise():
    with pytest.raises(ValueError, match=r"video_to_sentence\[1\] = 3"):
        retrieval_metrics(np.zeros((2, 2)), np.array([0, 3]))
    with pytest.raises(ValueError, match=r"video_to_sentence\[0\] = -1"):
        retrieval_metrics(np.zeros((2, 2)), np.array([-1, 1]))
    with pytest.raises(ValueError, match="integer"):
        retrieval_metrics(np.zeros((2, 2)), np.array([0.0, 1.0]))


def test_unknown_gallery_raises():
    with pytest.raises(ValueError, match="t2v_gallery"):
        retrieval_metrics(BASIC_SIM, BASIC_MAP, t2v_gallery="sentences")


# Full size and formatting. Speed belongs in benchmarks, not in tests.
def test_full_size_matrix_counts():
    # The How2Sign test split: 2,348 videos of 1,969 sentences.
    rng = np.random.default_rng(0)
    mapping = np.sort(np.concatenate([np.arange(1969), rng.integers(0, 1969, 2348 - 1969)]))
    sim = rng.normal(size=(2348, 1969)).astype(np.float32)
    sim[np.arange(2348), mapping] += 10.0
    for gallery in ("groups", "videos"):
        metrics = retrieval_metrics(sim, mapping, t2v_gallery=gallery)
        assert metrics["t2v"]["num_queries"] == 1969
        assert metrics["v2t"]["num_queries"] == 2348
        assert metrics["t2v"]["R1"] == 100.0
        assert metrics["v2t"]["R1"] == 100.0


def test_format_metrics_table():
    metrics = retrieval_metrics(BASIC_SIM, BASIC_MAP)
    table = format_metrics_table(metrics)
    lines = table.splitlines()
    assert len(lines) == 3
    assert lines[0].split() == ["R@1", "R@5", "R@10", "MedR", "MnR", "queries"]
    assert lines[1].split() == ["T2V", "66.7", "100.0", "100.0", "1.0", "1.3", "3"]
    assert lines[2].split() == ["V2T", "50.0", "100.0", "100.0", "1.5", "1.5", "4"]
    assert len({len(line) for line in lines}) == 1
