"""One training epoch and one gallery evaluation, as used by ``CLCL/main_task_retrieval.py``."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from typing import Any, Iterable, Optional

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


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Return the autocast context of the encoders; similarity, OT and loss stay in fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


class NonFiniteLossError(FloatingPointError):
    """Raised when a training loss is NaN or infinite."""


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
) -> tuple[dict[str, float], int]:
    """Run one epoch of training.

    Returns:
        The epoch means of the named loss terms (averaged over ranks) and the new global step.
    """
    model.train()
    core = unwrap_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    sums: dict[str, float] = {}
    num_steps = len(loader)
    start = time.time()
    data_time = 0.0
    tick = time.time()

    # Redirected output gets a bar update every 30 s instead of one per step.
    interval = 0.1 if sys.stderr.isatty() else 30.0
    progress = tqdm(loader, total=num_steps, desc=f"epoch {epoch}", disable=not dist_info.is_main, leave=False,
                    mininterval=interval)
    for step, batch in enumerate(progress):
        data_time += time.time() - tick
        batch = _to_device(batch, dist_info.device)

        with autocast_context(dist_info.device, precision):
            outputs = model(batch["text_ids"], batch["text_aug_ids"], batch["video"], batch["video_mask"])
        terms = criterion(outputs)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            names = _batch_names(batch, sentence_ids)
            raise NonFiniteLossError(
                f"non-finite loss {loss.item()} at epoch {epoch}, step {global_step} (rank {dist_info.rank}); "
                f"sentences in this rank's batch: {names}"
            )

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        scheduler.step()
        core.clamp_logit_scale()
        global_step += 1

        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach())
        if dist_info.is_main:
            progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
            if log_every and (step + 1) % log_every == 0:
                elapsed = time.time() - start
                samples = (step + 1) * batch["video"].shape[0] * dist_info.world_size
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
        tick = time.time()

    means = {key: reduce_mean(value / max(num_steps, 1), dist_info.device) for key, value in sums.items()}
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
    sim = inference_score(
        videos, texts, dual_mix=dual_mix, tau=tau, block_size=block_size, masked_softmax=masked_softmax
    )
    sim = sim.float().cpu().numpy()
    metrics = retrieval_metrics(sim, video_to_sentence, t2v_gallery=t2v_gallery)
    metrics["time_s"] = {"encode": encode_time, "total": time.time() - start}
    if not math.isfinite(float(np.nanmax(np.abs(sim))) if sim.size else 0.0):
        logger.warning("the score matrix contains infinite values")
    return metrics, sim
