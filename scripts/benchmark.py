#!/usr/bin/env python
"""Measure the speed and memory of the UPRet training head, a training step and a gallery evaluation.

Every section compares the project's implementation with a naive dense implementation of the same
formulas. That implementation is written out in this file without the project's similarity,
optimal-transport or loss code. It builds the token-wise softmax similarities in both directions as
[B, B, Tv, Tt] tensors and runs a plain-domain Sinkhorn, the max-based OT score and the symmetric
InfoNCE. Both run on the same inputs, and the
losses and gradients must agree to a relative 1e-5.

Sections (--sections, default all):
    a  training head at --batch_size (token weights, both similarity directions, distribution heads,
       sampling, Sinkhorn, OT score, loss; forward and backward): peak memory <= 0.25 x dense and
       time <= 1.1 x dense
    b  sharded head of one rank out of 4 simulated ranks (local batch_size / 4): time <= 0.35 x the
       single-process head of section a
    c  whole training step at batch 48 with ViT-B/32 towers (random weights): time <= dense and
       peak memory <= 0.8 x dense, with the time split into text encoder, video encoder, head and
       optimiser
    d  evaluation of a --gallery x --gallery gallery of random features: time and peak memory
    e  GFLOP/s of the similarity kernels next to a plain matrix product of the same FLOP count:
       evaluation kernel >= 0.6 x the matrix product

Peak memory is measured in a fresh subprocess per measurement: on a GPU with
torch.cuda.max_memory_allocated, on a CPU as the growth of the resident set (VmHWM after resetting it
through /proc/self/clear_refs, minus VmRSS before the step). Times are medians over --steps steps
after one warm-up step.

Input masks follow the real data: each video has between 24 and 64 real clips (most have 64) and
each sentence has between 9 and 32 tokens from SOT to EOT. `--full_masks` makes every position
valid, the worst case for the project's head, which skips tokens whose weight is zero.

Example:
    .venv/bin/python scripts/benchmark.py --device cpu --sections a,b,e --batch_size 128
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from modules.heads import (  # noqa: E402
    DistributionHead,
    TokenWeightHead,
    pool_samples,
    sample_gaussian,
    text_pool_mask,
)

VIDEO_LEN, TEXT_LEN, DIM, SAMPLES = 65, 32, 512, 2
TAU, OT_EPS, SINKHORN_ITERS, SINKHORN_TOL = 0.07, 0.1, 100, 1e-2
QUICK = {"batch_size": 8, "gallery": 24, "train_batch": 4, "dim": 32}
RELATIVE_TOLERANCE = 1e-5


# Naive dense reference, written from the formulas.


def naive_similarities(video, video_weights, text, text_aug, text_aug_weights):
    """Return I2T [B, B] (original text) and T2I [B, B] (augmented text) with [B, B, Tv, Tt] tensors."""
    v = video / video.norm(dim=-1, keepdim=True)
    t = text / text.norm(dim=-1, keepdim=True)
    t_aug = text_aug / text_aug.norm(dim=-1, keepdim=True)
    sim = torch.einsum("aid,bjd->abij", v, t)
    clip_to_words = (torch.softmax(sim / TAU, dim=3) * sim).sum(dim=3)  # [B, B, Tv]
    i2t = (clip_to_words * video_weights[:, None, :]).sum(dim=2)
    sim_aug = torch.einsum("aid,bjd->abij", v, t_aug)
    word_to_clips = (torch.softmax(sim_aug / TAU, dim=2) * sim_aug).sum(dim=2)  # [B, B, Tt]
    t2i = (word_to_clips * text_aug_weights[None, :, :]).sum(dim=2)
    return i2t, t2i


@torch.no_grad()
def naive_sinkhorn(cost: torch.Tensor) -> torch.Tensor:
    """Plain-domain Sinkhorn in float64 from r = c = 1 with uniform marginals and one global stopping test."""
    kernel = torch.exp(-cost.double() / OT_EPS)
    rows, cols = cost.shape[-2], cost.shape[-1]
    r = torch.ones(cost.shape[:-1], dtype=torch.float64, device=cost.device)
    c = torch.ones(cost.shape[:-2] + (cols,), dtype=torch.float64, device=cost.device)
    for _ in range(SINKHORN_ITERS):
        r_prev = r
        r = (1.0 / rows) / (kernel @ c.unsqueeze(-1)).squeeze(-1)
        c = (1.0 / cols) / (kernel.transpose(-1, -2) @ r.unsqueeze(-1)).squeeze(-1)
        if (r - r_prev).abs().mean().item() < SINKHORN_TOL:
            break
    return (r.unsqueeze(-1) * kernel * c.unsqueeze(-2)).to(cost.dtype)


def naive_ot(video_samples, text_samples):
    sim = torch.einsum("akd,bld->abkl", video_samples, text_samples)
    weighted = naive_sinkhorn(1.0 - sim) * sim
    return 0.5 * (weighted.max(dim=2).values.mean(dim=-1) + weighted.max(dim=3).values.mean(dim=-1))


def naive_loss(outputs: Dict[str, Any]) -> torch.Tensor:
    video, text, text_aug = outputs["video"], outputs["text"], outputs["text_aug"]
    i2t, t2i = naive_similarities(video["tokens"], video["weights"], text["tokens"], text_aug["tokens"],
                                  text_aug["weights"])
    ot = naive_ot(video["samples"], text_aug["samples"])
    scale = outputs["logit_scale"].exp()
    m1, m2 = scale * i2t + ot, scale * t2i + ot
    targets = torch.arange(m1.shape[0], device=m1.device)

    def ce(logits):
        return F.cross_entropy(logits, targets)

    return 0.5 * (0.5 * ce(m1) + 0.5 * ce(m1.t())) + 0.5 * (0.5 * ce(m2.t()) + 0.5 * ce(m2))


def project_loss(outputs: Dict[str, Any], comm=None, gather=None) -> torch.Tensor:
    from modules.criterion import RetrievalLoss

    return RetrievalLoss(method="upret", comm=comm, gather=gather)(outputs)["loss"]


# Inputs and the per-item head shared by both implementations.


def make_masks(batch: int, generator: torch.Generator, full: bool):
    video_mask = torch.zeros(batch, VIDEO_LEN)
    text_mask = torch.zeros(batch, TEXT_LEN)
    clips = torch.randint(24, 121, (batch,), generator=generator).clamp(max=VIDEO_LEN - 1)
    words = torch.randint(9, TEXT_LEN + 1, (batch,), generator=generator)
    for n in range(batch):
        video_mask[n, 1:1 + (VIDEO_LEN - 1 if full else int(clips[n]))] = 1.0
        text_mask[n, :TEXT_LEN if full else int(words[n])] = 1.0
    return video_mask, text_mask


def make_tokens(batch: int, dim: int, seed: int, full: bool, device: torch.device) -> Dict[str, torch.Tensor]:
    """Random encoder outputs: video [B, 65, D], text and augmented text [B, 32, D] and their masks."""
    generator = torch.Generator().manual_seed(seed)
    video_mask, text_mask = make_masks(batch, generator, full)
    text = torch.randn(batch, TEXT_LEN, dim, generator=generator)
    text_aug = text.clone()
    for n in range(0, batch, 2):  # every other sentence gets one swapped word pair, like random swap
        text_aug[n, [1, 2]] = text[n, [2, 1]]
    tensors = {
        "video": torch.randn(batch, VIDEO_LEN, dim, generator=generator),
        "video_mask": video_mask,
        "text": text,
        "text_aug": text_aug,
        "text_mask": text_mask,
    }
    return {key: value.to(device) for key, value in tensors.items()}


class Head(nn.Module):
    """UPRet's per-item heads: token weights, distribution heads, sampling and pooling."""

    def __init__(self, dim: int, checkpoint_activations: bool = False) -> None:
        super().__init__()
        heads = 8 if dim % 8 == 0 else 2
        self.video_weight = TokenWeightHead(dim)
        self.text_weight = TokenWeightHead(dim)
        self.video_distribution = DistributionHead(dim, heads=heads, dropout=0.0,
                                                   checkpoint_activations=checkpoint_activations)
        self.text_distribution = DistributionHead(dim, heads=heads, dropout=0.0,
                                                  checkpoint_activations=checkpoint_activations)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(100.0)))

    def forward(self, video, video_mask, text, text_aug, text_mask, seed: int = 0) -> Dict[str, Any]:
        generator = torch.Generator(device=video.device).manual_seed(seed)
        video_mu, video_log_sigma = self.video_distribution(video)
        text_mu, text_log_sigma = self.text_distribution(text_aug)
        replay = self.video_distribution.checkpoint_activations
        video_samples = sample_gaussian(video_mu, video_log_sigma, SAMPLES, generator=generator, replay_noise=replay)
        text_samples = sample_gaussian(text_mu, text_log_sigma, SAMPLES, generator=generator, replay_noise=replay)
        return {
            "video": {"tokens": video, "mask": video_mask, "weights": self.video_weight(video, video_mask),
                      "samples": pool_samples(video_samples, video_mask), "log_sigma": video_log_sigma},
            "text": {"tokens": text, "mask": text_mask},
            "text_aug": {"tokens": text_aug, "mask": text_mask, "weights": self.text_weight(text_aug, text_mask),
                         "samples": pool_samples(text_samples, text_pool_mask(text_mask)),
                         "log_sigma": text_log_sigma},
            "logit_scale": self.logit_scale,
        }


