"""Compare training runs: plot R@1 per epoch and print a Markdown table of their final metrics.

Example:
    python scripts/plot_runs.py runs/ph_surrogate_upret runs/ph_surrogate_cico --out img/ph_surrogate_r1.png
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

logger = logging.getLogger("plot_runs")
COLUMNS = ("R1", "R5", "R10", "MedR", "MnR")


def load_results(run_dir: Path) -> dict[str, Any]:
    """Read ``results.json`` of a run folder written by ``CLCL/main_task_retrieval.py``."""
    path = run_dir / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"results.json not found in {run_dir}; pass the folder of a finished training "
                                "run (an evaluation-only run writes eval_<split>.json instead)")
    return json.loads(path.read_text(encoding="utf-8"))


def markdown_table(runs: dict[str, dict[str, Any]]) -> str:
    """Return one Markdown row per run and direction with the metrics of its final evaluation."""
    lines = [
        "| run | method | split | direction | R@1 | R@5 | R@10 | MedR | MnR |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, results in runs.items():
        for direction in ("t2v", "v2t"):
            metrics = results["eval"][direction]
            cells = " | ".join(f"{metrics[key]:.1f}" for key in COLUMNS)
            lines.append(f"| {name} | {results['method']} | {results['eval_split']} | {direction.upper()} | {cells} |")
    return "\n".join(lines)


def plot_r1(runs: dict[str, dict[str, Any]], out: Path, chance: Optional[float] = None) -> None:
    """Draw T2V and V2T R@1 on the selection split per epoch, one line per run."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for axis, direction in zip(axes, ("t2v", "v2t")):
        for name, results in runs.items():
            split = results["selection"]["split"]
            epochs = [row["epoch"] + 1 for row in results["history"]]
            axis.plot(epochs, [row[split][direction]["R1"] for row in results["history"]], marker="o", label=name)
        if chance is not None:
            axis.axhline(chance, color="grey", linestyle="--", label=f"chance ({chance:.2f}%)")
        axis.set_title(f"{direction.upper()} R@1 on {split}")
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("R@1 (%)")
    axes[0].legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders, each with a results.json")
    parser.add_argument("--names", nargs="+", default=None, help="legend names (default: the folder names)")
    parser.add_argument("--out", default=None, help="PNG file for the R@1-per-epoch plot")
    parser.add_argument("--chance", type=float, default=None, help="draw a chance level (percent)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    names = args.names or [Path(run).name for run in args.runs]
    if len(names) != len(args.runs):
        parser.error(f"--names has {len(names)} entries for {len(args.runs)} runs")
    runs = {name: load_results(Path(run)) for name, run in zip(names, args.runs)}
    table = markdown_table(runs)
    logger.info("%s", table)
    if args.out:
        plot_r1(runs, Path(args.out), chance=args.chance)
        logger.info("plot written to %s", args.out)
    return table


if __name__ == "__main__":
    try:
        main()
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")
