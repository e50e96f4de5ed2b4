"""Finite losses, gradients and scores of the real model and loss on degenerate inputs.

Each case builds a tiny RetrievalModel and RetrievalLoss and feeds one kind of degenerate batch.
The cases are all-zero clip features, a caption of only SOT and EOT, a video of a single clip, a
batch of one, padding within a batch, and features far larger than I3D's. A video_mask row without
any valid clip is an error rather than a degenerate input: every video that passes the feature check
has at least one clip, so the model raises on such a row.
"""

import itertools

import pytest
import torch

from modules.clip import CLIPConfig
from modules.criterion import RetrievalLoss
from modules.model import RetrievalModel
from modules.similarity import inference_score

SOT = 49406
EOT = 49407
TEXT_LEN = 8
FEATURE_LEN = 4
VIDEO_DIM = 32


def tiny_model(method: str, seed: int = 0) -> RetrievalModel:
    torch.manual_seed(seed)
    config = CLIPConfig(embed_dim=16, vocab_size=49408, context_length=TEXT_LEN, text_width=16, text_layers=1,
                        text_heads=2, video_input_dim=VIDEO_DIM, video_width=16, video_layers=1, video_heads=2,
                        feature_len=FEATURE_LEN)
    return RetrievalModel(config, method=method, sample_num=3, dist_heads=2, dist_dropout=0.0)


def text_ids(lengths: list[int]) -> torch.Tensor:
    """Token ids with ``length`` words between SOT and EOT per row (0 words: a caption of only SOT and EOT)."""
    ids = torch.zeros(len(lengths), TEXT_LEN, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, 0] = SOT
        ids[row, 1:1 + length] = torch.arange(400, 400 + length)
        ids[row, 1 + length] = EOT
    return ids


