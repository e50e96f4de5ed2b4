"""Tests of modules.criterion against the loss written out with explicit loops."""
import copy
import math
from typing import List, Optional

import pytest
import torch
import torch.nn.functional as F

from loop_reference import dot, softmax_average, unit
from modules.criterion import RetrievalLoss, info_nce
from modules.heads import (
    DistributionHead,
    TokenWeightHead,
    pool_samples,
    sample_gaussian,
    text_pool_mask,
    uniform_weights,
)

TAU = 0.07
LOG_100 = math.log(100.0)


# Loop references, independent of the vectorised code.


def loop_i2t(video, video_weights, text, text_mask: Optional[torch.Tensor] = None) -> List[List[float]]:
    out = []
    for a in range(video.shape[0]):
        row = []
        for b in range(text.shape[0]):
            words = [j for j in range(text.shape[1]) if text_mask is None or text_mask[b, j]]
            total = 0.0
            for i in range(video.shape[1]):
                scores = [dot(unit(video[a, i]), unit(text[b, j])) for j in words]
                total += float(video_weights[a, i]) * softmax_average(scores, TAU)
            row.append(total)
        out.append(row)
    return out


def loop_t2i(video, text, text_weights, video_mask: Optional[torch.Tensor] = None) -> List[List[float]]:
    out = []
    for a in range(video.shape[0]):
        row = []
        for b in range(text.shape[0]):
            clips = [i for i in range(video.shape[1]) if video_mask is None or video_mask[a, i]]
            total = 0.0
            for j in range(text.shape[1]):
                scores = [dot(unit(video[a, i]), unit(text[b, j])) for i in clips]
                total += float(text_weights[b, j]) * softmax_average(scores, TAU)
            row.append(total)
        out.append(row)
    return out


def loop_ot(video_samples, text_samples, eps=0.1, max_iter=100, tol=1e-2) -> List[List[float]]:
    """Plain Sinkhorn for all pairs in lockstep (one global stopping test), then the max aggregation."""
    num_videos, num_texts, size = video_samples.shape[0], text_samples.shape[0], video_samples.shape[1]
    sims = {
        (a, b): [[float(video_samples[a, k] @ text_samples[b, l]) for l in range(size)] for k in range(size)]
        for a in range(num_videos)
        for b in range(num_texts)
    }
    kernels = {key: [[math.exp(-(1.0 - s) / eps) for s in row] for row in sim] for key, sim in sims.items()}
    rs = {key: [1.0] * size for key in sims}
    cs = {key: [1.0] * size for key in sims}
    for _ in range(max_iter):
        change = 0.0
        for key, kernel in kernels.items():
            r = [(1.0 / size) / sum(kernel[k][l] * cs[key][l] for l in range(size)) for k in range(size)]
            c = [(1.0 / size) / sum(kernel[k][l] * r[k] for k in range(size)) for l in range(size)]
            change += sum(abs(x - y) for x, y in zip(r, rs[key]))
            rs[key], cs[key] = r, c
        if change / (len(kernels) * size) < tol:
            break
    out = [[0.0] * num_texts for _ in range(num_videos)]
    for (a, b), sim in sims.items():
        kernel, r, c = kernels[(a, b)], rs[(a, b)], cs[(a, b)]
        weighted = [[r[k] * kernel[k][l] * c[l] * sim[k][l] for l in range(size)] for k in range(size)]
        over_k = sum(max(weighted[k][l] for k in range(size)) for l in range(size)) / size
        over_l = sum(max(weighted[k][l] for l in range(size)) for k in range(size)) / size
        out[a][b] = 0.5 * (over_k + over_l)
    return out


def loop_cross_entropy(logits: List[List[float]]) -> float:
    """Row-wise InfoNCE with the diagonal as positives."""
    total = 0.0
    for a, row in enumerate(logits):
        top = max(row)
        log_sum = top + math.log(sum(math.exp(x - top) for x in row))
        total += log_sum - row[a]
    return total / len(logits)


def _transpose(matrix: List[List[float]]) -> List[List[float]]:
    return [list(column) for column in zip(*matrix)]


def _combine(scale: float, main: List[List[float]], weight: float, extra: List[List[float]]) -> List[List[float]]:
    return [[scale * x + weight * y for x, y in zip(row, extra_row)] for row, extra_row in zip(main, extra)]