def build_head(dim: int, device: torch.device, impl: str) -> Head:
    """Build the per-item heads; the project's head checkpoints the distribution heads' activations."""
    torch.manual_seed(0)
    return Head(dim, checkpoint_activations=impl != "dense").to(device)


# Measurement helpers.


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{key} is missing from /proc/self/status; CPU peak memory needs Linux")


def measure_peak(fn: Callable[[], Any], device: torch.device) -> float:
    """Run `fn` once and return the growth of memory in MiB at its peak over the memory before it."""
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:  # hand freed heap pages back, so the step cannot reuse them without raising the peak
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    base = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident set
    fn()
    return _status_mib("VmHWM") - base


def time_steps(fn: Callable[[], Any], device: torch.device, steps: int) -> float:
    """Return the median wall time in seconds of `steps` calls of `fn` (after a warm-up by the caller)."""
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def close(result: torch.Tensor, expected: torch.Tensor) -> bool:
    scale = max(float(expected.abs().max()), 1.0) if expected.numel() else 1.0
    return bool((result.float() - expected.float()).abs().max() <= RELATIVE_TOLERANCE * scale)


# Workers: each runs in its own subprocess and prints one JSON line.


def _head_step(impl: str, head: Head, tokens: Dict[str, torch.Tensor], leaves: List[torch.Tensor]):
    def step():
        for tensor in leaves:
            tensor.grad = None
        head.zero_grad(set_to_none=True)
        outputs = head(tokens["video"], tokens["video_mask"], tokens["text"], tokens["text_aug"],
                       tokens["text_mask"])
        loss = naive_loss(outputs) if impl == "dense" else project_loss(outputs)
        loss.backward()
        return loss
    return step