def video_batch(num_clips: list[int], scale: float = 1.0, zero_rows: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [B, FEATURE_LEN, VIDEO_DIM], zero after each row's clips, and the matching mask [B, 1 + FEATURE_LEN]."""
    generator = torch.Generator().manual_seed(1)
    video = scale * torch.randn(len(num_clips), FEATURE_LEN, VIDEO_DIM, generator=generator)
    mask = torch.zeros(len(num_clips), 1 + FEATURE_LEN, dtype=torch.long)
    for row, clips in enumerate(num_clips):
        video[row, clips:] = 0.0
        mask[row, 1:1 + clips] = 1
    for row in zero_rows:
        video[row] = 0.0
    return video, mask


CASES = {
    # name: (clips per video, words per caption, feature scale, rows with all-zero features)
    "all_zero_features": ([4, 4, 2], [3, 2, 5], 1.0, (0, 1, 2)),
    "one_zero_video": ([4, 3, 2], [3, 2, 5], 1.0, (1,)),
    "caption_sot_eot_only": ([4, 2, 3], [0, 0, 4], 1.0, ()),
    "single_clip_video": ([1, 1, 4], [3, 2, 1], 1.0, ()),
    "batch_of_one": ([2], [3], 1.0, ()),
    "batch_of_one_degenerate": ([1], [0], 1.0, (0,)),
    "padding_in_batch": ([1, 4, 2, 3], [0, 6, 1, 2], 1.0, ()),
    "large_features": ([4, 3, 1], [3, 2, 5], 1e4, ()),
}


def _assert_finite(name: str, tensor: torch.Tensor) -> None:
    assert torch.isfinite(tensor).all(), f"{name} has non-finite values: {tensor}"


@pytest.mark.parametrize("case, method", list(itertools.product(CASES, ("upret", "cico"))))
@pytest.mark.parametrize("masked", [False, True])
def test_loss_and_gradients_finite(case: str, method: str, masked: bool) -> None:
    num_clips, words, scale, zero_rows = CASES[case]
    model = tiny_model(method)
    criterion = RetrievalLoss(method=method, masked_softmax=masked)
    video, video_mask = video_batch(num_clips, scale, zero_rows)
    ids = text_ids(words)

    terms = criterion(model(ids, ids.clone(), video, video_mask))
    for key, value in terms.items():
        _assert_finite(key, value)
    terms["loss"].backward()

    with_grad = [(name, p) for name, p in model.named_parameters() if p.grad is not None]
    assert with_grad, "no parameter received a gradient"
    for name, parameter in with_grad:
        _assert_finite(f"gradient of {name}", parameter.grad)


@pytest.mark.parametrize("case, method", list(itertools.product(CASES, ("upret", "cico"))))
def test_inference_scores_finite(case: str, method: str) -> None:
    num_clips, words, scale, zero_rows = CASES[case]
    model = tiny_model(method).eval()
    video, video_mask = video_batch(num_clips, scale, zero_rows)
    with torch.no_grad():
        video_out = model.encode_video(video, video_mask)
        text_out = model.encode_text(text_ids(words))
    for masked in (False, True):
        scores = inference_score(video_out, text_out, masked_softmax=masked, block_size=2)
        assert scores.shape == (len(num_clips), len(words))
        _assert_finite(f"scores (masked_softmax={masked})", scores)
        # Token-wise softmax similarities of unit vectors are weighted means of cosines, so |S| <= 1.
        assert scores.abs().max() <= 1.0 + 1e-5


@pytest.mark.parametrize("method", ["upret", "cico"])
def test_zero_video_scores_equal(method: str) -> None:
    """Two all-zero videos with the same mask are the same input, so they score alike against every caption."""
    model = tiny_model(method).eval()
    video, video_mask = video_batch([3, 3, 2], zero_rows=(0, 1))
    with torch.no_grad():
        scores = inference_score(model.encode_video(video, video_mask), model.encode_text(text_ids([1, 2])))
    torch.testing.assert_close(scores[0], scores[1])


def test_video_without_clips_raises() -> None:
    model = tiny_model("upret")
    video, video_mask = video_batch([2, 3])
    video_mask[1] = 0
    with pytest.raises(ValueError, match="at least one"):
        model.encode_video(video, video_mask)


def test_similarity_zero_tokens() -> None:
    """Zero token vectors normalise to zero, so every cosine and both scores are 0 with finite gradients."""
    from modules.similarity import i2t_similarity, t2i_similarity

    video = torch.zeros(2, 5, 8, requires_grad=True)
    text = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()
    text_mask = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]])
    scores = (i2t_similarity(video, torch.full((2, 5), 0.2), text, text_mask=text_mask)
              + t2i_similarity(video, text, text_mask / text_mask.sum(1, keepdim=True), video_mask=torch.ones(2, 5)))
    scores.sum().backward()

    assert torch.equal(scores, torch.zeros(2, 3))
    _assert_finite("video gradient", video.grad)
    _assert_finite("text gradient", text.grad)


def test_masked_softmax_empty_row() -> None:
    """A row without a valid position gets zero weights (not NaN), and the other rows still sum to 1."""
    from modules.heads import _masked_softmax, pool_samples, uniform_weights

    scores = torch.tensor([[0.3, -1.0, 2.0], [0.5, 0.1, 9.0]], requires_grad=True)
    mask = torch.tensor([[0.0, 0, 0], [1, 1, 0]])
    weights = _masked_softmax(scores, mask)
    weights.sum().backward()

    assert torch.equal(weights[0], torch.zeros(3))
    expected = torch.tensor([0.5, 0.1]).exp() / torch.tensor([0.5, 0.1]).exp().sum()
    torch.testing.assert_close(weights[1, :2], expected)
    assert weights[1, 2] == 0
    _assert_finite("score gradient", scores.grad)
    assert torch.equal(uniform_weights(torch.zeros(2, 3)), torch.zeros(2, 3))
    pooled = pool_samples(torch.ones(2, 3, 4, 8), torch.zeros(2, 4))
    assert torch.equal(pooled, torch.zeros(2, 3, 8))


def test_ot_zero_samples_finite() -> None:
    from modules.optimal_transport import ot_score

    video = torch.zeros(2, 3, 8, requires_grad=True)
    text = torch.nn.functional.normalize(torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    score = ot_score(video, text)
    score.sum().backward()

    # Every cost is 1 - 0 = 1 between a zero and a unit vector, so the score is the same for all pairs.
    assert torch.allclose(score, score[0, 0].expand_as(score))
    _assert_finite("OT score", score)
    _assert_finite("video gradient", video.grad)
