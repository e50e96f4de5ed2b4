"""One training epoch and one gallery evaluation, as used by ``CLCL/main_task_retrieval.py``."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from modules.checkpoint import unwrap_model
from modules.distributed import DistInfo, reduce_mean
from modules.metrics import retrieval_metrics
from modules.similarity import inference_score

logger = logging.getLogger(__name__)


# Autocast dtype of each --precision value. fp32 runs without autocast.
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# A loss scaler halves its scale on each skipped step, so 30 skips in a row lower the default 2**16 to 2**-14.
# Gradients that still overflow at that scale are non-finite for another reason, and training cannot recover.
MAX_CONSECUTIVE_SKIPPED_STEPS = 30


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Return the autocast context of the encoders for ``precision`` ("fp32", "bf16" or "fp16").

    The weights stay fp32 (master weights) in every precision. The heads, similarity, OT and loss
    disable autocast themselves and compute in fp32 (Sinkhorn in float64).
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; expected fp32, bf16 or fp16")
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


class NonFiniteLossError(FloatingPointError):
    """Raised when a training loss is NaN or infinite."""


class NonFiniteGradientError(FloatingPointError):
    """Raised when the fp16 loss scaler skips too many optimizer steps in a row for inf/NaN gradients."""


def _backward_and_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    max_grad_norm: float,
    scaler: Optional[torch.amp.GradScaler],
) -> bool:
    """Back-propagate ``loss``, clip the global gradient norm and step the optimizer.

    Returns:
        False when an enabled ``scaler`` found inf/NaN gradients and skipped the optimizer step.
    """
    if scaler is None or not scaler.is_enabled():
        loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        return True

    scaler.scale(loss).backward()
    if max_grad_norm > 0:
        # The clip threshold applies to the true gradients, so the loss scale must be divided out first.
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scale_before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    # update() lowers the scale exactly when step() skipped the optimizer because of inf/NaN gradients.
    return scaler.get_scale() >= scale_before


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    global_step: int,
    dist_info: DistInfo,
    precision: str = "fp32",
    max_grad_norm: float = 1.0,
    log_every: int = 20,
    sentence_ids: Optional[list[str]] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    start_step: int = 0,
    loss_sums: Optional[dict[str, float]] = None,
    on_step: Optional[Callable[[int, int, dict[str, float]], None]] = None,
) -> tuple[dict[str, float], int]:
    """Run one epoch of training.

    With an enabled ``scaler`` (fp16), the loss is scaled before the backward pass, and a step
    whose gradients overflow is skipped: neither the optimizer nor the learning-rate schedule
    advances, and ``skipped_steps`` counts it. A non-finite loss always raises
    :class:`NonFiniteLossError`, because the loss is computed in fp32 before any scaling.

    A resumed epoch passes ``start_step``, the optimizer steps of this epoch already done (the
    loader must yield only the remaining batches), and ``loss_sums``, the sums of the loss terms
    over those steps, so the epoch means equal those of an uninterrupted epoch. ``on_step`` is
    called after every optimizer step with (steps done in this epoch, global step, a copy of the
    sums), for example to write a mid-epoch checkpoint.

    Returns:
        The epoch means of the named loss terms (averaged over ranks), ``skipped_steps`` and
        ``epoch_time_s``, and the new global step.
    """
    model.train()
    core = unwrap_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    sums: dict[str, float] = dict(loss_sums or {})
    num_steps = start_step + len(loader)
    start = time.time()
    data_time = 0.0
    tick = time.time()
    skipped_steps, consecutive_skips = 0, 0

    # Redirected output gets a bar update every 30 s instead of one per step.
    interval = 0.1 if sys.stderr.isatty() else 30.0
    progress = tqdm(loader, total=num_steps, initial=start_step, desc=f"epoch {epoch}", disable=not dist_info.is_main,
                    leave=False, mininterval=interval)
    for step, batch in enumerate(progress, start=start_step):
        data_time += time.time() - tick
        batch = _to_device(batch, dist_info.device)

        with autocast_context(dist_info.device, precision):
            outputs = model(batch["text_ids"], batch["text_aug_ids"], batch["video"], batch["video_mask"])
        terms = criterion(outputs)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            names = _batch_names(batch, sentence_ids)
            hint = " An fp16 encoder activation may have overflowed; try --precision bf16 or fp32." \
                if precision == "fp16" else ""
            raise NonFiniteLossError(
                f"non-finite loss {loss.item()} at epoch {epoch}, step {global_step} (rank {dist_info.rank}); "
                f"sentences in this rank's batch: {names}.{hint}"
            )

        optimizer.zero_grad(set_to_none=True)
        if _backward_and_step(loss, optimizer, params, max_grad_norm, scaler):
            scheduler.step()
            consecutive_skips = 0
        else:
            skipped_steps += 1
            consecutive_skips += 1
            logger.debug("step %d skipped: inf/NaN gradients, loss scale lowered to %g", global_step,
                         scaler.get_scale())
            if consecutive_skips >= MAX_CONSECUTIVE_SKIPPED_STEPS:
                raise NonFiniteGradientError(
                    f"the fp16 loss scaler skipped {consecutive_skips} steps in a row for inf/NaN gradients (epoch "
                    f"{epoch}, step {global_step}, loss scale {scaler.get_scale():g}); train with --precision bf16 "
                    "or fp32"
                )
        core.clamp_logit_scale()
        global_step += 1

        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach())
        if dist_info.is_main:
            progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
            if log_every and (step + 1) % log_every == 0:
                elapsed = time.time() - start
                samples = (step + 1 - start_step) * batch["video"].shape[0] * dist_info.world_size
                logger.info(
                    "epoch %d [%d/%d] step %d | %s | lr %.3e | %.1f samples/s | data %.2fs",
                    epoch,
                    step + 1,
                    num_steps,
                    global_step,
                    " | ".join(f"{k} {float(v.detach()):.4f}" for k, v in terms.items()),
                    scheduler.get_last_lr()[0],
                    samples / max(elapsed, 1e-9),
                    data_time,
                )
        if on_step is not None:
            on_step(step + 1, global_step, dict(sums))
        tick = time.time()

    means = {key: reduce_mean(value / max(num_steps, 1), dist_info.device) for key, value in sums.items()}
    # All ranks skip the same steps, because the scaler checks the gradients after DDP's all-reduce.
    means["skipped_steps"] = float(skipped_steps)
    if skipped_steps:
        logger.warning("epoch %d: the fp16 loss scaler skipped %d of %d steps for inf/NaN gradients (loss scale "
                       "now %g)", epoch, skipped_steps, num_steps, scaler.get_scale())
    means["epoch_time_s"] = time.time() - start
    return means, global_step


def _batch_names(batch: dict[str, torch.Tensor], sentence_ids: Optional[list[str]]) -> list[str]:
    indices = batch["index"].tolist() if "index" in batch else []
    if sentence_ids is None:
        return [str(i) for i in indices]
    return [sentence_ids[i] for i in indices]


@torch.no_grad()
def encode_gallery(
    model: nn.Module,
    video_loader: Iterable[dict[str, torch.Tensor]],
    text_loader: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    precision: str = "fp32",
    show_progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Encode every video and every sentence once; return per-item feature dicts on the CPU."""
    core = unwrap_model(model)
    core.eval()
    video_parts: list[dict[str, torch.Tensor]] = []
    for batch in tqdm(video_loader, desc="encode videos", disable=not show_progress, leave=False):
        batch = _to_device(batch, device)
        with autocast_context(device, precision):
            out = core.encode_video(batch["video"], batch["video_mask"])
        video_parts.append({k: out[k].float().cpu() for k in ("tokens", "mask", "weights")})

    text_parts: list[dict[str, torch.Tensor]] = []
    for batch in tqdm(text_loader, desc="encode sentences", disable=not show_progress, leave=False):
        batch = _to_device(batch, device)
        with autocast_context(device, precision):
            out = core.encode_text(batch["text_ids"])
        text_parts.append({k: out[k].float().cpu() for k in ("tokens", "mask", "weights")})

    videos = {k: torch.cat([p[k] for p in video_parts]) for k in video_parts[0]}
    texts = {k: torch.cat([p[k] for p in text_parts]) for k in text_parts[0]}
    return videos, texts


