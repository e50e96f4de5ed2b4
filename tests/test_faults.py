"""Faults a run must survive or report: code-running pickles passed as checkpoints, and a rank that dies or hangs."""

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from modules.checkpoint import UnsafeCheckpointError, load_checkpoint
from modules.clip import read_checkpoint
from test_driver import DRIVER, REPO_ROOT, _data_args, _free_port, corpus, driver  # noqa: F401 (fixtures)

DIST_TIMEOUT_S = 10


class _CreatesMarker:
    """Pickles to a call of ``exec`` that creates a marker file, the way a hostile checkpoint runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.fixture
def hostile_file(tmp_path) -> tuple[Path, Path]:
    """Return a .pt file that creates a marker when fully unpickled, and the marker's path."""
    marker = tmp_path / "code_ran"
    path = tmp_path / "hostile.pt"
    torch.save({"model": _CreatesMarker(marker), "epoch": 0}, path)

    # The file must really run code when loaded without restrictions, or the tests below prove nothing.
    control_marker = tmp_path / "control_ran"
    control = tmp_path / "control.pt"
    torch.save({"model": _CreatesMarker(control_marker)}, control)
    torch.load(control, weights_only=False)
    assert control_marker.exists()
    return path, marker


def test_hostile_checkpoint_rejected(hostile_file):
    path, marker = hostile_file
    with pytest.raises(UnsafeCheckpointError, match="rejected .*hostile.pt.*GLOBAL"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("flags", [
    ["--do_train", "--epochs", "1", "--batch_size", "8", "--resume", "{path}"],
    ["--do_eval", "--init_model", "{path}"],
    ["--do_eval", "--pretrained_clip_name", "{path}"],
])
def test_driver_rejects_hostile_file(driver, corpus, tmp_path, hostile_file, flags):
    path, marker = hostile_file
    argv = _data_args(corpus, tmp_path / "run") + [flag.format(path=path) for flag in flags]
    with pytest.raises(ValueError, match=r"rejected .*hostile\.pt.*could run code"):
        driver.main(argv)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*deprecated:FutureWarning")
def test_jit_load_never_unpickles_python(hostile_file):
    path, marker = hostile_file
    # A torch.save archive has no TorchScript constants, so torch.jit.load stops at once.
    with pytest.raises(RuntimeError):
        torch.jit.load(str(path))
    assert not marker.exists()


def test_fake_torchscript_archive_rejected(hostile_file, tmp_path):
    path, marker = hostile_file
    # The same hostile pickle dressed up as a TorchScript archive goes to torch.jit.load, whose
    # unpickler accepts only TorchScript types.
    fake = tmp_path / "fake_script.pt"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(fake, "w") as target:
        prefix = source.namelist()[0].split("/")[0]
        for name in source.namelist():
            target.writestr(name, source.read(name))
        target.writestr(f"{prefix}/code/__torch__.py", "")
        target.writestr(f"{prefix}/constants.pkl", source.read(f"{prefix}/data.pkl"))
    with pytest.raises(ValueError, match="as a TorchScript archive"):
        read_checkpoint(fake)
    assert not marker.exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--dist_timeout", "0", "--dist_timeout must be positive"),
    ("--wait_timeout", "-1", "--wait_timeout must be positive"),
    ("--save_every_steps", "-1", "--save_every_steps must not be negative"),
])
def test_fault_flags_validated(driver, corpus, tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit):
        driver.parse_args(_data_args(corpus, tmp_path) + ["--do_train", flag, value])
    assert message in capsys.readouterr().err


def _start_ranks(corpus: Path, output_dir: Path) -> list[subprocess.Popen]:
    """Start the two ranks of a gloo job as plain processes that rendezvous on 127.0.0.1."""
    port = _free_port()
    argv = [sys.executable, str(DRIVER), *_data_args(corpus, output_dir), "--do_train", "--batch_size", "4",
            "--epochs", "50", "--dist_timeout", str(DIST_TIMEOUT_S)]
    processes = []
    for rank in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        processes.append(subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                                          stderr=open(output_dir.parent / f"rank{rank}.err", "w")))
    return processes


def _wait_for_training(log: Path, processes: list[subprocess.Popen], deadline_s: float = 120.0) -> None:
    start = time.time()
    while not (log.is_file() and "epoch 0 [2/" in log.read_text()):
        assert all(p.poll() is None for p in processes), "a rank exited before training started"
        assert time.time() - start < deadline_s, "training did not start"
        time.sleep(0.05)


@pytest.mark.parametrize("signal_name, bound_s", [
    ("SIGKILL", DIST_TIMEOUT_S),  # the closed connection is reported at once
    ("SIGSTOP", DIST_TIMEOUT_S + 15),  # a hanging rank is detected by the process-group timeout
])
def test_survivor_exits_when_rank_fails(corpus, tmp_path, signal_name, bound_s):
    output_dir = tmp_path / "run"
    survivor, victim = _start_ranks(corpus, output_dir)
    try:
        _wait_for_training(output_dir / "log.txt", [survivor, victim])
        os.kill(victim.pid, getattr(signal, signal_name))
        start = time.time()
        return_code = survivor.wait(timeout=bound_s + 60)
        elapsed = time.time() - start
    finally:
        for process in (survivor, victim):
            if process.poll() is None:
                process.kill()
                process.wait()

    assert return_code != 0
    assert elapsed < bound_s, f"the surviving rank needed {elapsed:.1f} s to exit"
    errors = (tmp_path / "rank0.err").read_text()
    # Gloo words a peer's failure in several ways, depending on where the survivor is waiting.
    assert any(word in errors.lower() for word in ("connection", "timed out", "timeout")), errors[-2000:]

