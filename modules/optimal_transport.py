"""Entropy-regularised optimal transport between the Monte-Carlo samples of a video and a text."""
import math
import warnings
from typing import Callable, Optional, Tuple, Union

import torch

__all__ = ["sinkhorn", "ot_score"]

# Sums a tensor over the processes that share one Sinkhorn problem set (see `sinkhorn`).
SumAcrossShards = Callable[[torch.Tensor], torch.Tensor]


def _log_marginal(weights: Optional[torch.Tensor], size: int, like: torch.Tensor) -> torch.Tensor:
    """Return the log of a marginal, uniform 1/size when `weights` is None."""
    if weights is None:
        return torch.full((size,), -math.log(size), dtype=like.dtype, device=like.device)
    return weights.to(dtype=like.dtype, device=like.device).log()


def _mean_abs_change(
    log_new: torch.Tensor, log_old: torch.Tensor, sum_across_shards: Optional[SumAcrossShards] = None
) -> float:
    """Return mean |exp(log_new) - exp(log_old)| over all entries, computed without overflow to NaN.

    |e^x - e^y| = exp(max(x, y) + log(1 - e^-|x - y|)) is evaluated in float64. A scaling too large
    even for float64 gives +inf, which simply fails the convergence test. With `sum_across_shards`,
    the sum and the count of entries are summed over all shards first, so the mean is the global one.
    """
    new, old = log_new.double(), log_old.double()
    gap = (new - old).abs()
    log_change = torch.maximum(new, old) + torch.log(-torch.expm1(-gap))
    # Equal entries (including two -inf from a zero marginal) have no change, and -inf - -inf is NaN.
    log_change = torch.where(new == old, torch.full_like(log_change, -math.inf), log_change)
    if sum_across_shards is None:
        return log_change.exp().mean().item()
    totals = torch.stack([log_change.exp().sum(), log_change.new_tensor(float(log_change.numel()))])
    total, count = sum_across_shards(totals).tolist()
    return total / max(count, 1.0)


def _sinkhorn_log(
    cost: torch.Tensor,
    eps: float,
    a: Optional[torch.Tensor],
    b: Optional[torch.Tensor],
    max_iter: int,
    tol: float,
    sum_across_shards: Optional[SumAcrossShards],
) -> Tuple[torch.Tensor, int]:
    """Run the log-domain Sinkhorn iteration of `sinkhorn` and return (plan, iterations)."""
    # Iterating in float64 keeps the stopping test meaningful: the scalings can reach 1e7 for
    # anti-correlated pairs, where float32 rounding alone keeps |r - r_prev| above tol.
    out_dtype = torch.promote_types(cost.dtype, torch.float32)
    dtype = torch.float64
    cost = cost.detach().to(dtype)
    if not torch.isfinite(cost).all():
        raise FloatingPointError("sinkhorn: the cost matrix contains NaN or infinity")

    rows, cols = cost.shape[-2], cost.shape[-1]
    log_a = _log_marginal(a, rows, cost)  # broadcastable to [..., K]
    log_b = _log_marginal(b, cols, cost)  # broadcastable to [..., L]
    log_kernel = -cost / eps  # [..., K, L]

    batch_shape = cost.shape[:-2]
    log_r = torch.zeros(batch_shape + (rows,), dtype=dtype, device=cost.device)
    log_c = torch.zeros(batch_shape + (cols,), dtype=dtype, device=cost.device)

    iterations = 0
    converged = False
    while iterations < max_iter:
        log_r_prev = log_r
        log_r = log_a - torch.logsumexp(log_kernel + log_c.unsqueeze(-2), dim=-1)  # a / (G c)
        log_c = log_b - torch.logsumexp(log_kernel + log_r.unsqueeze(-1), dim=-2)  # b / (G^T r)
        iterations += 1
        if _mean_abs_change(log_r, log_r_prev, sum_across_shards) < tol:
            converged = True
            break

    if not converged:
        warnings.warn(
            f"sinkhorn did not reach tol={tol} within max_iter={max_iter} updates (eps={eps}); the plan of "
            "the last update is used. Raise --sinkhorn_iters or --ot_eps if this repeats.",
            RuntimeWarning,
            stacklevel=3,
        )

    plan = torch.exp(log_r.unsqueeze(-1) + log_kernel + log_c.unsqueeze(-2))  # [..., K, L]
    if not torch.isfinite(plan).all():
        raise FloatingPointError(
            f"sinkhorn: the transport plan contains NaN or infinity (eps={eps}); check the marginals and the cost"
        )
    return plan.to(out_dtype), iterations


