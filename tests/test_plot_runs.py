"""scripts/plot_runs.py: the Markdown table and the R@1 plot from run folders."""

import importlib
import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    scripts = str(REPO_ROOT / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    return importlib.import_module("plot_runs")


def _metrics(r1: float) -> dict:
    return {"R1": r1, "R5": r1 + 10, "R10": r1 + 20, "MedR": 2.0, "MnR": 7.25, "num_queries": 4}


def _write_run(folder: Path, method: str, r1_per_epoch: list) -> None:
    folder.mkdir()
    history = [{"epoch": e, "dev": {"t2v": _metrics(r), "v2t": _metrics(r / 2)}} for e, r in enumerate(r1_per_epoch)]
    results = {
        "method": method, "eval_split": "dev", "selection": {"split": "dev"}, "history": history,
        "eval": {"t2v": _metrics(r1_per_epoch[-1]), "v2t": _metrics(r1_per_epoch[-1] / 2)},
    }
    (folder / "results.json").write_text(json.dumps(results))


def test_table_and_plot_from_two_runs(tmp_path):
    script = _load_script()
    _write_run(tmp_path / "a", "upret", [10.0, 30.5])
    _write_run(tmp_path / "b", "cico", [5.0, 20.0])
    out = tmp_path / "r1.png"

    table = script.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--chance", "0.19"])

    rows = table.splitlines()
    assert len(rows) == 2 + 4
    assert "| a | upret | dev | T2V | 30.5 | 40.5 | 50.5 | 2.0 | 7.2 |" in rows
    assert "| b | cico | dev | V2T | 10.0 | 20.0 | 30.0 | 2.0 | 7.2 |" in rows
    assert out.stat().st_size > 1000


def test_missing_results_file_raises(tmp_path):
    script = _load_script()
    with pytest.raises(FileNotFoundError, match="results.json not found"):
        script.main([str(tmp_path)])
