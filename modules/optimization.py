"""Optimiser, learning-rate schedule, parameter groups and embedding freezing of the released UPRet runs.

The released runs trained with BertAdam (the optimiser of the original BERT code base): Adam without bias
correction, decoupled weight decay added to the update, and each parameter tensor clipped to a gradient
norm of 1.0 inside the optimiser. This module keeps that update but moves the learning-rate schedule out
of the optimiser into a ``LambdaLR`` scheduler (``build_scheduler``), so both are checkpointed the usual
way. AdamW is available as the alternative (``build_optimizer(name="adamw")``).

Usage in the driver, in this order::

    freeze_text_embeddings(model)          # before the optimiser, so frozen tensors are left out
    optimizer = build_optimizer(model, "bertadam", lr=1e-5, weight_decay=0.001)
    scheduler = build_scheduler(optimizer, total_steps, warmup=0.1)
    ...
    clip_grad_norm_(model.parameters(), 1.0)   # global clip, then the optimiser's per-tensor clip
    optimizer.step()
    scheduler.step()
"""
import logging
import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "warmup_cosine",
    "BertAdam",
    "build_scheduler",
    "param_groups",
    "build_optimizer",
    "freeze_text_embeddings",
    "NO_DECAY_SUBSTRINGS",
    "FROZEN_TEXT_EMBEDDINGS",
]

logger = logging.getLogger(__name__)

# A parameter whose name contains any of these is not decayed. CLIP names its LayerNorms ln_1, ln_2,
# ln_final and ln_post, so only the "bias" entry ever matches in this model: LayerNorm weights, the
# embeddings and the logit scale are all decayed, as in the released runs.
NO_DECAY_SUBSTRINGS: Tuple[str, ...] = ("bias", "LayerNorm.bias", "LayerNorm.weight")

# The released freeze loop (run with freeze_layer_num = 0) froze exactly the text token embedding and the
# text positional embedding. The video-side clip.visual.positional_embedding stays trainable.
FROZEN_TEXT_EMBEDDINGS: Tuple[str, ...] = ("clip.token_embedding.weight", "clip.positional_embedding")


