"""Two gloo processes: the loss and gradients of one process, long waits for rank 0, and a mid-epoch resume."""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from test_driver import DRIVER, _data_args, _free_port, _run, corpus  # noqa: F401 (fixture)

REPO_ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 4
FEATURE_LEN = 5


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


TRAINING_TIMEOUT_S = 2


def _long_wait_worker(rank: int, port: int, ready_dir: str, out_path: str) -> None:
    sys.path.insert(0, str(REPO_ROOT))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    from modules import distributed as du

    # Both ranks start the rendezvous together, so that the short timeout only bites where intended.
    Path(ready_dir, str(rank)).touch()
    while len(os.listdir(ready_dir)) < 2:
        time.sleep(0.01)
    du.init_distributed(device="cpu", timeout_s=TRAINING_TIMEOUT_S, wait_timeout_s=60)
    outcome = {}
    try:
        # Rank 0 evaluates alone for longer than the training timeout while rank 1 waits.
        if rank == 0:
            time.sleep(1.5 * TRAINING_TIMEOUT_S)
        outcome["metrics"] = du.broadcast_object({"R1": 42.0} if rank == 0 else None)
        if rank == 0:
            time.sleep(1.5 * TRAINING_TIMEOUT_S)
        du.wait_for_main()

        # The training group still works afterwards.
        total = torch.tensor([float(rank + 1)])
        dist.all_reduce(total)
        outcome["sum"] = total.item()

        # Control: a barrier of the training group does time out while rank 0 is busy.
        if rank == 1:
            try:
                dist.barrier()
                outcome["control"] = "no error"
            except RuntimeError as error:
                outcome["control"] = str(error)
        else:
            time.sleep(1.5 * TRAINING_TIMEOUT_S)
    finally:
        torch.save(outcome, f"{out_path}.{rank}")
        du.cleanup_distributed()



def test_waiting_ranks_outlast_training_timeout(tmp_path):
    ready_dir = tmp_path / "ready"
    ready_dir.mkdir()
    out_path = tmp_path / "outcome"
    mp.start_processes(_long_wait_worker, args=(_free_port(), str(ready_dir), str(out_path)), nprocs=2, join=True,
                       start_method="spawn")
    waiting = torch.load(f"{out_path}.1", weights_only=True)
    assert waiting["metrics"] == {"R1": 42.0}
    assert waiting["sum"] == 3.0
    assert "Timed out" in waiting["control"] or "timeout" in waiting["control"].lower()


def test_two_ranks_resume_mid_epoch(corpus, tmp_path):
    # The straight run keeps its mid-epoch checkpoint of epoch 1 (step 6 of 8) as checkpoint_prev.pt.
    torchrun = Path(sys.executable).parent / "torchrun"
    flags = ["--do_train", "--batch_size", "4", "--epochs", "2", "--save_every_steps", "3"]
    straight = tmp_path / "straight"
    _run([str(torchrun), "--nproc_per_node=2", f"--master_port={_free_port()}", str(DRIVER),
          *_data_args(corpus, straight), *flags], cwd=REPO_ROOT)
    middle = torch.load(straight / "checkpoint_prev.pt", weights_only=True)
    assert (middle["epoch"], middle["epoch_step"], middle["epoch_finished"]) == (1, 6, False)
    assert len(middle["rng_states"]) == 2

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy2(straight / "checkpoint_prev.pt", resumed / "middle.pt")
    shutil.copy2(straight / "checkpoint_best.pt", resumed / "checkpoint_best.pt")
    _run([str(torchrun), "--nproc_per_node=2", f"--master_port={_free_port()}", str(DRIVER),
          *_data_args(corpus, resumed), *flags, "--resume", str(resumed / "middle.pt")], cwd=REPO_ROOT)

    expected = torch.load(straight / "checkpoint_last.pt", weights_only=True)
    actual = torch.load(resumed / "checkpoint_last.pt", weights_only=True)
    assert actual["step"] == expected["step"] == 16
    for name, tensor in expected["model"].items():
        assert torch.equal(actual["model"][name], tensor), name
    expected_loss = json.loads(expected["history_json"])[1]["train"]["loss"]
    assert json.loads(actual["history_json"])[1]["train"]["loss"] == expected_loss
