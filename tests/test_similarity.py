"""Tests of modules.similarity against explicit loops over videos, texts, clips and words."""
import math
from typing import Optional

import pytest
import torch

from loop_reference import dot, softmax_average, unit
from modules.similarity import i2t_similarity, inference_score, t2i_similarity

TAU = 0.07


def loop_i2t(video, video_weights, text, tau=TAU, text_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    num_videos, num_clips, _ = video.shape
    num_texts, num_words, _ = text.shape
    out = torch.zeros(num_videos, num_texts, dtype=torch.float64)
    for a in range(num_videos):
        for b in range(num_texts):
            words = [j for j in range(num_words) if text_mask is None or text_mask[b, j]]
            total = 0.0
            for i in range(num_clips):
                v = unit(video[a, i])
                scores = [dot(v, unit(text[b, j])) for j in words]
                total += float(video_weights[a, i]) * softmax_average(scores, tau)
            out[a, b] = total
    return out


def loop_t2i(video, text, text_weights, tau=TAU, video_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    num_videos, num_clips, _ = video.shape
    num_texts, num_words, _ = text.shape
    out = torch.zeros(num_videos, num_texts, dtype=torch.float64)
    for a in range(num_videos):
        for b in range(num_texts):
            clips = [i for i in range(num_clips) if video_mask is None or video_mask[a, i]]
            total = 0.0
            for j in range(num_words):
                t = unit(text[b, j])
                scores = [dot(unit(video[a, i]), t) for i in clips]
                total += float(text_weights[b, j]) * softmax_average(scores, tau)
            out[a, b] = total
    return out


def _random_weights(mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    scores = torch.randn(mask.shape, generator=generator, dtype=torch.float64)
    scores = scores.masked_fill(mask == 0, -math.inf)
    return torch.softmax(scores, dim=-1)


@pytest.fixture()
def batch():
    """Videos (CLS slot 0 masked, padded clips) and texts (SOT..EOT valid, padding after)."""
    generator = torch.Generator().manual_seed(0)
    video = 2.0 * torch.randn(3, 5, 6, generator=generator, dtype=torch.float64)
    text = 3.0 * torch.randn(4, 4, 6, generator=generator, dtype=torch.float64)
    video_mask = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 0, 0], [0, 1, 0, 0, 0]])
    text_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]])
    return {
        "video": video,
        "text": text,
        "video_mask": video_mask,
        "text_mask": text_mask,
        "video_weights": _random_weights(video_mask, generator),
        "text_weights": _random_weights(text_mask, generator),
    }


def test_i2t_all_positions(batch):
    result = i2t_similarity(batch["video"], batch["video_weights"], batch["text"], tau=TAU)
    expected = loop_i2t(batch["video"], batch["video_weights"], batch["text"])
    assert result.shape == (3, 4)
    assert torch.allclose(result, expected, atol=1e-10)


def test_i2t_masked_softmax(batch):
    result = i2t_similarity(
        batch["video"], batch["video_weights"], batch["text"], tau=TAU, text_mask=batch["text_mask"]
    )
    expected = loop_i2t(batch["video"], batch["video_weights"], batch["text"], text_mask=batch["text_mask"])
    unmasked = loop_i2t(batch["video"], batch["video_weights"], batch["text"])
    assert torch.allclose(result, expected, atol=1e-10)
    assert not torch.allclose(result, unmasked, atol=1e-4)


def test_t2i_all_positions(batch):
    result = t2i_similarity(batch["video"], batch["text"], batch["text_weights"], tau=TAU)
    expected = loop_t2i(batch["video"], batch["text"], batch["text_weights"])
    assert result.shape == (3, 4)
    assert torch.allclose(result, expected, atol=1e-10)


def test_t2i_masked_softmax(batch):
    result = t2i_similarity(
        batch["video"], batch["text"], batch["text_weights"], tau=TAU, video_mask=batch["video_mask"]
    )
    expected = loop_t2i(batch["video"], batch["text"], batch["text_weights"], video_mask=batch["video_mask"])
    unmasked = loop_t2i(batch["video"], batch["text"], batch["text_weights"])
    assert torch.allclose(result, expected, atol=1e-10)
    assert not torch.allclose(result, unmasked, atol=1e-4)


def test_similarity_other_tau(batch):
    result = i2t_similarity(batch["video"], batch["video_weights"], batch["text"], tau=0.5)
    expected = loop_i2t(batch["video"], batch["video_weights"], batch["text"], tau=0.5)
    assert torch.allclose(result, expected, atol=1e-10)


def test_similarity_normalises_tokens(batch):
    scale = torch.rand(3, 5, 1, dtype=torch.float64) + 0.1
    plain = t2i_similarity(batch["video"], batch["text"], batch["text_weights"])
    scaled = t2i_similarity(batch["video"] * scale, batch["text"], batch["text_weights"])
    assert torch.allclose(plain, scaled, atol=1e-12)


def test_similarity_float32_gradients(batch):
    video = batch["video"].float().requires_grad_()
    text = batch["text"].float().requires_grad_()
    result = i2t_similarity(video, batch["video_weights"].float(), text)
    result = result + t2i_similarity(video, text, batch["text_weights"].float())
    assert result.dtype == torch.float32
    result.sum().backward()
    assert torch.isfinite(video.grad).all()
    assert video.grad.abs().sum() > 0
    assert torch.isfinite(text.grad).all()
    assert text.grad.abs().sum() > 0


def _gallery(num_videos: int, num_texts: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    video_mask = torch.zeros(num_videos, 5)
    for a in range(num_videos):
        video_mask[a, 1 : 2 + a % 4] = 1.0
    text_mask = torch.zeros(num_texts, 4)
    for b in range(num_texts):
        text_mask[b, : 2 + b % 3] = 1.0
    video = {
        "tokens": torch.randn(num_videos, 5, 6, generator=generator, dtype=torch.float64),
        "mask": video_mask,
        "weights": _random_weights(video_mask, generator),
    }
    text = {
        "tokens": torch.randn(num_texts, 4, 6, generator=generator, dtype=torch.float64),
        "mask": text_mask,
        "weights": _random_weights(text_mask, generator),
    }
    return video, text


@pytest.mark.parametrize("block_size", [2, 3, 256])
def test_inference_score_blocks(block_size):
    video, text = _gallery(5, 4, seed=1)
    scores = inference_score(video, text, dual_mix=0.3, block_size=block_size)
    expected = 0.3 * loop_i2t(video["tokens"], video["weights"], text["tokens"])
    expected += 0.7 * loop_t2i(video["tokens"], text["tokens"], text["weights"])
    assert scores.dtype == torch.float32
    assert scores.shape == (5, 4)
    assert torch.allclose(scores.double(), expected, atol=1e-5)


def test_inference_score_masked_and_scaled():
    video, text = _gallery(4, 3, seed=2)
    scores = inference_score(video, text, block_size=2, masked_softmax=True, logit_scale=100.0)
    expected = 0.5 * loop_i2t(video["tokens"], video["weights"], text["tokens"], text_mask=text["mask"])
    expected += 0.5 * loop_t2i(video["tokens"], text["tokens"], text["weights"], video_mask=video["mask"])
    assert torch.allclose(scores.double(), 100.0 * expected, atol=1e-3)


def test_inference_score_no_grad():
    video, text = _gallery(3, 3, seed=3)
    video["tokens"].requires_grad_()
    scores = inference_score(video, text)
    assert not scores.requires_grad
