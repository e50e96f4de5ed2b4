"""Tests of modules.similarity against explicit loops over videos, texts, clips and words."""
import math
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

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


# Chunked training kernel: gradients, chunk independence and bounded memory.


def dense_i2t(video, video_weights, text, tau=TAU, text_mask=None):
    """Dense [Bv, Bt, Tv, Tt] formulation with autograd, as a gradient reference."""
    sim = torch.einsum("aid,bjd->abij", F.normalize(video, dim=-1), F.normalize(text, dim=-1))
    logits = sim / tau
    if text_mask is not None:
        logits = logits.masked_fill(~text_mask.bool()[None, :, None, :], -math.inf)
    return ((logits.softmax(dim=-1) * sim).sum(dim=-1) * video_weights[:, None, :]).sum(dim=-1)


def dense_t2i(video, text, text_weights, tau=TAU, video_mask=None):
    sim = torch.einsum("aid,bjd->abij", F.normalize(video, dim=-1), F.normalize(text, dim=-1))
    logits = sim / tau
    if video_mask is not None:
        logits = logits.masked_fill(~video_mask.bool()[:, None, :, None], -math.inf)
    return ((logits.softmax(dim=2) * sim).sum(dim=2) * text_weights[None, :, :]).sum(dim=-1)


def _gradients(fn, tensors, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    (fn(*leaves) * upstream).sum().backward()
    return [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("chunk_elements", [1, 7, 40, None])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_gradients_match_dense(batch, chunk_elements, masked):
    upstream = torch.randn(3, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    text_mask = batch["text_mask"] if masked else None
    video_mask = batch["video_mask"] if masked else None

    def chunked_i2t(v, w, t):
        return i2t_similarity(v, w, t, text_mask=text_mask, chunk_elements=chunk_elements)

    def chunked_t2i(v, t, w):
        return t2i_similarity(v, t, w, video_mask=video_mask, chunk_elements=chunk_elements)

    i2t_inputs = (batch["video"], batch["video_weights"], batch["text"])
    for result, expected in zip(_gradients(chunked_i2t, i2t_inputs, upstream),
                                _gradients(lambda v, w, t: dense_i2t(v, w, t, text_mask=text_mask), i2t_inputs,
                                           upstream)):
        valid = batch["video_weights"] != 0 if result.shape == batch["video_weights"].shape else slice(None)
        assert torch.allclose(result[valid], expected[valid], atol=1e-10)
    t2i_inputs = (batch["video"], batch["text"], batch["text_weights"])
    for result, expected in zip(_gradients(chunked_t2i, t2i_inputs, upstream),
                                _gradients(lambda v, t, w: dense_t2i(v, t, w, video_mask=video_mask), t2i_inputs,
                                           upstream)):
        valid = batch["text_weights"] != 0 if result.shape == batch["text_weights"].shape else slice(None)
        assert torch.allclose(result[valid], expected[valid], atol=1e-10)


def test_chunked_values_independent_of_chunk(batch):
    reference = loop_i2t(batch["video"], batch["video_weights"], batch["text"])
    for chunk_elements in (1, 5, 16, 1 << 20):
        result = i2t_similarity(batch["video"], batch["video_weights"], batch["text"], chunk_elements=chunk_elements)
        assert torch.allclose(result, reference, atol=1e-10), chunk_elements


def test_zero_weight_tokens_get_zero_weight_gradient(batch):
    weights = batch["video_weights"].clone().requires_grad_()
    i2t_similarity(batch["video"], weights, batch["text"]).sum().backward()
    assert torch.all(weights.grad[batch["video_mask"] == 0] == 0)
    assert torch.all(weights.grad[batch["video_mask"] == 1] != 0)


def test_chunked_float32_close_to_float64(batch):
    expected = loop_t2i(batch["video"], batch["text"], batch["text_weights"])
    result = t2i_similarity(batch["video"].float(), batch["text"].float(), batch["text_weights"].float(),
                            chunk_elements=8)
    assert result.dtype == torch.float32
    assert torch.allclose(result.double(), expected, atol=1e-5)


class _LargestTensor(TorchDispatchMode):
    """Record the largest number of elements of any tensor produced while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_training_memory_is_chunked():
    # No tensor of the forward or backward pass may reach Bv * Bt * Tv * Tt elements.
    generator = torch.Generator().manual_seed(6)
    num_videos, num_texts, video_len, text_len, dim = 6, 5, 9, 7, 4
    video = torch.randn(num_videos, video_len, dim, generator=generator, requires_grad=True)
    text = torch.randn(num_texts, text_len, dim, generator=generator, requires_grad=True)
    video_weights = torch.full((num_videos, video_len), 1.0 / video_len)
    text_weights = torch.full((num_texts, text_len), 1.0 / text_len)
    full_size = num_videos * num_texts * video_len * text_len
    chunk = 2 * num_texts * text_len
    with _LargestTensor() as tracker:
        scores = i2t_similarity(video, video_weights, text, chunk_elements=chunk)
        scores = scores + t2i_similarity(video, text, text_weights, chunk_elements=chunk)
        scores.sum().backward()
    assert tracker.largest <= 2 * num_videos * video_len * text_len  # the largest chunk has one item more
    assert tracker.largest < full_size // 2
    with _LargestTensor() as tracker:
        dense_i2t(video, video_weights, text).sum().backward()
    assert tracker.largest == full_size


def test_inference_memory_bounded_by_block():
    video, text = _gallery(7, 6, seed=4)
    video = {k: v.float() for k, v in video.items()}
    text = {k: v.float() for k, v in text.items()}
    with _LargestTensor() as tracker:
        scores = inference_score(video, text, block_size=2)
    assert tracker.largest <= max(2 * 2 * 5 * 4, 7 * 5 * 6)  # one block, or the input features
    expected = 0.5 * loop_i2t(video["tokens"], video["weights"], text["tokens"])
    expected += 0.5 * loop_t2i(video["tokens"], text["tokens"], text["weights"])
    assert torch.allclose(scores.double(), expected, atol=1e-5)


def test_invalid_chunk_raises(batch):
    with pytest.raises(ValueError, match="chunk_elements"):
        i2t_similarity(batch["video"], batch["video_weights"], batch["text"], chunk_elements=0)