class _ReplicaComm:
    """Stand-in collectives for timing one rank alone: every rank is assumed to send what this one sends."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().unsqueeze(0).expand((self.world_size,) + tuple(tensor.shape)).clone()


def _shard_step(head: Head, tokens: Dict[str, torch.Tensor], world_size: int):
    """One rank's head step: per-item heads on the local items, sharded loss against all texts.

    The other ranks' text outputs are prepared once outside the step, as the all-gather would
    deliver them, so the step contains this rank's compute only.
    """
    local = tokens["video"].shape[0] // world_size
    rows = slice(0, local)
    with torch.no_grad():
        full = head(tokens["video"], tokens["video_mask"], tokens["text"], tokens["text_aug"], tokens["text_mask"])
    remote = {part: {k: v[local:] for k, v in full[part].items() if k != "log_sigma"} for part in ("text", "text_aug")}
    comm = _ReplicaComm(0, world_size)

    def gather(outputs):
        return {part: {k: torch.cat([v, remote[part][k]]) for k, v in outputs[part].items()} for part in outputs}

    def step():
        head.zero_grad(set_to_none=True)
        outputs = head(tokens["video"][rows], tokens["video_mask"][rows], tokens["text"][rows],
                       tokens["text_aug"][rows], tokens["text_mask"][rows])
        loss = project_loss(outputs, comm=comm, gather=gather)
        loss.backward()
        return loss
    return step


def _train_setup(spec: Dict[str, Any], device: torch.device):
    from modules.clip import CLIPConfig
    from modules.criterion import RetrievalLoss
    from modules.model import RetrievalModel
    from modules.optimization import build_optimizer

    torch.manual_seed(0)
    if spec["quick"]:
        config = CLIPConfig(embed_dim=32, text_width=32, text_layers=1, text_heads=2, video_width=32,
                            video_layers=1, video_heads=2)
    else:
        config = CLIPConfig()
    model = RetrievalModel(config, method="upret", dist_heads=8 if config.embed_dim % 8 == 0 else 2).to(device)
    # The driver's defaults: --checkpoint_heads is off, because at this batch the towers' activations
    # dominate the memory and the recomputation would only cost time.
    if spec["impl"] == "dense":
        # The released towers keep autograd's QuickGELU activations; the project recomputes them.
        from modules.clip import ResidualAttentionBlock

        for block in model.modules():
            if isinstance(block, ResidualAttentionBlock):
                block.recompute_activation = False
    model.train()
    optimizer = build_optimizer(model)
    batch = spec["batch"]
    generator = torch.Generator().manual_seed(1)
    video_mask, text_mask = make_masks(batch, generator, spec["full_masks"])
    ids = torch.randint(1, 49000, (batch, TEXT_LEN), generator=generator)
    ids[:, 0] = 49406
    for n in range(batch):
        end = int(text_mask[n].sum()) - 1
        ids[n, end] = 49407
        ids[n, end + 1:] = 0
    ids_aug = ids.clone()
    ids_aug[::2, [1, 2]] = ids[::2, [2, 1]]
    video = torch.randn(batch, VIDEO_LEN - 1, 1024, generator=generator) * video_mask[:, 1:, None]
    inputs = [ids.to(device), ids_aug.to(device), video.to(device), video_mask.long().to(device)]
    criterion = RetrievalLoss(method="upret") if spec["impl"] != "dense" else None
    return model, optimizer, inputs, criterion


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _train_step(spec, device, model, optimizer, inputs, criterion):
    def step():
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, spec["precision"]):
            outputs = model(*inputs)
        loss = naive_loss(outputs) if criterion is None else criterion(outputs)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        return loss
    return step


def _train_breakdown(spec, device, model, optimizer, inputs, criterion) -> Dict[str, float]:
    """Time each part of a step on its own (forward and backward): towers, head and optimiser."""
    ids, ids_aug, video, video_mask = inputs
    steps = spec["steps"]
    clip = model.clip

    def text_encoder():
        with _autocast(device, spec["precision"]):
            tokens = torch.cat([clip.encode_text(ids), clip.encode_text(ids_aug)])
        tokens.float().sum().backward()

    def video_encoder():
        with _autocast(device, spec["precision"]):
            tokens = clip.encode_video(video, video_mask)
        tokens.float().sum().backward()

    with torch.no_grad(), _autocast(device, spec["precision"]):
        text_tokens = clip.encode_text(ids).float()
        text_aug_tokens = clip.encode_text(ids_aug).float()
        video_tokens = clip.encode_video(video, video_mask).float()
    text_mask = (torch.arange(ids.shape[1], device=device) <= ids.argmax(dim=-1, keepdim=True)).float()

    def head():
        leaves = [t.clone().requires_grad_() for t in (video_tokens, text_tokens, text_aug_tokens)]
        out_video = {"tokens": leaves[0], "mask": video_mask.float(),
                     "weights": model.video_weight_fc(leaves[0], video_mask.float())}
        mu, log_sigma = model.video_dist_head(leaves[0])
        out_video["samples"] = pool_samples(sample_gaussian(mu, log_sigma, SAMPLES), video_mask.float())
        out_video["log_sigma"] = log_sigma
        out_text = {"tokens": leaves[2], "mask": text_mask, "weights": model.text_weight_fc(leaves[2], text_mask)}
        mu, log_sigma = model.text_dist_head(leaves[2])
        out_text["samples"] = pool_samples(sample_gaussian(mu, log_sigma, SAMPLES), text_pool_mask(text_mask))
        out_text["log_sigma"] = log_sigma
        outputs = {"video": out_video, "text": {"tokens": leaves[1], "mask": text_mask}, "text_aug": out_text,
                   "logit_scale": model.logit_scale}
        loss = naive_loss(outputs) if criterion is None else criterion(outputs)["loss"]
        loss.backward()

    def optimiser():
        optimizer.step()

    parts = {}
    for name, fn in (("text encoder", text_encoder), ("video encoder", video_encoder), ("head", head),
                     ("optimiser", optimiser)):
        fn()
        parts[name] = time_steps(fn, device, steps)
    return parts


def _gallery_features(num: int, dim: int, device: torch.device, full: bool):
    generator = torch.Generator().manual_seed(2)
    video_mask, text_mask = make_masks(num, generator, full)
    video = {"tokens": torch.randn(num, VIDEO_LEN, dim, generator=generator), "mask": video_mask,
             "weights": video_mask / video_mask.sum(-1, keepdim=True)}
    text = {"tokens": torch.randn(num, TEXT_LEN, dim, generator=generator), "mask": text_mask,
            "weights": text_mask / text_mask.sum(-1, keepdim=True)}
    move = {k: v.to(device) for k, v in video.items()}, {k: v.to(device) for k, v in text.items()}
    return move


def _peak_or_time(spec: Dict[str, Any], step: Callable[[], Any], device: torch.device) -> Dict[str, Any]:
    """Measure the peak memory of the first step, or time steps after a warm-up, as spec["phase"] selects."""
    if spec["phase"] == "memory":
        return {"peak_mib": measure_peak(step, device)}
    step()
    return {"time_s": time_steps(step, device, spec["steps"])}


def run_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    torch.set_num_threads(spec["threads"]) if spec.get("threads") else None
    device = torch.device(spec["device"])
    kind = spec["kind"]
    if kind == "head":
        tokens = make_tokens(spec["batch"], spec["dim"], 0, spec["full_masks"], device)
        head = build_head(spec["dim"], device, spec["impl"])
        leaves = [tokens[k].requires_grad_() for k in ("video", "text", "text_aug")]
        if spec["impl"] == "shard":
            step = _shard_step(head, tokens, spec["world_size"])
        else:
            step = _head_step(spec["impl"], head, tokens, leaves)
        return _peak_or_time(spec, step, device)
    if kind == "train":
        model, optimizer, inputs, criterion = _train_setup(spec, device)
        step = _train_step(spec, device, model, optimizer, inputs, criterion)
        result = _peak_or_time(spec, step, device)
        if spec["breakdown"] and spec["phase"] != "memory":
            result["parts_s"] = _train_breakdown(spec, device, model, optimizer, inputs, criterion)
        return result
    if kind == "eval":
        from modules.similarity import inference_score

        video, text = _gallery_features(spec["gallery"], spec["dim"], device, spec["full_masks"])
        box: Dict[str, Any] = {}

        def run():
            box["scores"] = inference_score(video, text, block_size=spec["block_size"])

        # One run gives both numbers, because a 2,348-item gallery takes minutes on a CPU.
        start = time.perf_counter()
        peak = measure_peak(run, device)
        elapsed = time.perf_counter() - start
        scores = box["scores"]
        return {"peak_mib": peak, "time_s": elapsed, "score_matrix_mib": scores.numel() * 4 / 2**20,
                "finite": bool(torch.isfinite(scores).all())}
    raise ValueError(f"unknown worker kind {kind!r}")


IN_PROCESS = False  # set by --quick: run the workers here, a smoke test whose peaks are not meaningful


def _spawn(spec: Dict[str, Any]) -> Dict[str, Any]:
    if IN_PROCESS:
        return run_worker(spec)
    env = dict(os.environ)
    if spec["phase"] == "memory":
        # glibc serves allocations of 64 KiB and more with mmap and unmaps them on free, so the resident
        # set follows the live tensors instead of keeping freed heap pages (timing runs keep the default).
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"benchmark worker {spec['kind']}/{spec.get('impl')} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def spawn_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Run one measurement as two fresh Python processes: the peak memory of one step, then the times."""
    memory = _spawn({**spec, "phase": "memory"})
    timing = _spawn({**spec, "phase": "time"})
    return {**timing, **memory}


