"""Atomic checkpoint files, the fallback of --resume latest, generator state and the resumable sampler."""

import logging
import os
import random

import numpy as np
import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from modules import checkpoint as ckpt
from modules.distributed import ResumableDistributedSampler


def _training_state(value: float) -> dict:
    return {
        "model": {"weight": torch.full((3, 2), value)},
        "optimizer": {"state": {}, "param_groups": []},
        "scheduler": {"last_epoch": 1},
        "epoch": 0,
        "step": int(value),
    }


def test_save_replaces_atomically(tmp_path):
    path = tmp_path / ckpt.LAST_NAME
    ckpt.save_checkpoint(_training_state(1.0), path)
    ckpt.save_checkpoint(_training_state(2.0), path, previous=tmp_path / ckpt.PREV_NAME)

    assert ckpt.load_checkpoint(path)["step"] == 2
    assert ckpt.load_checkpoint(tmp_path / ckpt.PREV_NAME)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.LAST_NAME, ckpt.PREV_NAME]


def test_save_fsyncs_file_and_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def record(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    ckpt.save_checkpoint(_training_state(1.0), tmp_path / "a.pt")
    assert any(name.startswith(str(tmp_path / ".a.pt.")) for name in synced)
    assert str(tmp_path) in synced


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / ckpt.LAST_NAME
    ckpt.save_checkpoint(_training_state(1.0), path)

    def write_half_then_fail(obj, handle):
        handle.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(_training_state(2.0), path, previous=tmp_path / ckpt.PREV_NAME)
    monkeypatch.undo()

    assert ckpt.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.LAST_NAME]


def test_truncated_file_raises_checkpoint_error(tmp_path):
    path = tmp_path / "cut.pt"
    ckpt.save_checkpoint(_training_state(1.0), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt") as error:
        ckpt.load_checkpoint(path)
    assert str(path) in str(error.value)


def test_latest_skips_corrupt_last(tmp_path, caplog):
    ckpt.save_checkpoint(_training_state(1.0), tmp_path / ckpt.LAST_NAME)
    ckpt.save_checkpoint(_training_state(2.0), tmp_path / ckpt.LAST_NAME, previous=tmp_path / ckpt.PREV_NAME)
    last = tmp_path / ckpt.LAST_NAME
    last.write_bytes(last.read_bytes()[:100])

    with caplog.at_level(logging.WARNING):
        path, state = ckpt.find_latest_checkpoint(tmp_path)
    assert path.name == ckpt.PREV_NAME
    assert state["step"] == 1
    assert "skipping checkpoint" in caplog.text
    assert ckpt.LAST_NAME in caplog.text


def test_latest_prefers_newer_file(tmp_path):
    ckpt.save_checkpoint(_training_state(1.0), tmp_path / ckpt.LAST_NAME)
    ckpt.save_checkpoint(_training_state(2.0), tmp_path / ckpt.LAST_NAME, previous=tmp_path / ckpt.PREV_NAME)
    # The previous file is made newer, as after a crash between its rename and a later write.
    os.utime(tmp_path / ckpt.LAST_NAME, ns=(1_000_000_000, 1_000_000_000))
    path, state = ckpt.find_latest_checkpoint(tmp_path)
    assert path.name == ckpt.PREV_NAME
    assert state["step"] == 1


def test_latest_skips_weights_only_file(tmp_path):
    ckpt.save_checkpoint({"model": {"weight": torch.zeros(2)}, "epoch": 3}, tmp_path / ckpt.LAST_NAME)
    with pytest.raises(FileNotFoundError, match="cannot continue training"):
        ckpt.find_latest_checkpoint(tmp_path)


def test_latest_in_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        ckpt.find_latest_checkpoint(tmp_path)


def _draws() -> tuple:
    return random.random(), float(np.random.standard_normal()), torch.randn(3)


def test_rng_state_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's state
    ckpt.save_checkpoint({"rng": ckpt.capture_rng_state()}, tmp_path / "rng.pt")
    expected = _draws()

    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    ckpt.restore_rng_state(ckpt.load_checkpoint(tmp_path / "rng.pt")["rng"])
    actual = _draws()

    assert actual[0] == expected[0]
    assert actual[1] == expected[1]
    assert torch.equal(actual[2], expected[2])


@pytest.mark.parametrize("world_size, num_items, local_batch, skip_batches", [
    (1, 10, 3, 2), (2, 17, 2, 3), (3, 31, 2, 1), (2, 16, 4, 2),
])
def test_sampler_skip_resumes_position(world_size, num_items, local_batch, skip_batches):
    dataset = list(range(num_items))
    full, resumed = [], []
    for rank in range(world_size):
        reference = DistributedSampler(dataset, num_replicas=world_size, rank=rank, seed=5, drop_last=True)
        reference.set_epoch(4)
        sampler = ResumableDistributedSampler(dataset, num_replicas=world_size, rank=rank, seed=5, drop_last=True)
        sampler.set_epoch(4)
        sampler.set_skip(skip_batches * local_batch)
        full.append(list(reference))
        resumed.append(list(sampler))
        assert len(sampler) == len(resumed[-1])

    for rank in range(world_size):
        assert resumed[rank] == full[rank][skip_batches * local_batch:]
    # Every rank keeps the same number of indices, so no rank runs an extra step.
    assert len({len(indices) for indices in resumed}) == 1


def test_sampler_skip_independent_of_world_size():
    # The global batch of 4 is covered by positions 0..4k-1 of the permutation for any number of ranks.
    dataset = list(range(24))
    consumed = {}
    for world_size in (1, 2, 4):
        taken = set()
        for rank in range(world_size):
            sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, seed=0, drop_last=True)
            sampler.set_epoch(1)
            taken.update(list(sampler)[: 3 * (4 // world_size)])
        consumed[world_size] = taken
    assert consumed[1] == consumed[2] == consumed[4]
    assert len(consumed[1]) == 12
