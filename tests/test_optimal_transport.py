"""Tests of modules.optimal_transport against POT and against plain-domain Sinkhorn written with loops."""
import math
from typing import List, Tuple

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

from modules.optimal_transport import ot_score, sinkhorn

NOT_CONVERGED = "ignore:sinkhorn did not reach"


def plain_sinkhorn_lockstep(
    costs: List[List[List[float]]], eps: float, max_iter: int, tol: float
) -> Tuple[List[List[List[float]]], int]:
    """Plain Sinkhorn on a list of cost matrices, all updated in lockstep with one global stopping test.

    Starts from r = c = 1 with uniform marginals, updates r <- a / (G c) then c <- b / (G^T r), and
    stops when the mean of |r - r_prev| over every entry of every matrix is below tol.
    """
    kernels = [[[math.exp(-x / eps) for x in row] for row in cost] for cost in costs]
    rs = [[1.0] * len(cost) for cost in costs]
    cs = [[1.0] * len(cost[0]) for cost in costs]
    iterations = 0
    for _ in range(max_iter):
        change, count = 0.0, 0
        for n, kernel in enumerate(kernels):
            rows, cols = len(kernel), len(kernel[0])
            r_prev = rs[n]
            r = [(1.0 / rows) / sum(kernel[k][l] * cs[n][l] for l in range(cols)) for k in range(rows)]
            c = [(1.0 / cols) / sum(kernel[k][l] * r[k] for k in range(rows)) for l in range(cols)]
            change += sum(abs(x - y) for x, y in zip(r, r_prev))
            count += rows
            rs[n], cs[n] = r, c
        iterations += 1
        if change / count < tol:
            break
    plans = [
        [[rs[n][k] * kernel[k][l] * cs[n][l] for l in range(len(kernel[0]))] for k in range(len(kernel))]
        for n, kernel in enumerate(kernels)
    ]
    return plans, iterations