def warmup_cosine(progress: float, warmup: float = 0.1) -> float:
    """Return the learning-rate multiplier at ``progress`` = step / total_steps.

    The multiplier rises linearly, ``progress / warmup``, while ``progress < warmup``, and is
    ``0.5 * (1 + cos(pi * progress))`` afterwards. The cosine spans the whole run [0, 1], not only the part
    after the warm-up, so the multiplier drops at the end of the warm-up: with warmup = 0.1 it goes from
    about 0.999 just before 0.1 to 0.976 at 0.1. That drop is kept because the released runs had it.
    Progress beyond 1 is held at 1 (multiplier 0), because the cosine would otherwise rise again.

    Args:
        progress: fraction of training done, >= 0.
        warmup: fraction of training spent warming up, in [0, 1). With 0 the cosine starts at step 0.

    Raises:
        ValueError: on negative progress or a warm-up fraction outside [0, 1).
    """
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup must be a fraction in [0, 1), got {warmup}")
    if progress < 0.0:
        raise ValueError(f"progress must be >= 0, got {progress}")
    if progress < warmup:
        return progress / warmup
    progress = min(progress, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class BertAdam(torch.optim.Optimizer):
    """Adam without bias correction, with decoupled weight decay and per-tensor gradient clipping.

    For each parameter tensor p with gradient g, at learning rate lr (set by a scheduler, if any):

    1. g is clipped to L2 norm ``max_grad_norm`` in place, with ``torch.nn.utils.clip_grad_norm_`` on that
       tensor alone (so g is scaled by min(1, max_grad_norm / (||g|| + 1e-6))).
    2. m = b1 * m + (1 - b1) * g and v = b2 * v + (1 - b2) * g^2, both starting at 0.
    3. update = m / (sqrt(v) + eps) + weight_decay * p, with no bias correction of m or v.
    4. p = p - lr * update.

    The per-tensor clip comes on top of any global clip that the caller applies before ``step``.
    Parameters without a gradient are skipped. The state of each tensor is ``exp_avg`` (m), ``exp_avg_sq``
    (v) and ``step`` (the number of updates it received).

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        lr: base learning rate (the scheduler multiplies it).
        betas: (b1, b2), the decay rates of m and v.
        eps: added to sqrt(v) in the denominator.
        weight_decay: decoupled weight-decay coefficient, which a parameter group may override.
        max_grad_norm: per-tensor gradient-norm limit. None or 0 disables the per-tensor clip.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        betas: Tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        weight_decay: float = 0.001,
        max_grad_norm: Optional[float] = 1.0,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas must be two values in [0, 1), got {betas}")
        if eps < 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if max_grad_norm is not None and max_grad_norm < 0.0:
            raise ValueError(f"max_grad_norm must be >= 0 or None (no per-tensor clip), got {max_grad_norm}")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        """Apply one update to every parameter that has a gradient and return the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            max_grad_norm = group["max_grad_norm"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("BertAdam does not support sparse gradients")
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(param, max_grad_norm)
                grad = param.grad

                state = self.state[param]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1

                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                update = exp_avg / (exp_avg_sq.sqrt() + group["eps"])
                if group["weight_decay"] > 0.0:
                    update.add_(param, alpha=group["weight_decay"])
                param.add_(update, alpha=-group["lr"])
        return loss


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float = 0.1) -> LambdaLR:
    """Wrap ``optimizer`` in a ``LambdaLR`` that follows ``warmup_cosine(step / total_steps, warmup)``.

    Call ``scheduler.step()`` after every ``optimizer.step()``. The first optimiser step then runs at
    lr 0 (progress 0), as in the released runs, and the last of ``total_steps`` steps at
    ``warmup_cosine((total_steps - 1) / total_steps)``, which is close to 0.

    Raises:
        ValueError: if ``total_steps`` is not positive or ``warmup`` is outside [0, 1).
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup must be a fraction in [0, 1), got {warmup}")

    def lr_multiplier(step: int) -> float:
        return warmup_cosine(step / total_steps, warmup)

    return LambdaLR(optimizer, lr_multiplier)


def param_groups(
    model: nn.Module, weight_decay: float, no_decay: Sequence[str] = NO_DECAY_SUBSTRINGS
) -> List[Dict]:
    """Split the trainable parameters of ``model`` into a decayed and a non-decayed group.

    A parameter is trainable when ``requires_grad`` is True. It goes to the non-decayed group when its
    name contains any substring in ``no_decay``. With the default substrings and CLIP's ``ln_*`` names,
    that group contains the biases only (see ``NO_DECAY_SUBSTRINGS``).

    Returns:
        Up to two groups, ``{"params": [(name, tensor), ...], "weight_decay": float}``, decayed first. An
        empty group is left out. Giving the parameters as (name, tensor) pairs makes the optimiser store
        their names under ``"param_names"``.

    Raises:
        ValueError: if the model has no trainable parameter.
    """
    decay: List[Tuple[str, nn.Parameter]] = []
    no_decay_params: List[Tuple[str, nn.Parameter]] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if any(substring in name for substring in no_decay):
            no_decay_params.append((name, param))
        else:
            decay.append((name, param))
    if not decay and not no_decay_params:
        raise ValueError(f"{type(model).__name__} has no trainable parameter (all have requires_grad=False)")

    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay_params:
        groups.append({"params": no_decay_params, "weight_decay": 0.0})
    return groups


def build_optimizer(
    model: nn.Module,
    name: str = "bertadam",
    lr: float = 1e-5,
    weight_decay: float = 0.001,
    betas: Tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
    max_grad_norm: Optional[float] = 1.0,
) -> torch.optim.Optimizer:
    """Build the optimiser for the trainable parameters of ``model``, biases without weight decay.

    Args:
        model: the model, after ``freeze_text_embeddings`` if those embeddings should stay frozen.
        name: ``"bertadam"`` (the released update, see ``BertAdam``) or ``"adamw"`` (``torch.optim.AdamW``,
            with bias correction and decay lr * weight_decay * p). AdamW ignores ``max_grad_norm``, so only
            the caller's global clip applies there.
        lr: base learning rate, which a scheduler from ``build_scheduler`` multiplies.
        weight_decay: decoupled weight-decay coefficient of the decayed group.
        betas, eps: Adam hyperparameters.
        max_grad_norm: BertAdam's per-tensor gradient-norm limit. None or 0 disables it.

    Raises:
        ValueError: on an unknown ``name`` or a model without trainable parameters.
    """
    groups = param_groups(model, weight_decay)
    if name == "bertadam":
        return BertAdam(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: use 'bertadam' or 'adamw'")


def freeze_text_embeddings(model: nn.Module) -> List[str]:
    """Set ``requires_grad = False`` on the text token embedding and the text positional embedding.

    A parameter is frozen when its name is ``clip.token_embedding.weight`` or ``clip.positional_embedding``,
    or ends with one of them after a dot (for wrappers such as DDP's ``module.``). Other embeddings,
    including ``clip.visual.positional_embedding``, are left alone.

    Returns:
        The full names of the frozen parameters, in ``named_parameters`` order.

    Raises:
        ValueError: if the model lacks one of the two embeddings, because a silent no-op here would train
            parameters that the released runs kept fixed.
    """
    frozen: List[str] = []
    found = set()
    for name, param in model.named_parameters():
        for target in FROZEN_TEXT_EMBEDDINGS:
            if name == target or name.endswith("." + target):
                param.requires_grad_(False)
                frozen.append(name)
                found.add(target)
    missing = [target for target in FROZEN_TEXT_EMBEDDINGS if target not in found]
    if missing:
        raise ValueError(
            f"{type(model).__name__} has no parameter named {', '.join(missing)}: the CLIP module must be an "
            "attribute named 'clip'"
        )
    logger.info("Froze %d text embedding parameters: %s", len(frozen), ", ".join(frozen))
    return frozen