def loop_loss(outputs, method="upret", dual_mix=0.5, ot_weight=1.0, ot_mode="logits", masked=False) -> dict:
    video, text, text_aug = outputs["video"], outputs["text"], outputs["text_aug"]
    scale = math.exp(float(outputs["logit_scale"]))
    i2t = loop_i2t(video["tokens"], video["weights"], text["tokens"], text["mask"] if masked else None)
    t2i = loop_t2i(video["tokens"], text_aug["tokens"], text_aug["weights"], video["mask"] if masked else None)
    size = len(i2t)
    zeros = [[0.0] * size for _ in range(size)]
    ot = loop_ot(video["samples"], text_aug["samples"]) if method == "upret" else zeros

    in_logits = ot_weight if ot_mode == "logits" else 0.0
    m1 = _combine(scale, i2t, in_logits, ot)
    m2 = _combine(scale, t2i, in_logits, ot)
    d = dual_mix
    infonce = 0.5 * (d * loop_cross_entropy(m1) + (1 - d) * loop_cross_entropy(_transpose(m1)))
    infonce += 0.5 * (d * loop_cross_entropy(_transpose(m2)) + (1 - d) * loop_cross_entropy(m2))
    total = infonce
    ot_term = sum(abs(ot_weight * x) for row in ot for x in row) / size**2
    if method == "upret" and ot_mode == "loss":
        scaled = _combine(scale, ot, 0.0, zeros)
        ot_term = ot_weight * 0.5 * (loop_cross_entropy(scaled) + loop_cross_entropy(_transpose(scaled)))
        total += ot_term
    return {"loss": total, "loss/infonce": infonce, "loss/ot": ot_term}


# Synthetic per-item outputs.