# Sections.


class Report:
    def __init__(self) -> None:
        self.targets: List[Dict[str, Any]] = []
        self.checks: List[Dict[str, Any]] = []
        self.numbers: Dict[str, Any] = {}

    def target(self, name: str, value: float, limit: float, higher_is_better: bool = False) -> None:
        passed = value >= limit if higher_is_better else value <= limit
        relation = ">=" if higher_is_better else "<="
        print(f"  [{'PASS' if passed else 'FAIL'}] {name}: {value:.3f} (target {relation} {limit})")
        self.targets.append({"name": name, "value": value, "limit": limit, "passed": passed})

    def check(self, name: str, passed: bool, detail: str = "") -> None:
        print(f"  [{'PASS' if passed else 'FAIL'}] {name} {detail}".rstrip())
        self.checks.append({"name": name, "passed": passed, "detail": detail})


def check_head_equality(args, report: Report, device: torch.device) -> None:
    """Compare loss and gradients of the naive dense head and the project's head on the same inputs."""
    results = {}
    for impl in ("dense", "chunked"):
        tokens = make_tokens(args.batch_size, args.dim, 0, args.full_masks, device)
        head = build_head(args.dim, device, impl)
        leaves = [tokens[k].requires_grad_() for k in ("video", "text", "text_aug")]
        loss = _head_step(impl, head, tokens, leaves)()
        grads = [t.grad for t in leaves] + [p.grad for p in head.parameters()]
        results[impl] = (loss.detach(), grads)
    (dense_loss, dense_grads), (loss, grads) = results["dense"], results["chunked"]
    grads_equal = all((a is None) == (b is None) and (a is None or close(b, a)) for a, b in zip(dense_grads, grads))
    print(f"  loss dense {float(dense_loss):.6f}  project {float(loss):.6f}")
    report.check("head loss equal to dense (1e-5)", close(loss, dense_loss))
    report.check("head gradients equal to dense (1e-5), all inputs and head parameters", grads_equal)


