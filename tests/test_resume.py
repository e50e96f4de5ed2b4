"""A run killed with SIGKILL inside an epoch and resumed with --resume latest must equal an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from modules.checkpoint import LAST_NAME, PREV_NAME, load_checkpoint
from modules.distributed import ResumableDistributedSampler
from test_driver import DRIVER, REPO_ROOT, _data_args, _run, corpus, driver  # noqa: F401 (fixtures)

# 32 training sentences in batches of 4: 8 steps per epoch, 24 in all, a checkpoint every 3 steps.
RUN_FLAGS = ["--do_train", "--batch_size", "4", "--epochs", "3", "--save_every_steps", "3"]
KILL_AFTER = "at epoch 1, step 3 of 8"


def _driver_command(corpus: Path, output_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(DRIVER), *_data_args(corpus, output_dir), *RUN_FLAGS, *extra]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def straight_run(corpus, tmp_path_factory) -> Path:
    """Return the folder of an uninterrupted run (no data-loader workers)."""
    output_dir = tmp_path_factory.mktemp("straight")
    _run(_driver_command(corpus, output_dir), cwd=REPO_ROOT)
    return output_dir


def _drop_times(value):
    # Wall-clock times differ between any two runs. Every other number must match exactly.
    if isinstance(value, dict):
        return {key: _drop_times(item) for key, item in value.items() if not key.endswith("time_s")}
    if isinstance(value, list):
        return [_drop_times(item) for item in value]
    return value


def _assert_same_run(expected_dir: Path, actual_dir: Path) -> None:
    expected = load_checkpoint(expected_dir / LAST_NAME)
    actual = load_checkpoint(actual_dir / LAST_NAME)
    assert actual["step"] == expected["step"] == 24
    assert set(actual["model"]) == set(expected["model"])
    for name, tensor in expected["model"].items():
        assert torch.equal(actual["model"][name], tensor), name
    expected_history = _drop_times(json.loads((expected_dir / "results.json").read_text())["history"])
    actual_history = _drop_times(json.loads((actual_dir / "results.json").read_text())["history"])
    assert actual_history == expected_history


def _kill_mid_epoch(command: list[str], log: Path, deadline_s: float = 120.0) -> None:
    """Start a run and SIGKILL it from outside as soon as its log reports the mid-epoch checkpoint."""
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    start = time.time()
    try:
        while not (log.is_file() and KILL_AFTER in log.read_text()):
            assert process.poll() is None, "the run ended before its mid-epoch checkpoint"
            assert time.time() - start < deadline_s, "no mid-epoch checkpoint appeared"
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("num_workers", ["0", "1"])
def test_sigkill_mid_epoch_then_resume(corpus, straight_run, tmp_path, num_workers):
    output_dir = tmp_path / "killed"
    command = _driver_command(corpus, output_dir, "--num_workers", num_workers)
    _kill_mid_epoch(command, output_dir / "log.txt")

    saved = load_checkpoint(output_dir / LAST_NAME)
    assert saved["epoch"] == 1
    assert not saved["epoch_finished"]
    assert 3 <= saved["epoch_step"] < 8

    if num_workers == "1":
        # A half-written newest file must be skipped in favour of the one before it.
        last = output_dir / LAST_NAME
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    _run(command + ["--resume", "latest"], cwd=REPO_ROOT)

    log = (output_dir / "log.txt").read_text()
    if num_workers == "1":
        assert f"skipping checkpoint {last}" in log
        assert f"resumed from {output_dir / PREV_NAME} at epoch 1, step 0 of the epoch" in log
    else:
        assert f"resumed from {output_dir / LAST_NAME} at epoch 1, step {saved['epoch_step']} of the epoch" in log
    _assert_same_run(straight_run, output_dir)


def test_seeded_runs_identical(driver, corpus, tmp_path):
    # The killed-and-resumed runs above already match across processes and worker counts. Here two
    # runs in one process with the same --seed must repeat every bit.
    runs = []
    for name in ("first", "second"):
        results = driver.main(_data_args(corpus, tmp_path / name) + ["--do_train", "--batch_size", "8",
                                                                     "--epochs", "2", "--seed", "7"])
        runs.append(_drop_times(results["history"]))
    assert runs[0] == runs[1]
    first = load_checkpoint(tmp_path / "first" / LAST_NAME)["model"]
    second = load_checkpoint(tmp_path / "second" / LAST_NAME)["model"]
    for name, tensor in first.items():
        assert torch.equal(second[name], tensor), name


def test_evaluation_independent_of_seed(driver, corpus, straight_run, tmp_path, monkeypatch):
    import modules.heads

    def no_sampling(*args, **kwargs):
        raise AssertionError("evaluation drew Monte Carlo noise")

    # Evaluation must score the deterministic token features, never Gaussian samples.
    monkeypatch.setattr(modules.heads, "gaussian_noise", no_sampling)
    metrics = []
    for seed in ("1", "2"):
        results = driver.main(_data_args(corpus, tmp_path / seed) + [
            "--do_eval", "--init_model", str(straight_run / "checkpoint_best.pt"), "--seed", seed,
        ])
        metrics.append(_drop_times(results["eval"]))
    assert metrics[0] == metrics[1]
    assert metrics[0]["t2v"]["num_queries"] == 12


class _WorkerSeeds(Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> tuple:
        return index, get_worker_info().seed


def test_worker_seeds_repeat_after_skip(driver):
    dataset = _WorkerSeeds()

    def epoch_seeds(skip_batches: int) -> dict:
        sampler = ResumableDistributedSampler(dataset, num_replicas=1, rank=0, seed=3, drop_last=True)
        sampler.set_epoch(2)
        sampler.set_skip(skip_batches * 4)
        generator = torch.Generator()
        generator.manual_seed(driver.loader_seed(3, 2, 0))
        loader = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=1, generator=generator)
        return {int(i): int(s) for indices, seeds in loader for i, s in zip(indices, seeds)}

    full = epoch_seeds(0)
    resumed = epoch_seeds(2)
    assert len(resumed) == 8
    assert all(full[index] == seed for index, seed in resumed.items())
    # The global torch generator does not feed the worker seeds, so reseeding it changes nothing.
    torch.manual_seed(12345)
    assert epoch_seeds(0) == full
