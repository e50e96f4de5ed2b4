"""Tests for modules.optimization: BertAdam against a hand-written loop, the schedule, groups and freezing."""
import copy
import math

import pytest
import torch
from torch import nn

from modules.optimization import (
    BertAdam,
    build_optimizer,
    build_scheduler,
    freeze_text_embeddings,
    param_groups,
    warmup_cosine,
)


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.ln_1 = nn.LayerNorm(3)
        self.scale = nn.Parameter(torch.tensor(2.0))


class ToyCLIP(nn.Module):
    """A stand-in with the parameter names of the CLIP module (text and visual embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(10, 4)
        self.positional_embedding = nn.Parameter(torch.zeros(5, 4))
        self.visual = nn.Module()
        self.visual.positional_embedding = nn.Parameter(torch.zeros(3, 4))
        self.visual.proj = nn.Parameter(torch.zeros(4, 4))
        self.logit_scale = nn.Parameter(torch.tensor(4.6))


class ToyRetrievalModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.clip = ToyCLIP()
        self.head = nn.Linear(4, 1)


def _loss(model: TinyModel, inputs: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * (model.ln_1(model.proj(inputs)) * model.scale).pow(2).sum()


def _reference_update(params, grads, states, lr, weight_decays, betas, eps, max_norm):
    """One step of the released update, written out per tensor with plain tensor arithmetic."""
    beta1, beta2 = betas
    for index, (param, grad) in enumerate(zip(params, grads)):
        norm = math.sqrt(float((grad.double() ** 2).sum()))
        # torch.nn.utils.clip_grad_norm_ scales by min(1, max_norm / (norm + 1e-6)).
        grad = grad * min(1.0, max_norm / (norm + 1e-6))
        exp_avg, exp_avg_sq = states[index]
        exp_avg = beta1 * exp_avg + (1 - beta1) * grad
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
        states[index] = (exp_avg, exp_avg_sq)
        update = exp_avg / (torch.sqrt(exp_avg_sq) + eps) + weight_decays[index] * param
        params[index] = param - lr * update


# BertAdam.
def test_bertadam_matches_reference_loop():
    torch.manual_seed(0)
    model = TinyModel()
    names = [name for name, _ in model.named_parameters()]
    params = [param.detach().clone() for param in model.parameters()]
    states = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    weight_decay, lr, betas, eps = 0.1, 0.01, (0.9, 0.98), 1e-6
    # Biases (proj.bias, ln_1.bias) are not decayed, but every other tensor is.
    weight_decays = [0.0 if "bias" in name else weight_decay for name in names]
    optimizer = build_optimizer(model, "bertadam", lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)

    for step in range(4):
        inputs = torch.randn(5, 4)
        # A large loss scale on two of the steps makes every gradient norm exceed 1, so clipping acts.
        scale = 1000.0 if step in (0, 2) else 0.01
        optimizer.zero_grad()
        _loss(model, inputs, scale).backward()
        grads = [param.grad.detach().clone() for param in model.parameters()]
        if step == 0:
            assert all(float(grad.norm()) > 1.0 for grad in grads)

        _reference_update(params, grads, states, lr, weight_decays, betas, eps, max_norm=1.0)
        optimizer.step()

        for name, param, expected in zip(names, model.parameters(), params):
            torch.testing.assert_close(param.detach(), expected, rtol=1e-5, atol=1e-6, msg=f"{name} at step {step}")


def test_bertadam_clips_gradient_in_place():
    param = nn.Parameter(torch.zeros(3))
    optimizer = BertAdam([param], lr=0.1, weight_decay=0.0, max_grad_norm=1.0)
    param.grad = torch.tensor([30.0, 40.0, 0.0])
    optimizer.step()
    # Norm 50 is clipped to 1: the clipped gradient is [0.6, 0.8, 0] (up to clip_grad_norm_'s 1e-6).
    torch.testing.assert_close(param.grad, torch.tensor([0.6, 0.8, 0.0]), rtol=1e-5, atol=1e-7)
    # First step without bias correction: m = 0.1 g, v = 0.02 g^2, update = 0.1 / sqrt(0.02) * sign(g).
    expected_step = 0.1 * (0.1 / math.sqrt(0.02))
    torch.testing.assert_close(param.detach(), torch.tensor([-expected_step, -expected_step, 0.0]))


def test_bertadam_without_clip_and_skips_missing_grad():
    used = nn.Parameter(torch.ones(2))
    unused = nn.Parameter(torch.ones(2))
    optimizer = BertAdam([used, unused], lr=1.0, weight_decay=0.5, max_grad_norm=None)
    used.grad = torch.tensor([100.0, -100.0])
    optimizer.step()
    # No clip: update = 0.1 g / (sqrt(0.02) |g| + 1e-6) + 0.5 p.
    expected = 1.0 - (0.1 * 100.0 / (math.sqrt(0.02) * 100.0 + 1e-6) * torch.tensor([1.0, -1.0]) + 0.5)
    torch.testing.assert_close(used.detach(), expected)
    torch.testing.assert_close(unused.detach(), torch.ones(2))
    assert unused not in optimizer.state


def test_bertadam_rejects_invalid_arguments():
    param = nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="lr"):
        BertAdam([param], lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        BertAdam([param], lr=1.0, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="eps"):
        BertAdam([param], lr=1.0, eps=-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        BertAdam([param], lr=1.0, weight_decay=-0.1)
    with pytest.raises(ValueError, match="max_grad_norm"):
        BertAdam([param], lr=1.0, max_grad_norm=-1.0)


def test_state_dict_round_trip():
    torch.manual_seed(1)
    model = TinyModel()
    optimizer = build_optimizer(model, "bertadam", lr=0.01, weight_decay=0.01)
    scheduler = build_scheduler(optimizer, total_steps=10, warmup=0.2)
    batches = [torch.randn(5, 4) for _ in range(5)]

    def train_step(net, opt, sched, inputs):
        opt.zero_grad()
        _loss(net, inputs, 1.0).backward()
        opt.step()
        sched.step()

    for inputs in batches[:3]:
        train_step(model, optimizer, scheduler, inputs)

    resumed_model = copy.deepcopy(model)
    resumed_optimizer = build_optimizer(resumed_model, "bertadam", lr=0.01, weight_decay=0.01)
    resumed_scheduler = build_scheduler(resumed_optimizer, total_steps=10, warmup=0.2)
    resumed_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    resumed_scheduler.load_state_dict(copy.deepcopy(scheduler.state_dict()))
    assert resumed_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]

    for inputs in batches[3:]:
        train_step(model, optimizer, scheduler, inputs)
        train_step(resumed_model, resumed_optimizer, resumed_scheduler, inputs)
    for param, resumed in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(param, resumed)


# Schedule.
def test_warmup_cosine_values():
    assert warmup_cosine(0.0) == 0.0
    assert warmup_cosine(0.05) == pytest.approx(0.5)
    assert warmup_cosine(0.0999) == pytest.approx(0.999)
    # The documented drop: cos(0.1 pi) = 0.9510565163, so the multiplier is 0.9755282582 at 0.1.
    assert warmup_cosine(0.1) == pytest.approx(0.9755282582)
    assert warmup_cosine(0.5) == pytest.approx(0.5)
    assert warmup_cosine(1.0) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(1.5) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(0.3, warmup=0.0) == pytest.approx(0.5 * (1 + math.cos(0.3 * math.pi)))


def test_warmup_cosine_rejects_invalid_arguments():
    with pytest.raises(ValueError, match="progress"):
        warmup_cosine(-0.1)
    with pytest.raises(ValueError, match="warmup"):
        warmup_cosine(0.5, warmup=1.0)


def test_scheduler_over_a_full_run():
    # The CSL run: 2,400 steps, 240 of them warm-up.
    total_steps, base_lr = 2400, 1e-5
    param = nn.Parameter(torch.zeros(2))
    optimizer = BertAdam([param], lr=base_lr)
    scheduler = build_scheduler(optimizer, total_steps, warmup=0.1)
    lrs = []
    for _ in range(total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.ones(2)
        optimizer.step()
        scheduler.step()

    assert lrs[0] == 0.0
    assert lrs[120] == pytest.approx(0.5 * base_lr)
    # The peak is the last warm-up step, 239 / 240 of the base lr.
    assert max(lrs) == lrs[239]
    assert lrs[239] == pytest.approx(base_lr * 239 / 240)
    assert lrs[240] == pytest.approx(base_lr * 0.9755282582)
    # Last step: 0.5 (1 + cos(pi 2399 / 2400)) = sin^2(pi / 4800), about 4.3e-7 of the base lr.
    assert lrs[-1] == pytest.approx(base_lr * math.sin(math.pi / 4800) ** 2)
    assert lrs[-1] < 1e-6 * base_lr


def test_build_scheduler_rejects_invalid_arguments():
    optimizer = BertAdam([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="total_steps"):
        build_scheduler(optimizer, total_steps=0)
    with pytest.raises(ValueError, match="warmup"):
        build_scheduler(optimizer, total_steps=10, warmup=-0.1)


# Parameter groups and optimiser choice.
def test_param_groups_exclude_biases_only():
    model = TinyModel()
    model.LayerNorm = nn.LayerNorm(3)  # a BERT-style name, the only case where LayerNorm weights are excluded
    model.frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
    groups = param_groups(model, weight_decay=0.001)
    decay_names = [name for name, _ in groups[0]["params"]]
    no_decay_names = [name for name, _ in groups[1]["params"]]
    assert decay_names == ["scale", "proj.weight", "ln_1.weight"]
    assert groups[0]["weight_decay"] == 0.001
    assert no_decay_names == ["proj.bias", "ln_1.bias", "LayerNorm.weight", "LayerNorm.bias"]
    assert groups[1]["weight_decay"] == 0.0


def test_param_groups_without_trainable_parameters_raises():
    model = TinyModel().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        param_groups(model, weight_decay=0.001)


def test_build_optimizer_choices():
    model = TinyModel()
    bertadam = build_optimizer(model, "bertadam", lr=1e-5, weight_decay=0.001)
    assert isinstance(bertadam, BertAdam)
    assert bertadam.param_groups[1]["param_names"] == ["proj.bias", "ln_1.bias"]
    assert bertadam.param_groups[0]["betas"] == (0.9, 0.98)
    assert bertadam.param_groups[0]["eps"] == 1e-6
    assert bertadam.param_groups[0]["max_grad_norm"] == 1.0

    adamw = build_optimizer(model, "adamw", lr=1e-5, weight_decay=0.001)
    assert isinstance(adamw, torch.optim.AdamW)
    assert [group["weight_decay"] for group in adamw.param_groups] == [0.001, 0.0]

    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(model, "sgd")


# Freezing.
def test_freeze_text_embeddings_exact_names():
    model = ToyRetrievalModel()
    frozen = freeze_text_embeddings(model)
    assert frozen == ["clip.positional_embedding", "clip.token_embedding.weight"]
    trainable = sorted(name for name, param in model.named_parameters() if param.requires_grad)
    assert trainable == [
        "clip.logit_scale",
        "clip.visual.positional_embedding",
        "clip.visual.proj",
        "head.bias",
        "head.weight",
    ]
    # Frozen tensors stay out of the optimiser.
    optimizer = build_optimizer(model, "bertadam")
    names = [name for group in optimizer.param_groups for name in group["param_names"]]
    assert "clip.token_embedding.weight" not in names
    assert "clip.positional_embedding" not in names


def test_freeze_text_embeddings_through_wrapper():
    wrapper = nn.Module()
    wrapper.module = ToyRetrievalModel()
    frozen = freeze_text_embeddings(wrapper)
    assert sorted(frozen) == ["module.clip.positional_embedding", "module.clip.token_embedding.weight"]


def test_freeze_text_embeddings_missing_raises():
    with pytest.raises(ValueError, match="clip.token_embedding.weight"):
        freeze_text_embeddings(TinyModel())
