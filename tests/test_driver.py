"""End-to-end runs of CLCL/main_task_retrieval.py on a tiny demo corpus, in one and in two processes."""

import importlib
import json
import shutil
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DRIVER = REPO_ROOT / "CLCL" / "main_task_retrieval.py"
TINY_MODEL = [
    "--embed_dim", "16", "--text_width", "16", "--text_layers", "1", "--text_heads", "2",
    "--video_width", "16", "--video_layers", "1", "--video_heads", "2", "--dist_heads", "2",
    "--feature_len", "8", "--num_workers", "0", "--batch_size_val", "16", "--log_every", "1",
]


def _import_from(folder: Path, name: str):
    # A plain import, so that other test files importing the same script share one module object.
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    generator = _import_from(REPO_ROOT / "scripts", "make_surrogate_features")
    generator.main([
        "demo", "--out", str(root), "--train_sentences", "32", "--dev_sentences", "12",
        "--test_sentences", "12", "--min_frames", "10", "--max_frames", "40",
    ])
    return root


@pytest.fixture(scope="module")
def driver():
    return _import_from(REPO_ROOT / "CLCL", "main_task_retrieval")


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


def test_new_run_warns_on_old_checkpoint(driver, corpus, tmp_path):
    output_dir = tmp_path / "run"
    args = _data_args(corpus, output_dir) + ["--do_train", "--batch_size", "8", "--epochs", "1"]
    driver.main(args)
    assert "of an earlier run" not in (output_dir / "log.txt").read_text()
    driver.main(args)
    assert "already has checkpoint_last.pt of an earlier run" in (output_dir / "log.txt").read_text()


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
    assert (eval_dir / "eval_test.json").is_file()
    assert not (eval_dir / "results.json").exists()


def test_init_model_shape_mismatch_named(driver, corpus, tmp_path):
    from modules.checkpoint import CheckpointError, save_checkpoint

    # A checkpoint of a wider model: only its weights and saved configuration matter here.
    wide = _data_args(corpus, tmp_path / "wide") + ["--do_eval", "--embed_dim", "32", "--text_width", "32"]
    wide_args = driver.parse_args(wide)
    path = tmp_path / "wide.pt"
    save_checkpoint({"model": driver.build_model(wide_args).state_dict(),
                     "config_json": json.dumps(vars(wide_args), default=str)}, path)

    with pytest.raises(CheckpointError, match="does not fit the model") as error:
        driver.main(_data_args(corpus, tmp_path / "eval") + ["--do_eval", "--init_model", str(path)])
    assert "It was trained with --embed_dim 32 --text_width 32; pass the same flags." in str(error.value)


def test_eval_only_keeps_training_results(driver, corpus, tmp_path):
    run_dir = tmp_path / "run"
    driver.main(_data_args(corpus, run_dir) + ["--do_train", "--epochs", "1", "--batch_size", "8"])
    before = (run_dir / "results.json").read_text()
    driver.main(_data_args(corpus, run_dir) + ["--do_eval", "--init_model", str(run_dir / "checkpoint_best.pt")])
    assert (run_dir / "results.json").read_text() == before
    assert json.loads((run_dir / "eval_test.json").read_text())["eval_split"] == "test"


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


def test_config_syntax_error_rejected(driver, tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("epochs: [1\n")
    with pytest.raises(SystemExit):
        driver.parse_args(["--config", str(config), "--do_train"])
    assert f"{config} is not valid YAML" in capsys.readouterr().err


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


@pytest.mark.parametrize(
    "line, message",
    [
        ("select_on: validation", "invalid value 'validation' for select_on"),
        ("masked_softmax: 'no'", "masked_softmax must be true or false"),
        ("epochs: many", "invalid value 'many' for epochs"),
    ],
)
def test_invalid_config_values_rejected(driver, tmp_path, capsys, line, message):
    config = tmp_path / "bad.yaml"
    config.write_text(f"datatype: demo\n{line}\n")
    with pytest.raises(SystemExit):
        driver.parse_args(["--config", str(config), "--do_train"])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--eval_block_size", "0"), ("--ot_eps", "0"), ("--epochs", "0")])
def test_non_positive_flags_rejected(driver, corpus, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit):
        driver.parse_args(_data_args(corpus, tmp_path) + ["--do_train", flag, value])
    assert f"{flag} must be positive" in capsys.readouterr().err


def test_missing_feature_file_fails_before_training(driver, corpus, tmp_path):
    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    victim = sorted((copy / "features" / "domain_aware" / "train").glob("*.pkl"))[0]
    victim.unlink()
    output_dir = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="1 of .* feature files of the train split are missing") as error:
        driver.main(_data_args(copy, output_dir) + ["--do_train", "--epochs", "1", "--batch_size", "8"])
    assert victim.name in str(error.value)
    assert not (output_dir / "checkpoint_last.pt").exists()


def test_cli_missing_checkpoint_exits_cleanly(driver, corpus, tmp_path):
    output_dir = tmp_path / "run"
    missing = tmp_path / "absent.pt"
    status = driver.run_cli(_data_args(corpus, output_dir) + ["--do_eval", "--init_model", str(missing)])
    assert status == 1
    log = (output_dir / "log.txt").read_text()
    assert f"FileNotFoundError: checkpoint not found: {missing}" in log
    assert "Traceback" not in log