def _random_costs(batch: int, rows: int, cols: int, seed: int, high: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return high * torch.rand(batch, rows, cols, generator=generator, dtype=torch.float64)


def _offset_costs(batch: int, size: int, eps: float, seed: int) -> torch.Tensor:
    """Costs whose spread within a row and a column is a few eps, plus row and column offsets up to 2.

    Row and column offsets do not change the plan, so Sinkhorn converges fast for any eps, while the
    absolute costs still make the plain kernel exp(-C / eps) tiny for small eps.
    """
    generator = torch.Generator().manual_seed(seed)
    spread = 5.0 * eps * torch.rand(batch, size, size, generator=generator, dtype=torch.float64)
    row_offset = 1.5 * torch.rand(batch, size, 1, generator=generator, dtype=torch.float64)
    column_offset = 0.5 * torch.rand(batch, 1, size, generator=generator, dtype=torch.float64)
    return spread + row_offset + column_offset


def _pooled_samples(batch: int, size: int, spread: float, generator: torch.Generator) -> torch.Tensor:
    """Unit vectors [batch, size, 8] scattered around one random direction per item, like pooled samples."""
    center = torch.randn(batch, 1, 8, generator=generator, dtype=torch.float64)
    noise = torch.randn(batch, size, 8, generator=generator, dtype=torch.float64)
    return F.normalize(F.normalize(center, dim=-1) + spread * noise, dim=-1)


@pytest.mark.filterwarnings(NOT_CONVERGED)
@pytest.mark.parametrize("size", [2, 5])
@pytest.mark.parametrize("eps", [0.5, 0.1, 0.01])
def test_sinkhorn_matches_pot(size, eps):
    costs = _offset_costs(3, size, eps, seed=size)
    plan = sinkhorn(costs, eps=eps, max_iter=300, tol=0.0)
    uniform = np.full(size, 1.0 / size)
    for n in range(3):
        expected = ot.sinkhorn(uniform, uniform, costs[n].numpy(), reg=eps, numItermax=10000, stopThr=1e-12)
        assert np.allclose(plan[n].numpy(), expected, atol=1e-10, rtol=1e-8)


@pytest.mark.filterwarnings(NOT_CONVERGED)
def test_sinkhorn_rectangular_marginals_match_pot():
    costs = _random_costs(2, 3, 4, seed=7)
    a = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    b = torch.tensor([0.1, 0.4, 0.4, 0.1], dtype=torch.float64)
    plan = sinkhorn(costs, eps=0.2, a=a, b=b, max_iter=1000, tol=0.0)
    for n in range(2):
        expected = ot.sinkhorn(a.numpy(), b.numpy(), costs[n].numpy(), reg=0.2, numItermax=10000, stopThr=1e-12)
        assert np.allclose(plan[n].numpy(), expected, atol=1e-10, rtol=1e-8)
    assert torch.allclose(plan.sum(dim=-1), a.expand(2, 3), atol=1e-10)
    assert torch.allclose(plan.sum(dim=-2), b.expand(2, 4), atol=1e-10)


@pytest.mark.filterwarnings(NOT_CONVERGED)
def test_sinkhorn_small_eps_float32():
    costs = _offset_costs(2, 5, eps=0.01, seed=3)
    costs[:, 0] += 1.5
    # Costs above 1.5 with eps 0.01 give kernel entries below exp(-150), which is 0 in float32.
    kernel = torch.exp(-costs.float() / 0.01)
    assert torch.all(kernel[:, 0] == 0)

    r = torch.ones(2, 5)
    c = torch.ones(2, 5)
    for _ in range(10):
        r = 0.2 / (kernel @ c.unsqueeze(-1)).squeeze(-1)
        c = 0.2 / (kernel.transpose(1, 2) @ r.unsqueeze(-1)).squeeze(-1)
    plain_plan = r.unsqueeze(-1) * kernel * c.unsqueeze(-2)
    assert not torch.isfinite(plain_plan).all()

    plan = sinkhorn(costs.float(), eps=0.01, max_iter=300, tol=0.0)
    assert plan.dtype == torch.float32
    assert torch.isfinite(plan).all()
    uniform = np.full(5, 0.2)
    for n in range(2):
        expected = ot.sinkhorn(uniform, uniform, costs[n].numpy(), reg=0.01, numItermax=10000, stopThr=1e-12)
        assert np.allclose(plan[n].double().numpy(), expected, atol=1e-4)


def test_sinkhorn_plan_has_no_grad():
    costs = _random_costs(4, 2, 2, seed=1).requires_grad_()
    plan = sinkhorn(costs)
    assert not plan.requires_grad
    assert plan.grad_fn is None


def test_sinkhorn_marginals_default_settings():
    generator = torch.Generator().manual_seed(12)
    video = _pooled_samples(6, 2, spread=0.3, generator=generator).float()
    text = _pooled_samples(5, 2, spread=0.3, generator=generator).float()
    plan = sinkhorn(1.0 - torch.einsum("akd,bld->abkl", video, text))
    # The last update rescales the columns, so the column marginals hold exactly and the rows approximately.
    assert torch.allclose(plan.sum(dim=-2), torch.full((6, 5, 2), 0.5), atol=1e-6)
    assert torch.allclose(plan.sum(dim=-1), torch.full((6, 5, 2), 0.5), atol=1e-2)


@pytest.mark.filterwarnings(NOT_CONVERGED)
@pytest.mark.parametrize(
    "tol, eps, size, spread",
    [(1e-2, 0.1, 2, 0.3), (1e-2, 0.1, 5, 0.3), (1e-4, 0.1, 2, 0.3), (1e-6, 0.2, 5, 0.3), (1e-2, 0.1, 2, 3.0)],
)
def test_sinkhorn_stopping_rule(tol, eps, size, spread):
    generator = torch.Generator().manual_seed(11)
    video = _pooled_samples(4, size, spread, generator)
    text = _pooled_samples(3, size, spread, generator)
    costs = 1.0 - torch.einsum("akd,bld->abkl", video, text)  # [4, 3, K, K]
    plan, iterations = sinkhorn(costs, eps=eps, max_iter=100, tol=tol, return_iterations=True)

    flat = costs.reshape(-1, size, size).tolist()
    expected_plans, expected_iterations = plain_sinkhorn_lockstep(flat, eps=eps, max_iter=100, tol=tol)
    assert iterations == expected_iterations
    assert iterations > 1
    expected_plans = torch.tensor(expected_plans, dtype=torch.float64)
    assert torch.allclose(plan.reshape(-1, size, size), expected_plans, atol=1e-12)


def test_sinkhorn_warns_at_max_iter():
    costs = _random_costs(2, 3, 3, seed=2)
    with pytest.warns(RuntimeWarning, match="did not reach"):
        _, iterations = sinkhorn(costs, eps=0.1, max_iter=3, tol=0.0, return_iterations=True)
    assert iterations == 3


def test_sinkhorn_rejects_non_finite_cost():
    costs = _random_costs(2, 2, 2, seed=4)
    costs[1, 0, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        sinkhorn(costs)
    costs[1, 0, 1] = float("inf")
    with pytest.raises(FloatingPointError):
        sinkhorn(costs)


@pytest.mark.filterwarnings(NOT_CONVERGED)
def test_sinkhorn_rejects_non_finite_plan():
    costs = _random_costs(1, 2, 2, seed=5)
    with pytest.raises(FloatingPointError, match="plan"):
        sinkhorn(costs, a=torch.tensor([-0.5, 1.5], dtype=torch.float64))


def _samples(seed: int, spread: float = 0.15):
    generator = torch.Generator().manual_seed(seed)
    return _pooled_samples(3, 2, spread, generator), _pooled_samples(4, 2, spread, generator)


def _loop_ot_score(video, text, plans, aggregation):
    """O_ab from explicit loops, given per-pair plans plans[a][b][k][l]."""
    num_videos, rows, _ = video.shape
    num_texts, cols, _ = text.shape
    out = torch.zeros(num_videos, num_texts, dtype=torch.float64)
    for a in range(num_videos):
        for b in range(num_texts):
            weighted = [
                [plans[a][b][k][l] * float(video[a, k] @ text[b, l]) for l in range(cols)] for k in range(rows)
            ]
            if aggregation == "inner":
                out[a, b] = sum(sum(row) for row in weighted)
            else:
                over_k = sum(max(weighted[k][l] for k in range(rows)) for l in range(cols)) / cols
                over_l = sum(max(weighted[k][l] for l in range(cols)) for k in range(rows)) / rows
                out[a, b] = 0.5 * (over_k + over_l)
    return out


@pytest.mark.parametrize("aggregation", ["max", "inner"])
def test_ot_score_matches_loops(aggregation):
    video, text = _samples(seed=8)
    scores = ot_score(video, text, eps=0.1, aggregation=aggregation)

    costs = [[(1.0 - video[a] @ text[b].t()).tolist() for b in range(4)] for a in range(3)]
    flat_plans, _ = plain_sinkhorn_lockstep([cost for row in costs for cost in row], eps=0.1, max_iter=100, tol=1e-2)
    plans = [flat_plans[a * 4 : (a + 1) * 4] for a in range(3)]
    expected = _loop_ot_score(video, text, plans, aggregation)
    assert scores.shape == (3, 4)
    assert torch.allclose(scores, expected, atol=1e-12)


def test_ot_score_released_magnitude():
    # With K = 2 and eps = 0.1 the plan is close to 1/4 everywhere, so O is about cos / 4.
    video, text = _samples(seed=9)
    video = video[:, :1].expand(3, 2, 8)
    text = text[:, :1].expand(4, 2, 8)
    scores = ot_score(video, text)
    cosine = video[:, 0] @ text[:, 0].t()
    assert torch.allclose(scores, cosine / 4.0, atol=1e-6)


def _manual_max_gradient(video, text, plans, upstream):
    """Gradient of sum_ab upstream_ab * O_ab (aggregation "max") with the plans held fixed."""
    num_videos, rows, _ = video.shape
    num_texts, cols, _ = text.shape
    grad_video = torch.zeros_like(video)
    grad_text = torch.zeros_like(text)
    for a in range(num_videos):
        for b in range(num_texts):
            sim = video[a] @ text[b].t()
            weighted = plans[a, b] * sim
            d_sim = torch.zeros(rows, cols, dtype=video.dtype)
            for l in range(cols):
                d_sim[int(weighted[:, l].argmax()), l] += 0.5 / cols
            for k in range(rows):
                d_sim[k, int(weighted[k].argmax())] += 0.5 / rows
            d_sim = d_sim * plans[a, b] * upstream[a, b]
            for k in range(rows):
                for l in range(cols):
                    grad_video[a, k] += d_sim[k, l] * text[b, l]
                    grad_text[b, l] += d_sim[k, l] * video[a, k]
    return grad_video, grad_text


def test_ot_score_gradient_skips_plan():
    video, text = _samples(seed=10)
    video.requires_grad_()
    text.requires_grad_()
    upstream = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (ot_score(video, text) * upstream).sum().backward()

    with torch.no_grad():
        plans = sinkhorn(1.0 - torch.einsum("akd,bld->abkl", video, text))
    grad_video, grad_text = _manual_max_gradient(video.detach(), text.detach(), plans, upstream)
    assert torch.allclose(video.grad, grad_video, atol=1e-12)
    assert torch.allclose(text.grad, grad_text, atol=1e-12)


def test_ot_score_gradient_differs_from_unrolled_plan():
    # Differentiating through an unrolled plain Sinkhorn gives another gradient, so the check above can fail.
    video, text = _samples(seed=10)
    video.requires_grad_()
    (ot_score(video, text, aggregation="inner")).sum().backward()

    unrolled_video = video.detach().clone().requires_grad_()
    sim = torch.einsum("akd,bld->abkl", unrolled_video, text)
    kernel = torch.exp(-(1.0 - sim) / 0.1)
    r = torch.ones(3, 4, 2, dtype=torch.float64)
    c = torch.ones(3, 4, 2, dtype=torch.float64)
    for _ in range(20):
        r = 0.5 / (kernel @ c.unsqueeze(-1)).squeeze(-1)
        c = 0.5 / (kernel.transpose(-1, -2) @ r.unsqueeze(-1)).squeeze(-1)
    plan = r.unsqueeze(-1) * kernel * c.unsqueeze(-2)
    (plan * sim).sum().backward()
    assert not torch.allclose(video.grad, unrolled_video.grad, atol=1e-6)


def test_ot_score_rejects_unknown_aggregation():
    video, text = _samples(seed=1)
    with pytest.raises(ValueError, match="aggregation"):
        ot_score(video, text, aggregation="mean")
