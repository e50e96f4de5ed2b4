"""The sharded loss (each rank scores its own videos against all texts) must equal the global-batch loss."""

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from modules.criterion import RetrievalLoss, ThreadGroup, sharded_cross_entropy
from test_criterion import make_outputs
from test_driver import _free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
PARTS = ("video", "text", "text_aug")


def _close(result: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> bool:
    """True when |result - expected| <= rel * max|expected| everywhere (float32 round-off scale)."""
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return bool((result - expected).abs().max() <= rel * max(scale, 1.0))


def _float32_outputs(seed: int, batch: int, method: str) -> dict:
    outputs = make_outputs(seed=seed, batch=batch)
    for part in PARTS:
        for key, value in list(outputs[part].items()):
            outputs[part][key] = value.float()
        if method == "cico":
            outputs[part].pop("samples", None)
            outputs[part].pop("log_sigma", None)
    outputs["logit_scale"] = torch.nn.Parameter(outputs["logit_scale"].float())
    return outputs


def _leaves(outputs: dict) -> list:
    leaves = []
    for part in PARTS:
        for key in ("tokens", "weights", "samples"):
            if key in outputs[part]:
                outputs[part][key].requires_grad_()
                leaves.append(outputs[part][key])
    return leaves + [outputs["logit_scale"]]


def _simulated_ranks(full: dict, world_size: int, **loss_options) -> list:
    """Run the sharded loss of `world_size` ranks as threads; each rank gets its slice of `full`."""
    local_size = full["video"]["tokens"].shape[0] // world_size

    def gather(local: dict) -> dict:
        # The identity on the global tensors, so gradients of every rank land on the same leaves.
        return {part: {key: full[part][key] for key in local[part]} for part in local}

    def rank_loss(comm) -> dict:
        rows = slice(comm.rank * local_size, (comm.rank + 1) * local_size)
        local = {part: {key: value[rows] for key, value in full[part].items()} for part in PARTS}
        local["logit_scale"] = full["logit_scale"]
        return RetrievalLoss(gather=gather, comm=comm, **loss_options)(local)

    return ThreadGroup(world_size).run(rank_loss)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize(
    "options",
    [
        {"method": "upret"},
        {"method": "upret", "ot_mode": "loss", "ot_weight": 0.7, "dual_mix": 0.3},
        {"method": "cico", "masked_softmax": True},
    ],
)
def test_simulated_ranks_sum_to_global(world_size, options):
    full = _float32_outputs(seed=world_size, batch=4, method=options["method"])
    leaves = _leaves(full)
    reference = RetrievalLoss(**options)(full)
    reference_grads = torch.autograd.grad(reference["loss"], leaves)

    results = _simulated_ranks(full, world_size, **options)
    for result in results:
        assert set(result) == set(reference)
        for key in set(reference) - {"loss", "log_sigma/video", "log_sigma/text"}:
            assert _close(result[key].detach(), reference[key].detach()), key
        assert _close(result["loss"].detach(), reference["loss"].detach())

    # DDP averages the W ranks' gradients; each rank's loss carries W times its share.
    average = sum(result["loss"] for result in results) / world_size
    grads = torch.autograd.grad(average, leaves)
    for grad, expected in zip(grads, reference_grads):
        assert _close(grad, expected)
    assert all(float(g.abs().sum()) > 0 for g in reference_grads)


def test_sharded_cross_entropy_matches_dense():
    logits = torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
    dense = torch.nn.functional.cross_entropy(logits, torch.arange(6))
    dense_t = torch.nn.functional.cross_entropy(logits.t(), torch.arange(6))
    expected_rows, expected_columns = torch.autograd.grad(dense, logits)[0], torch.autograd.grad(dense_t, logits)[0]

    def rank_shares(comm):
        rows = slice(2 * comm.rank, 2 * comm.rank + 2)
        (row_share, column_share), = sharded_cross_entropy([logits[rows]], 2 * comm.rank, comm)
        return row_share, column_share

    shares = ThreadGroup(3).run(rank_shares)
    row_total = sum(s[0] for s in shares)
    column_total = sum(s[1] for s in shares)
    assert float(row_total.detach()) == pytest.approx(float(dense.detach()), rel=1e-12)
    assert float(column_total.detach()) == pytest.approx(float(dense_t.detach()), rel=1e-12)
    assert torch.allclose(torch.autograd.grad(row_total, logits, retain_graph=True)[0], expected_rows, atol=1e-12)
    assert torch.allclose(torch.autograd.grad(column_total, logits)[0], expected_columns, atol=1e-12)


def test_sharded_sinkhorn_stops_globally():
    # Strips that converge at different speeds: the stopping test must still use the global mean.
    from modules.optimal_transport import sinkhorn

    generator = torch.Generator().manual_seed(3)
    costs = torch.rand(4, 3, 2, 2, generator=generator, dtype=torch.float64)
    expected, expected_iterations = sinkhorn(costs, eps=0.1, tol=1e-2, return_iterations=True)

    def rank_plan(comm):
        def sum_across_shards(tensor):
            return comm.all_gather(tensor).sum(dim=0)

        rows = slice(2 * comm.rank, 2 * comm.rank + 2)
        return sinkhorn(costs[rows], eps=0.1, tol=1e-2, return_iterations=True, sum_across_shards=sum_across_shards)

    results = ThreadGroup(2).run(rank_plan)
    assert [iterations for _, iterations in results] == [expected_iterations] * 2
    assert torch.allclose(torch.cat([plan for plan, _ in results]), expected, atol=1e-12)
    _, first_alone = sinkhorn(costs[:2], eps=0.1, tol=1e-2, return_iterations=True)
    _, second_alone = sinkhorn(costs[2:], eps=0.1, tol=1e-2, return_iterations=True)
    assert first_alone != expected_iterations
    assert second_alone != expected_iterations


# Two gloo processes with DDP and the real model.

GLOBAL_BATCH = 4
FEATURE_LEN = 5


def _deterministic_noise(shape, like, generator=None):
    # Noise that depends only on each item's own values, so it is the same whichever rank encodes the item.
    return torch.sin(1000.0 * like.detach()).unsqueeze(1).expand(shape).contiguous()


def _build_model(method: str):
    from modules.clip import CLIPConfig
    from modules.model import RetrievalModel

    torch.manual_seed(0)
    config = CLIPConfig(
        embed_dim=16, vocab_size=49408, context_length=8, text_width=16, text_layers=1, text_heads=2,
        video_input_dim=1024, video_width=16, video_layers=1, video_heads=2, feature_len=FEATURE_LEN,
    )
    return RetrievalModel(config, method=method, sample_num=2, dist_heads=2, dist_dropout=0.0)


def _global_batch():
    generator = torch.Generator().manual_seed(1)
    text = torch.zeros(GLOBAL_BATCH, 8, dtype=torch.long)
    for b, length in enumerate([3, 5, 4, 6]):
        text[b, 0] = 49406
        text[b, 1:length - 1] = torch.randint(1, 1000, (length - 2,), generator=generator)
        text[b, length - 1] = 49407
    text_aug = text.clone()
    text_aug[1, [1, 2]] = text_aug[1, [2, 1]]
    video = torch.randn(GLOBAL_BATCH, FEATURE_LEN, 1024, generator=generator)
    video_mask = torch.zeros(GLOBAL_BATCH, FEATURE_LEN + 1, dtype=torch.long)
    for b, clips in enumerate([5, 2, 3, 1]):
        video_mask[b, 1:clips + 1] = 1
        video[b, clips:] = 0
    return text, text_aug, video, video_mask


def _loss_and_grads(model, criterion, batch):
    terms = criterion(model(*batch))
    terms["loss"].backward()
    grads = {name.removeprefix("module."): p.grad.detach().clone()
             for name, p in model.named_parameters() if p.grad is not None}
    return terms["loss"].detach(), grads


def _worker(rank: int, world_size: int, port: int, method: str, out_path: str) -> None:
    sys.path.insert(0, str(REPO_ROOT))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import modules.heads
    from modules import distributed as du
    from modules.criterion import ProcessGroupComm

    modules.heads.gaussian_noise = _deterministic_noise  # this process exits after the test
    du.init_distributed(device="cpu", timeout_s=120)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(_build_model(method))
        criterion = RetrievalLoss(method=method, gather=du.gather_outputs, comm=ProcessGroupComm())
        per_rank = GLOBAL_BATCH // world_size
        batch = [t[rank * per_rank:(rank + 1) * per_rank] for t in _global_batch()]
        loss, grads = _loss_and_grads(ddp, criterion, batch)
        torch.save({"loss": loss, "grads": grads}, f"{out_path}.{rank}")
    finally:
        du.cleanup_distributed()


@pytest.mark.parametrize("method", ["upret", "cico"])
def test_sharded_gloo_ranks_match_one_process(method, tmp_path, monkeypatch):
    import modules.heads

    monkeypatch.setattr(modules.heads, "gaussian_noise", _deterministic_noise)
    model = _build_model(method)
    reference_loss, reference_grads = _loss_and_grads(model, RetrievalLoss(method=method), _global_batch())

    out_path = tmp_path / "result.pt"
    mp.start_processes(_worker, args=(2, _free_port(), method, str(out_path)), nprocs=2, join=True,
                       start_method="spawn")
    for rank in range(2):
        result = torch.load(f"{out_path}.{rank}", weights_only=True)
        assert _close(result["loss"], reference_loss)
        assert set(result["grads"]) == set(reference_grads)
        for name, grad in reference_grads.items():
            assert _close(result["grads"][name], grad), name
    assert any(float(g.abs().sum()) > 0 for g in reference_grads.values())