def check_shard_equality(args, report: Report, device: torch.device) -> None:
    """Run 4 ranks as threads on the section-a inputs; their losses and summed gradients must be global."""
    from modules.criterion import ThreadGroup

    world = 4
    tokens = make_tokens(args.batch_size, args.dim, 0, args.full_masks, device)
    head = build_head(args.dim, device, "shard")
    leaves = [tokens[k].requires_grad_() for k in ("video", "text", "text_aug")]
    outputs = head(tokens["video"], tokens["video_mask"], tokens["text"], tokens["text_aug"], tokens["text_mask"])
    reference = naive_loss(outputs)
    params = leaves + list(head.parameters())
    reference_grads = torch.autograd.grad(reference, params, retain_graph=True)
    local = args.batch_size // world

    def gather(local_outputs):
        return {part: {k: outputs[part][k] for k in local_outputs[part]} for part in local_outputs}

    def rank_loss(comm):
        rows = slice(comm.rank * local, (comm.rank + 1) * local)
        mine = {part: {k: v[rows] for k, v in outputs[part].items()} for part in ("video", "text", "text_aug")}
        mine["logit_scale"] = outputs["logit_scale"]
        return project_loss(mine, comm=comm, gather=gather)

    losses = ThreadGroup(world).run(rank_loss)
    grads = torch.autograd.grad(sum(losses) / world, params)
    report.check("sharded loss (4 simulated ranks) equal to dense (1e-5)",
                 all(close(loss.detach(), reference.detach()) for loss in losses))
    report.check("sharded gradients (mean over ranks) equal to dense (1e-5)",
                 all(close(g, r) for g, r in zip(grads, reference_grads)))