@torch.no_grad()
def evaluate(
    model: nn.Module,
    video_loader: DataLoader,
    text_loader: DataLoader,
    video_to_sentence: np.ndarray,
    device: torch.device,
    dual_mix: float = 0.5,
    tau: float = 0.07,
    masked_softmax: bool = False,
    block_size: int = 256,
    t2v_gallery: str = "groups",
    precision: str = "fp32",
    show_progress: bool = True,
) -> tuple[dict[str, Any], np.ndarray]:
    """Encode a split, score every video against every sentence and compute the metrics.

    The score is d * I2T + (1 - d) * T2I on the original text, without sampling or OT.

    Returns:
        The metrics dict of :func:`modules.metrics.retrieval_metrics` and the score matrix
        [num_videos, num_sentences].
    """
    start = time.time()
    videos, texts = encode_gallery(model, video_loader, text_loader, device, precision, show_progress)
    encode_time = time.time() - start
    videos = {k: v.to(device) for k, v in videos.items()}
    texts = {k: v.to(device) for k, v in texts.items()}
    score_start = time.time()
    sim = inference_score(
        videos, texts, dual_mix=dual_mix, tau=tau, block_size=block_size, masked_softmax=masked_softmax
    )
    sim = sim.float().cpu().numpy()
    score_time = time.time() - score_start
    metrics = retrieval_metrics(sim, video_to_sentence, t2v_gallery=t2v_gallery)
    metrics["time_s"] = {"encode": encode_time, "score": score_time, "total": time.time() - start}
    if not math.isfinite(float(np.nanmax(np.abs(sim))) if sim.size else 0.0):
        logger.warning("the score matrix contains infinite values")
    return metrics, sim
