"""Two gloo processes must reproduce the loss and gradients of one process on the global batch."""

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

REPO_ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 4
FEATURE_LEN = 5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _deterministic_noise(shape, like, generator=None):
    # Noise that depends only on each item's own values, so it is the same whichever rank
    # encodes the item.
    return torch.sin(1000.0 * like.detach()).unsqueeze(1).expand(shape).contiguous()


def _build(method: str):
    from modules.clip import CLIPConfig
    from modules.criterion import RetrievalLoss
    from modules.model import RetrievalModel

    torch.manual_seed(0)
    config = CLIPConfig(
        embed_dim=16, vocab_size=49408, context_length=8, text_width=16, text_layers=1, text_heads=2,
        video_input_dim=1024, video_width=16, video_layers=1, video_heads=2, feature_len=FEATURE_LEN,
    )
    model = RetrievalModel(config, method=method, sample_num=2, dist_heads=2, dist_dropout=0.0)
    return model, RetrievalLoss


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
    outputs = model(*batch)
    terms = criterion(outputs)
    terms["loss"].backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return terms["loss"].detach(), grads


def _worker(rank: int, world_size: int, port: int, method: str, out_path: str) -> None:
    sys.path.insert(0, str(REPO_ROOT))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from modules import distributed as du

    import modules.heads

    modules.heads.gaussian_noise = _deterministic_noise  # this process exits after the test
    info = du.init_distributed(device="cpu", timeout_s=120)
    try:
        model, loss_cls = _build(method)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        criterion = loss_cls(method=method, gather=du.gather_outputs)
        per_rank = GLOBAL_BATCH // world_size
        batch = [t[rank * per_rank:(rank + 1) * per_rank] for t in _global_batch()]
        loss, grads = _loss_and_grads(ddp, criterion, batch)
        if info.rank == 0:
            grads = {name.removeprefix("module."): g for name, g in grads.items()}
            torch.save({"loss": loss, "grads": grads}, out_path)
    finally:
        du.cleanup_distributed()


@pytest.mark.parametrize("method", ["upret", "cico"])
def test_two_gloo_ranks_match_one_process(method, tmp_path, monkeypatch):
    import modules.heads

    monkeypatch.setattr(modules.heads, "gaussian_noise", _deterministic_noise)
    model, loss_cls = _build(method)
    reference_loss, reference_grads = _loss_and_grads(model, loss_cls(method=method), _global_batch())

    out_path = tmp_path / "rank0.pt"
    mp.start_processes(_worker, args=(2, _free_port(), method, str(out_path)), nprocs=2, join=True,
                       start_method="spawn")
    result = torch.load(out_path, weights_only=True)

    assert torch.allclose(result["loss"], reference_loss, atol=1e-5, rtol=1e-5)
    assert set(result["grads"]) == set(reference_grads)
    for name, grad in reference_grads.items():
        assert torch.allclose(result["grads"][name], grad, atol=1e-5, rtol=1e-4), name
    assert any(g.abs().sum() > 0 for g in reference_grads.values())