def section_a(args, report: Report, device: torch.device) -> Dict[str, Any]:
    print(f"\n(a) training head, batch {args.batch_size}, width {args.dim}, forward + backward")
    check_head_equality(args, report, device)
    base = {"kind": "head", "batch": args.batch_size, "dim": args.dim, "steps": args.steps,
            "device": str(device), "full_masks": args.full_masks}
    dense = spawn_worker({**base, "impl": "dense"})
    chunked = spawn_worker({**base, "impl": "chunked"})
    print(f"  {'':10}{'time (s)':>12}{'peak (MiB)':>14}")
    for name, result in (("dense", dense), ("project", chunked)):
        print(f"  {name:10}{result['time_s']:12.3f}{result['peak_mib']:14.1f}")
    report.target("(a) head peak memory / dense", chunked["peak_mib"] / max(dense["peak_mib"], 1e-9), 0.25)
    report.target("(a) head time / dense", chunked["time_s"] / dense["time_s"], 1.1)
    report.numbers["a"] = {"dense": dense, "project": chunked}
    return chunked


def section_b(args, report: Report, device: torch.device, single: Optional[Dict[str, Any]]) -> None:
    world = 4
    print(f"\n(b) sharded head: one rank of {world}, local {args.batch_size // world}, global {args.batch_size}")
    check_shard_equality(args, report, device)
    base = {"kind": "head", "batch": args.batch_size, "dim": args.dim, "steps": args.steps,
            "device": str(device), "full_masks": args.full_masks}
    if single is None:
        single = spawn_worker({**base, "impl": "chunked"})
    shard = spawn_worker({**base, "impl": "shard", "world_size": world})
    print(f"  single process {single['time_s']:.3f} s, one rank {shard['time_s']:.3f} s, "
          f"peak {shard['peak_mib']:.1f} MiB")
    report.target("(b) one rank's head time / single-process head", shard["time_s"] / single["time_s"], 0.35)
    report.numbers["b"] = {"single": single, "rank": shard}