def _softmax_weights(mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    scores = torch.randn(mask.shape, generator=generator, dtype=torch.float64)
    return torch.softmax(scores.masked_fill(mask == 0, -math.inf), dim=-1)


def _pooled(batch: int, generator: torch.Generator) -> torch.Tensor:
    center = F.normalize(torch.randn(batch, 1, 8, generator=generator, dtype=torch.float64), dim=-1)
    return F.normalize(center + 0.15 * torch.randn(batch, 2, 8, generator=generator, dtype=torch.float64), dim=-1)


def make_outputs(seed: int = 0, batch: int = 4) -> dict:
    generator = torch.Generator().manual_seed(seed)
    video_mask = torch.zeros(batch, 5)
    text_mask = torch.zeros(batch, 4)
    for n in range(batch):
        video_mask[n, 1 : 2 + (n + 1) % 4] = 1.0  # CLS slot 0 is never valid
        text_mask[n, : 2 + n % 3] = 1.0  # SOT..EOT
    text_tokens = 2.0 * torch.randn(batch, 4, 8, generator=generator, dtype=torch.float64)
    text_aug_tokens = text_tokens.clone()
    text_aug_tokens[0, [1, 2]] = text_tokens[0, [2, 1]]
    return {
        "video": {
            "tokens": 2.0 * torch.randn(batch, 5, 8, generator=generator, dtype=torch.float64),
            "mask": video_mask,
            "weights": _softmax_weights(video_mask, generator),
            "samples": _pooled(batch, generator),
            "log_sigma": torch.randn(batch, 5, 8, generator=generator, dtype=torch.float64),
        },
        "text": {"tokens": text_tokens, "mask": text_mask},
        "text_aug": {
            "tokens": text_aug_tokens,
            "mask": text_mask.clone(),
            "weights": _softmax_weights(text_mask, generator),
            "samples": _pooled(batch, generator),
            "log_sigma": torch.randn(batch, 4, 8, generator=generator, dtype=torch.float64),
        },
        "logit_scale": torch.tensor(LOG_100, dtype=torch.float64),
    }


# Loss values.


def test_info_nce_matches_loop():
    logits = torch.randn(5, 5, generator=torch.Generator().manual_seed(1))
    assert float(info_nce(logits)) == pytest.approx(loop_cross_entropy(logits.tolist()), rel=1e-6)
    assert float(info_nce(logits)) != pytest.approx(float(info_nce(logits.t())), rel=1e-3)
    assert float(info_nce(100.0 * torch.eye(4))) < 1e-6


@pytest.mark.parametrize("dual_mix", [0.5, 0.3])
def test_upret_loss_matches_loops(dual_mix):
    outputs = make_outputs(seed=1)
    result = RetrievalLoss(method="upret", dual_mix=dual_mix)(outputs)
    expected = loop_loss(outputs, dual_mix=dual_mix)
    assert float(result["loss"]) == pytest.approx(expected["loss"], rel=1e-5)
    assert float(result["loss/infonce"]) == pytest.approx(expected["loss/infonce"], rel=1e-5)
    assert float(result["loss/ot"]) == pytest.approx(expected["loss/ot"], rel=1e-5)


def test_upret_ot_changes_loss():
    outputs = make_outputs(seed=2)
    with_ot = loop_loss(outputs, ot_weight=1.0)["loss"]
    without_ot = loop_loss(outputs, ot_weight=0.0)["loss"]
    assert abs(with_ot - without_ot) > 1e-4
    result = RetrievalLoss(method="upret", ot_weight=1.0)(outputs)
    assert float(result["loss"]) == pytest.approx(with_ot, rel=1e-5)


def test_upret_ot_loss_mode():
    outputs = make_outputs(seed=3)
    result = RetrievalLoss(method="upret", ot_weight=0.7, ot_mode="loss")(outputs)
    expected = loop_loss(outputs, ot_weight=0.7, ot_mode="loss")
    assert float(result["loss"]) == pytest.approx(expected["loss"], rel=1e-5)
    assert float(result["loss/infonce"]) == pytest.approx(expected["loss/infonce"], rel=1e-5)
    assert float(result["loss/ot"]) == pytest.approx(expected["loss/ot"], rel=1e-5)


def test_masked_softmax_variant():
    outputs = make_outputs(seed=4)
    result = RetrievalLoss(method="upret", masked_softmax=True)(outputs)
    expected = loop_loss(outputs, masked=True)
    unmasked = loop_loss(outputs, masked=False)
    assert float(result["loss"]) == pytest.approx(expected["loss"], rel=1e-5)
    assert abs(expected["loss"] - unmasked["loss"]) > 1e-4


def test_cico_loss_matches_loops():
    outputs = make_outputs(seed=5)
    outputs["video"]["weights"] = uniform_weights(outputs["video"]["mask"]).double()
    outputs["text_aug"]["weights"] = uniform_weights(outputs["text_aug"]["mask"]).double()
    for key in ("samples", "log_sigma"):
        del outputs["video"][key]
        del outputs["text_aug"][key]
    result = RetrievalLoss(method="cico")(outputs)
    expected = loop_loss(outputs, method="cico")
    assert set(result) == {"loss", "loss/infonce", "logit_scale"}
    assert float(result["loss"]) == pytest.approx(expected["loss"], rel=1e-5)
    assert float(result["logit_scale"]) == pytest.approx(100.0, rel=1e-6)


def test_zero_ot_weight_equals_infonce():
    outputs = make_outputs(seed=6)
    upret = RetrievalLoss(method="upret", ot_weight=0.0)(outputs)
    cico = RetrievalLoss(method="cico")(outputs)
    assert float(upret["loss"]) == pytest.approx(float(cico["loss"]), rel=1e-6)
    assert float(upret["loss/ot"]) == 0.0


def test_returned_terms_detached():
    outputs = make_outputs(seed=7)
    outputs["logit_scale"] = torch.nn.Parameter(torch.tensor(2.0))
    result = RetrievalLoss(method="upret")(outputs)
    assert set(result) == {"loss", "loss/infonce", "loss/ot", "log_sigma/video", "log_sigma/text", "logit_scale"}
    assert result["loss"].requires_grad
    for key in set(result) - {"loss"}:
        assert not result[key].requires_grad, key
    assert float(result["logit_scale"]) == pytest.approx(math.exp(2.0), rel=1e-6)

    video = outputs["video"]
    valid = [(n, i) for n in range(4) for i in range(5) if video["mask"][n, i]]
    expected = sum(float(video["log_sigma"][n, i, d]) for n, i in valid for d in range(8)) / (8 * len(valid))
    assert float(result["log_sigma/video"]) == pytest.approx(expected, rel=1e-5)
    text = outputs["text_aug"]
    valid = [(n, j) for n in range(4) for j in range(4) if text["mask"][n, j]]
    expected = sum(float(text["log_sigma"][n, j, d]) for n, j in valid for d in range(8)) / (8 * len(valid))
    assert float(result["log_sigma/text"]) == pytest.approx(expected, rel=1e-5)


def test_float32_under_autocast():
    outputs = make_outputs(seed=8)
    reference = RetrievalLoss(method="upret")(outputs)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        result = RetrievalLoss(method="upret")(outputs)
    assert result["loss"].dtype == torch.float32
    assert float(result["loss"]) == pytest.approx(float(reference["loss"]), rel=1e-6)


def test_gather_is_applied():
    full = make_outputs(seed=9, batch=4)
    other_rank = {
        part: {key: value[2:] for key, value in full[part].items()} for part in ("video", "text", "text_aug")
    }

    def local_slice(outputs: dict) -> dict:
        sliced = {part: {key: value[:2] for key, value in outputs[part].items()} for part in ("video", "text", "text_aug")}
        sliced["logit_scale"] = outputs["logit_scale"]
        return sliced

    def fake_gather(outputs: dict) -> dict:
        gathered = {
            part: {key: torch.cat([value, other_rank[part][key]]) for key, value in outputs[part].items()}
            for part in ("video", "text", "text_aug")
        }
        gathered["logit_scale"] = outputs["logit_scale"]
        return gathered

    local = local_slice(copy.deepcopy(full))
    local["video"]["tokens"].requires_grad_()
    result = RetrievalLoss(method="upret", gather=fake_gather)(local)
    expected = RetrievalLoss(method="upret")(full)
    assert float(result["loss"].detach()) == pytest.approx(float(expected["loss"]), rel=1e-6)
    result["loss"].backward()
    assert local["video"]["tokens"].grad.abs().sum() > 0


def test_invalid_options_raise():
    with pytest.raises(ValueError, match="method"):
        RetrievalLoss(method="clip")
    with pytest.raises(ValueError, match="ot_mode"):
        RetrievalLoss(ot_mode="both")
    with pytest.raises(ValueError, match="ot_aggregation"):
        RetrievalLoss(ot_aggregation="mean")


# Gradient routes through a small head pipeline.


class _Heads(torch.nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.video_weight = TokenWeightHead(dim)
        self.text_weight = TokenWeightHead(dim)
        self.video_distribution = DistributionHead(dim, heads=2, dropout=0.0)
        self.text_distribution = DistributionHead(dim, heads=2, dropout=0.0)
        self.logit_scale = torch.nn.Parameter(torch.tensor(LOG_100))

    def forward(self, video_tokens, video_mask, text_tokens, text_aug_tokens, text_mask) -> dict:
        generator = torch.Generator().manual_seed(0)
        video_mu, video_log_sigma = self.video_distribution(video_tokens)
        text_mu, text_log_sigma = self.text_distribution(text_aug_tokens)
        video_samples = sample_gaussian(video_mu, video_log_sigma, 2, generator=generator)
        text_samples = sample_gaussian(text_mu, text_log_sigma, 2, generator=generator)
        return {
            "video": {
                "tokens": video_tokens,
                "mask": video_mask,
                "weights": self.video_weight(video_tokens, video_mask),
                "samples": pool_samples(video_samples, video_mask),
                "log_sigma": video_log_sigma,
            },
            "text": {"tokens": text_tokens, "mask": text_mask},
            "text_aug": {
                "tokens": text_aug_tokens,
                "mask": text_mask,
                "weights": self.text_weight(text_aug_tokens, text_mask),
                "samples": pool_samples(text_samples, text_pool_mask(text_mask)),
                "log_sigma": text_log_sigma,
            },
            "logit_scale": self.logit_scale,
        }


def _head_gradients(ot_weight: float, ot_mode: str = "logits"):
    torch.manual_seed(10)
    heads = _Heads()
    generator = torch.Generator().manual_seed(11)
    video_tokens = torch.randn(4, 6, 16, generator=generator, requires_grad=True)
    text_tokens = torch.randn(4, 5, 16, generator=generator)
    video_mask = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0]])
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    outputs = heads(video_tokens, video_mask.float(), text_tokens, text_tokens.clone(), text_mask.float())
    loss = RetrievalLoss(method="upret", ot_weight=ot_weight, ot_mode=ot_mode)(outputs)["loss"]
    loss.backward()
    return heads, video_tokens