def test_cli_invalid_feature_exits_cleanly(driver, corpus, tmp_path):
    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    victim = sorted((copy / "features" / "domain_agnostic" / "train").glob("*.pkl"))[0]
    victim.write_bytes(victim.read_bytes()[:40])
    output_dir = tmp_path / "run"
    status = driver.run_cli(_data_args(copy, output_dir) + ["--do_train", "--epochs", "1", "--batch_size", "8"])
    assert status == 1
    log = (output_dir / "log.txt").read_text()
    assert "InvalidDataError: 1 of " in log
    assert f"{victim}: video '{victim.stem}'" in log
    assert "Traceback" not in log


class _Crash(Exception):
    pass


def test_resumed_run_matches_uninterrupted_run(driver, corpus, tmp_path, monkeypatch):
    straight = driver.main(_data_args(corpus, tmp_path / "straight") + ["--do_train", "--batch_size", "8", "--epochs", "2"])

    # Crash right after the first epoch's checkpoint, then resume.
    real_save = driver.save_checkpoint

    def save_then_crash(state, path, **kwargs):
        real_save(state, path, **kwargs)
        if path.name == "checkpoint_last.pt":
            raise _Crash()

    split_args = _data_args(corpus, tmp_path / "split") + ["--do_train", "--batch_size", "8", "--epochs", "2"]
    monkeypatch.setattr(driver, "save_checkpoint", save_then_crash)
    with pytest.raises(_Crash):
        driver.main(split_args)
    monkeypatch.setattr(driver, "save_checkpoint", real_save)
    resumed = driver.main(split_args + ["--resume", "latest"])

    expected = torch.load(tmp_path / "straight" / "checkpoint_last.pt", weights_only=True)["model"]
    actual = torch.load(tmp_path / "split" / "checkpoint_last.pt", weights_only=True)["model"]
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name
    for direction in ("t2v", "v2t"):
        assert resumed["history"][-1]["dev"][direction] == straight["history"][-1]["dev"][direction]


def test_how2sign_csv_splits_drop_unextracted_segments(driver, tmp_path):
    data_path = tmp_path / "data_h2"
    data_path.mkdir()
    header = "VIDEO_ID\tVIDEO_NAME\tSENTENCE_ID\tSENTENCE_NAME\tSTART_REALIGNED\tEND_REALIGNED\tSENTENCE\n"
    rows = [f"vid{i}\tvid{i}-1-rgb_front\tvid{i}_0\tvid{i}_0-1-rgb_front\t1.0\t3.0\tsentence number {i}\n"
            for i in range(10)]
    (data_path / "how2sign_realigned_train.csv").write_text(header + "".join(rows))
    extracted = [f"vid{i}-1-rgb_front_clip0" for i in range(10) if i not in (3, 7)]
    for stream in ("agnostic", "aware"):
        folder = tmp_path / stream / "train"
        folder.mkdir(parents=True)
        for name in extracted:
            with open(folder / f"{name}.pkl", "wb") as handle:
                pickle.dump({"feature": np.ones((4, 1024), dtype=np.float32)}, handle)

    args = driver.parse_args([
        "--do_train", "--datatype", "h2s", "--data_path", str(data_path), "--dev_size", "3",
        "--features_path", str(tmp_path / "agnostic"), "--features_path_retrain", str(tmp_path / "aware"),
        "--output_dir", str(tmp_path / "run"),
    ])
    data = driver.Data(args)
    train, dev = data.split("train"), data.split("dev")

    kept_names = {video.name for split in (train, dev) for record in split.records for video in record.videos}
    assert kept_names == set(extracted)
    assert len(dev.records) + len(train.records) == 8
    data.check_features("train", train=True)
    data.check_features("dev")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sample_num", "1"], "--sample_num must be >= 2 for UPRet"),
        (["--resume", "latest"], "--resume continues training and needs --do_train"),
        (["--warmup_proportion", "1"], "--warmup_proportion must lie in [0, 1)"),
        (["--dist_heads", "3"], "must be even and divisible by --dist_heads 3"),
        (["--released_ph_aware_path"], "use it with --datatype ph"),
    ],
)
def test_inconsistent_flags_rejected(driver, corpus, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        driver.parse_args(_data_args(corpus, tmp_path) + ["--do_eval"] + extra)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("value", ["true", "1.5"])
def test_config_number_types_checked(driver, tmp_path, capsys, value):
    config = tmp_path / "bad.yaml"
    config.write_text(f"datatype: demo\nseed: {value}\n")
    with pytest.raises(SystemExit):
        driver.parse_args(["--config", str(config), "--do_train"])
    assert "for seed" in capsys.readouterr().err


def test_empty_selection_split_fails_before_training(driver, corpus, tmp_path):
    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    with open(copy / "annotations" / "dev.pkl", "wb") as handle:
        pickle.dump({}, handle)
    with pytest.raises(ValueError, match="the dev split .* has no videos"):
        driver.main(_data_args(copy, tmp_path / "run") + ["--do_train", "--epochs", "1", "--batch_size", "8"])