def section_c(args, report: Report, device: torch.device) -> None:
    batch = QUICK["train_batch"] if args.quick else 48
    print(f"\n(c) whole training step, batch {batch}, {'tiny towers' if args.quick else 'ViT-B/32 towers'}, "
          f"{args.precision}, random weights")
    base = {"kind": "train", "batch": batch, "steps": args.steps, "device": str(device), "quick": args.quick,
            "precision": args.precision, "full_masks": args.full_masks, "breakdown": True}
    dense = spawn_worker({**base, "impl": "dense"})
    project = spawn_worker({**base, "impl": "chunked"})
    print(f"  {'part (forward + backward)':28}{'dense (s)':>12}{'project (s)':>14}")
    for part in dense["parts_s"]:
        print(f"  {part:28}{dense['parts_s'][part]:12.3f}{project['parts_s'][part]:14.3f}")
    print(f"  {'whole step':28}{dense['time_s']:12.3f}{project['time_s']:14.3f}")
    print(f"  {'whole step peak (MiB)':28}{dense['peak_mib']:12.1f}{project['peak_mib']:14.1f}")
    report.target("(c) training step time / dense", project["time_s"] / dense["time_s"], 1.0)
    report.target("(c) training step peak memory / dense", project["peak_mib"] / max(dense["peak_mib"], 1e-9), 0.8)
    report.numbers["c"] = {"dense": dense, "project": project}