def _grad_size(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_distribution_heads_get_no_gradient_without_ot():
    heads, video_tokens = _head_gradients(ot_weight=0.0)
    assert _grad_size(heads.video_distribution) == 0.0
    assert _grad_size(heads.text_distribution) == 0.0
    assert _grad_size(heads.video_weight) > 0.0
    assert _grad_size(heads.text_weight) > 0.0
    assert heads.logit_scale.grad is not None
    assert float(heads.logit_scale.grad.abs()) > 0.0
    assert torch.isfinite(video_tokens.grad).all()


@pytest.mark.parametrize("ot_mode", ["logits", "loss"])
def test_distribution_heads_get_gradient_through_ot(ot_mode):
    heads, video_tokens = _head_gradients(ot_weight=1.0, ot_mode=ot_mode)
    for module in (heads.video_distribution, heads.text_distribution, heads.video_weight, heads.text_weight):
        assert _grad_size(module) > 0.0
        assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
    assert torch.isfinite(video_tokens.grad).all()


def test_chunk_size_does_not_change_loss():
    outputs = make_outputs(seed=12)
    reference = RetrievalLoss(method="upret")(outputs)
    chunked = RetrievalLoss(method="upret", chunk_elements=3)(outputs)
    assert float(chunked["loss"]) == pytest.approx(float(reference["loss"]), rel=1e-6)  # float32 inside
    with pytest.raises(ValueError, match="chunk_elements"):
        RetrievalLoss(chunk_elements=0)
