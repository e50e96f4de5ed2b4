"""Smoke test of scripts/benchmark.py: the quick mode runs every section and its equality checks pass."""
import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_quick_runs(tmp_path):
    out = tmp_path / "bench.json"
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "benchmark.py"), "--quick", "--device", "cpu",
         "--json", str(out)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "benchmark:" in completed.stdout
    result = json.loads(out.read_text())
    assert result["checks"]
    assert all(check["passed"] for check in result["checks"]), result["checks"]
    assert set(result["numbers"]) == {"a", "b", "c", "d", "e"}
    assert result["numbers"]["a"]["project"]["time_s"] > 0


def test_benchmark_rejects_unknown_section():
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "benchmark.py"), "--sections", "a,z"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
    )
    assert completed.returncode == 2
    assert "unknown sections" in completed.stderr