def section_d(args, report: Report, device: torch.device) -> None:
    from modules.similarity import inference_score

    print(f"\n(d) evaluation of {args.gallery} x {args.gallery} random features, block size {args.block_size}")
    # Equality on a corner of the gallery, against the naive dense score d * I2T + (1 - d) * T2I with d = 0.5.
    video, text = _gallery_features(min(args.gallery, 48), args.dim, device, args.full_masks)
    scores = inference_score(video, text, block_size=max(1, args.block_size // 4))
    i2t, t2i = naive_similarities(video["tokens"], video["weights"], text["tokens"], text["tokens"], text["weights"])
    report.check("evaluation scores equal to dense (1e-5)", close(scores, 0.5 * i2t + 0.5 * t2i))

    result = _spawn({"kind": "eval", "phase": "memory", "gallery": args.gallery, "dim": args.dim, "device": str(device),
                           "block_size": args.block_size, "full_masks": args.full_masks})
    block_mib = 3 * args.block_size**2 * VIDEO_LEN * TEXT_LEN * 4 / 2**20
    features_mib = 2 * args.gallery * (VIDEO_LEN + TEXT_LEN) * args.dim * 4 / 2**20
    bound = result["score_matrix_mib"] + block_mib + features_mib
    print(f"  time {result['time_s']:.1f} s, peak {result['peak_mib']:.1f} MiB (score matrix "
          f"{result['score_matrix_mib']:.1f} MiB, 3 block temporaries {block_mib:.1f} MiB, normalised features "
          f"{features_mib:.1f} MiB)")
    report.check("evaluation scores finite", result["finite"])
    report.target("(d) evaluation peak memory (MiB) / (scores + 3 blocks + features)",
                  result["peak_mib"] / bound, 1.0)
    report.target("(d) evaluation peak memory (GiB)", result["peak_mib"] / 1024, 24.0)
    report.numbers["d"] = {**result, "bound_mib": bound}


def section_e(args, report: Report, device: torch.device) -> None:
    from modules.similarity import _dual_block, i2t_similarity, t2i_similarity

    batch = args.batch_size
    print(f"\n(e) similarity kernels, {batch} videos x {batch} texts, width {args.dim}")
    video, text = _gallery_features(batch, args.dim, device, True)
    v = F.normalize(video["tokens"], dim=-1)
    t = F.normalize(text["tokens"], dim=-1)
    flops = 2.0 * batch * VIDEO_LEN * batch * TEXT_LEN * args.dim  # one similarity tensor

    def matmul():
        return v.reshape(-1, args.dim) @ t.reshape(-1, args.dim).t()

    def evaluation_kernel():
        return _dual_block(v, video["weights"], t, text["weights"], 0.5, TAU, None, None)

    leaves = [video["tokens"].clone().requires_grad_(), text["tokens"].clone().requires_grad_()]

    def training_kernel():
        scores = i2t_similarity(leaves[0], video["weights"], leaves[1]) + t2i_similarity(
            leaves[0], leaves[1], text["weights"])
        scores.sum().backward()

    rates = {}
    for name, fn, count in (("plain matmul", matmul, flops), ("evaluation kernel (both directions)",
                                                               evaluation_kernel, flops),
                            ("training kernel (2 directions, fwd + bwd)", training_kernel, 6 * flops)):
        fn()
        seconds = time_steps(fn, device, args.steps)
        rates[name] = count / seconds / 1e9
        print(f"  {name:44}{seconds:10.3f} s {rates[name]:10.1f} GFLOP/s")
    print("  (FLOPs counted: the matrix products of the formulas; the training kernel's recomputation is overhead)")
    report.target("(e) evaluation kernel GFLOP/s / matmul GFLOP/s",
                  rates["evaluation kernel (both directions)"] / rates["plain matmul"], 0.6, higher_is_better=True)
    report.numbers["e"] = rates


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="autocast of the towers in section c; the head always runs in fp32")
    parser.add_argument("--batch_size", type=int, default=128, help="batch of sections a, b and e")
    parser.add_argument("--sections", default="a,b,c,d,e", help="comma-separated subset of a,b,c,d,e")
    parser.add_argument("--gallery", type=int, default=2348, help="videos and sentences of the section-d gallery")
    parser.add_argument("--block_size", type=int, default=64, help="evaluation block size of section d")
    parser.add_argument("--dim", type=int, default=DIM, help="token width of sections a, b, d and e")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement (after one warm-up)")
    parser.add_argument("--full_masks", action="store_true", help="make every token position valid")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and one timed step, all in this process: a smoke test of a few seconds "
                             "whose memory numbers mean nothing")
    parser.add_argument("--json", type=Path, default=None, help="write every measured number to this file")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a target fails")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.gallery, args.dim, args.steps = QUICK["batch_size"], QUICK["gallery"], QUICK["dim"], 1
        args.block_size = min(args.block_size, 8)
    if args.batch_size % 4 != 0:
        parser.error(f"--batch_size must be a multiple of 4 (section b splits it over 4 ranks), got {args.batch_size}")
    unknown = set(args.sections.split(",")) - set("abcde")
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from a,b,c,d,e")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    global IN_PROCESS
    args = parse_args(argv)
    IN_PROCESS = args.quick
    if args.worker is not None:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    sections = args.sections.split(",")
    print(f"benchmark: device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
          f"{'full masks' if args.full_masks else 'realistic masks'}")
    if device.type == "cuda":
        print(f"  GPU: {torch.cuda.get_device_name(device)}")
    report = Report()
    single = section_a(args, report, device) if "a" in sections else None
    if "b" in sections:
        section_b(args, report, device, single)
    if "c" in sections:
        section_c(args, report, device)
    if "d" in sections:
        section_d(args, report, device)
    if "e" in sections:
        section_e(args, report, device)

    failed_targets = [t for t in report.targets if not t["passed"]]
    failed_checks = [c for c in report.checks if not c["passed"]]
    passed = len(report.targets) + len(report.checks) - len(failed_targets) - len(failed_checks)
    print(f"\nbenchmark: {passed} passed, {len(failed_targets) + len(failed_checks)} failed "
          f"(load average at the end {os.getloadavg()[0]:.1f})")
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "targets": report.targets, "checks": report.checks,
                                         "numbers": report.numbers}, indent=2))
    if failed_checks or (args.strict and failed_targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
