"""End-to-end runs of CLCL/main_task_retrieval.py on a tiny demo corpus, in one and in two processes."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DRIVER = REPO_ROOT / "CLCL" / "main_task_retrieval.py"
TINY_MODEL = [
    "--embed_dim", "16", "--text_width", "16", "--text_layers", "1", "--text_heads", "2",
    "--video_width", "16", "--video_layers", "1", "--video_heads", "2", "--dist_heads", "2",
    "--feature_len", "8", "--num_workers", "0", "--batch_size_val", "16", "--log_every", "1",
]


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    generator = _load_module("make_surrogate_features", REPO_ROOT / "scripts" / "make_surrogate_features.py")
    generator.main([
        "demo", "--out", str(root), "--train_sentences", "32", "--dev_sentences", "12",
        "--test_sentences", "12", "--min_frames", "10", "--max_frames", "40",
    ])
    return root


@pytest.fixture(scope="module")
def driver():
    return _load_module("main_task_retrieval", DRIVER)


def _data_args(corpus: Path, output_dir: Path) -> list[str]:
    return [
        "--config", str(REPO_ROOT / "configs" / "demo.yaml"),
        "--data_path", str(corpus / "annotations"),
        "--features_path", str(corpus / "features" / "domain_agnostic"),
        "--features_path_retrain", str(corpus / "features" / "domain_aware"),
        "--output_dir", str(output_dir),
        *TINY_MODEL,
    ]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    return result


def _check_results(output_dir: Path, epochs: int) -> dict:
    results = json.loads((output_dir / "results.json").read_text())
    assert results["selection"]["split"] == "dev"
    assert len(results["history"]) == epochs
    for direction in ("t2v", "v2t"):
        metrics = results["eval"][direction]
        assert 0.0 <= metrics["R1"] <= metrics["R5"] <= metrics["R10"] <= 100.0
        assert metrics["MedR"] >= 1.0
        assert metrics["num_queries"] > 0
    for name in ("checkpoint_last.pt", "checkpoint_best.pt", "log.txt", "config.yaml", "curves.png"):
        assert (output_dir / name).is_file(), name
    return results


@pytest.mark.parametrize("method", ["upret", "cico"])
def test_single_process_trains_and_evaluates(driver, corpus, tmp_path, method):
    output_dir = tmp_path / method
    results = driver.main(_data_args(corpus, output_dir) + [
        "--do_train", "--do_eval", "--epochs", "2", "--batch_size", "8", "--method", method,
    ])
    _check_results(output_dir, epochs=2)
    assert results["method"] == method
    assert results["eval"]["t2v"]["num_queries"] == 12
    losses = [row["train"]["loss"] for row in results["history"]]
    assert all(loss == loss for loss in losses)
    if method == "upret":
        assert "loss/ot" in results["history"][0]["train"]
        assert "log_sigma/video" in results["history"][0]["train"]
    checkpoint = torch.load(output_dir / "checkpoint_last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert checkpoint["step"] == results["steps"] == 2 * (32 // 8)


def test_resume_latest_continues(driver, corpus, tmp_path):
    output_dir = tmp_path / "resume"
    args = _data_args(corpus, output_dir) + ["--do_train", "--batch_size", "8"]
    driver.main(args + ["--epochs", "2"])
    first = torch.load(output_dir / "checkpoint_last.pt", weights_only=True)
    assert first["epoch"] == 1

    results = driver.main(args + ["--epochs", "3", "--resume", "latest"])
    assert [row["epoch"] for row in results["history"]] == [0, 1, 2]
    resumed = torch.load(output_dir / "checkpoint_last.pt", weights_only=True)
    assert resumed["epoch"] == 2
    assert resumed["step"] == 3 * (32 // 8)


def test_eval_only_from_checkpoint(driver, corpus, tmp_path):
    train_dir = tmp_path / "train"
    driver.main(_data_args(corpus, train_dir) + ["--do_train", "--epochs", "1", "--batch_size", "8"])
    eval_dir = tmp_path / "eval"
    results = driver.main(_data_args(corpus, eval_dir) + [
        "--do_eval", "--init_model", str(train_dir / "checkpoint_best.pt"),
    ])
    assert results["eval_split"] == "test"
    assert "selection" not in results
    assert results["eval"]["v2t"]["num_queries"] > 0


def test_run_from_inside_clcl_folder(corpus, tmp_path):
    output_dir = tmp_path / "inside"
    _run([sys.executable, "main_task_retrieval.py", *_data_args(corpus, output_dir),
          "--do_train", "--do_eval", "--epochs", "1", "--batch_size", "8"], cwd=REPO_ROOT / "CLCL")
    _check_results(output_dir, epochs=1)


def test_torchrun_two_processes(corpus, tmp_path):
    output_dir = tmp_path / "torchrun"
    torchrun = Path(sys.executable).parent / "torchrun"
    result = _run([str(torchrun), "--nproc_per_node=2", f"--master_port={_free_port()}", str(DRIVER),
                   *_data_args(corpus, output_dir), "--do_train", "--do_eval", "--epochs", "1", "--batch_size", "8"],
                  cwd=REPO_ROOT)
    results = _check_results(output_dir, epochs=1)
    assert "global batch 8 (4 per process, world size 2)" in result.stdout + (output_dir / "log.txt").read_text()
    assert results["steps"] == 32 // 8


def test_legacy_launch_two_processes(corpus, tmp_path):
    output_dir = tmp_path / "launch"
    _run([sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2", f"--master_port={_free_port()}",
          str(DRIVER), *_data_args(corpus, output_dir), "--do_train", "--do_eval", "--epochs", "1",
          "--batch_size", "8"], cwd=REPO_ROOT)
    _check_results(output_dir, epochs=1)


def test_unknown_config_key_rejected(driver, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("datatype: demo\nlearning_rate: 0.1\n")
    with pytest.raises(SystemExit):
        driver.parse_args(["--config", str(config), "--do_train"])
    assert "unknown keys" in capsys.readouterr().err


def test_alpha_out_of_range_rejected(driver, corpus, tmp_path, capsys):
    with pytest.raises(SystemExit):
        driver.parse_args(_data_args(corpus, tmp_path) + ["--do_train", "--alpha", "1.5"])
    assert "--alpha must lie in [0, 1]" in capsys.readouterr().err


def test_batch_not_divisible_by_processes_rejected(driver, corpus, tmp_path, monkeypatch):
    from modules.distributed import DistInfo

    args = driver.parse_args(_data_args(corpus, tmp_path) + ["--do_train", "--batch_size", "7", "--epochs", "1"])
    data = driver.Data(args)
    model = driver.build_model(args)
    with pytest.raises(ValueError, match="not divisible"):
        driver.train(args, model, data, DistInfo(world_size=2), tmp_path)