def sinkhorn(
    cost: torch.Tensor,
    eps: float = 0.1,
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    max_iter: int = 100,
    tol: float = 1e-2,
    return_iterations: bool = False,
    sum_across_shards: Optional[SumAcrossShards] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, int]]:
    """Solve entropy-regularised optimal transport for a batch of cost matrices.

    For each cost matrix C [K, L] with marginals a [K] and b [L], the plan is

        P = argmin_{P >= 0, P 1 = a, P^T 1 = b} <P, C> - eps * H(P),   H(P) = -sum_kl P_kl (log P_kl - 1),

    whose solution is P = diag(r) G diag(c) with the Gibbs kernel G = exp(-C / eps). The scalings
    follow the Sinkhorn iteration r <- a / (G c), c <- b / (G^T r), starting from r = c = 1. The
    iteration runs in float64 on log r and log c with log-sum-exp. It reaches the same fixed point
    as the plain iteration, but the kernel cannot underflow when eps is small (in float32,
    exp(-C / eps) underflows once C / eps exceeds roughly 100).

    Stopping rule: after each update, the mean of |r - r_prev| over all entries of the whole batch
    (r in the ordinary, not the log, domain) is compared with `tol`. The loop stops once it is
    below `tol`, or after `max_iter` updates, with a RuntimeWarning in the latter case.

    The plan is computed without gradient: `cost` is detached and the result does not require grad.

    Args:
        cost: [..., K, L] cost matrices. Leading dimensions are batch dimensions.
        eps: entropic regularisation strength (> 0), in the units of the cost.
        a: optional row marginal broadcastable to [..., K]. Default: uniform 1/K.
        b: optional column marginal broadcastable to [..., L]. Default: uniform 1/L.
        max_iter: maximum number of Sinkhorn updates (>= 1).
        tol: threshold of the stopping rule.
        return_iterations: also return the number of updates performed.
        sum_across_shards: when the batch of problems is split over processes, a collective that
            sums a float64 tensor over them. The stopping test then uses the mean over the whole
            batch, so every shard stops after the same update as one process would. Every shard
            must call `sinkhorn` the same number of times.

    Returns:
        The plan [..., K, L] in at least float32 precision, or (plan, iterations) when
        `return_iterations` is set.

    Raises:
        FloatingPointError: if the cost or the resulting plan contains NaN or infinity.
    """
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    if cost.dim() < 2:
        raise ValueError(f"cost must have shape [..., K, L], got {tuple(cost.shape)}")

    # The plan is a constant for autograd: gradients reach the scores only through S in ot_score.
    with torch.no_grad():
        plan, iterations = _sinkhorn_log(cost, eps, a, b, max_iter, tol, sum_across_shards)
    if return_iterations:
        return plan, iterations
    return plan


def ot_score(
    video_samples: torch.Tensor,
    text_samples: torch.Tensor,
    eps: float = 0.1,
    max_iter: int = 100,
    tol: float = 1e-2,
    aggregation: str = "max",
    sum_across_shards: Optional[SumAcrossShards] = None,
) -> torch.Tensor:
    """Score every video-text pair by optimal transport between their pooled samples.

    For videos a and texts b, S^{ab}_{kl} = <x_a^k, y_b^l> is the sample similarity. The plan P^{ab}
    solves `sinkhorn` on the cost 1 - S^{ab} with uniform marginals and carries no gradient, so the
    gradient reaches the samples only through S. The score is

        "max"   (released UPRet): O_ab = 0.5 * (mean_l max_k (P * S)_kl + mean_k max_l (P * S)_kl)
        "inner":                  O_ab = sum_kl P_kl S_kl

    Args:
        video_samples: [Bv, K, D] L2-normalised pooled video samples.
        text_samples: [Bt, L, D] L2-normalised pooled text samples.
        eps, max_iter, tol: Sinkhorn settings, see `sinkhorn`.
        aggregation: "max" or "inner".
        sum_across_shards: see `sinkhorn`; used when this process scores one strip of the pairs.

    The [Bv, Bt, K, K] intermediates have K * K = 4 entries per pair with the released K = 2, which
    is small next to the token similarities, so this function does not chunk.

    Returns:
        [Bv, Bt] scores, differentiable with respect to both sample sets.
    """
    if aggregation not in ("max", "inner"):
        raise ValueError(f"aggregation must be 'max' or 'inner', got {aggregation!r}")
    sim = torch.einsum("akd,bld->abkl", video_samples, text_samples)  # [Bv, Bt, K, L]
    plan = sinkhorn(1.0 - sim, eps=eps, max_iter=max_iter, tol=tol, sum_across_shards=sum_across_shards)
    plan = plan.to(sim.dtype)
    weighted = plan * sim  # [Bv, Bt, K, L]
    if aggregation == "inner":
        return weighted.sum(dim=(-2, -1))
    best_per_text_sample = weighted.max(dim=-2).values.mean(dim=-1)  # max over k, mean over l
    best_per_video_sample = weighted.max(dim=-1).values.mean(dim=-1)  # max over l, mean over k
    return 0.5 * (best_per_text_sample + best_per_video_sample)
