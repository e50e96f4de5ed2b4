"""Draw the UPRet pipeline, from raw sign video and sentence to the retrieval score, into img/pipeline.png.

Usage: python scripts/draw_pipeline.py [--out img/pipeline.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

VIDEO_COLOUR = "#dbe9f6"
TEXT_COLOUR = "#fde6cf"
HEAD_COLOUR = "#e8def3"
JOINT_COLOUR = "#dcefd9"
EDGE_COLOUR = "#4a4a4a"

BOX_WIDTH, BOX_HEIGHT = 2.3, 1.05


def draw_box(ax, x: float, y: float, title: str, detail: str, colour: str, width: float = BOX_WIDTH,
             height: float = BOX_HEIGHT) -> tuple[float, float, float, float]:
    """Draw a rounded box centred at (x, y) with a bold title and a smaller detail line; return its extent."""
    ax.add_patch(FancyBboxPatch((x - width / 2, y - height / 2), width, height,
                                boxstyle="round,pad=0.02,rounding_size=0.12", facecolor=colour,
                                edgecolor=EDGE_COLOUR, linewidth=1.1))
    ax.text(x, y + 0.2, title, ha="center", va="center", fontsize=10.5, fontweight="bold")
    ax.text(x, y - 0.2, detail, ha="center", va="center", fontsize=8.5, color="#333333", linespacing=1.25)
    return x - width / 2, x + width / 2, y - height / 2, y + height / 2


def arrow(ax, start: tuple[float, float], end: tuple[float, float], label: str = "", style: str = "-|>",
          curve: float = 0.0, label_offset: tuple[float, float] = (0.0, 0.14)) -> None:
    """Draw an arrow from ``start`` to ``end``, with an optional small label at its middle."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=13, linewidth=1.2,
                                 color=EDGE_COLOUR, connectionstyle=f"arc3,rad={curve}", shrinkA=2, shrinkB=2))
    if label:
        middle = ((start[0] + end[0]) / 2 + label_offset[0], (start[1] + end[1]) / 2 + label_offset[1])
        ax.text(*middle, label, ha="center", va="bottom", fontsize=8, color="#555555", style="italic")


def draw(out: Path) -> None:
    """Draw the figure: the video branch on top, the text branch below, the joint scores between them."""
    fig, ax = plt.subplots(figsize=(14, 6.0))
    ax.set_xlim(0, 14)
    ax.set_ylim(0, 6.0)
    ax.axis("off")

    video_y, joint_y, text_y = 5.25, 3.25, 1.25
    columns = (1.35, 4.0, 6.65, 9.3, 12.35)

    def centre_left(box):
        return box[0], (box[2] + box[3]) / 2

    def centre_right(box):
        return box[1], (box[2] + box[3]) / 2

    # Video branch: raw frames to token features; its Gaussian head sits above the transport box.
    v0 = draw_box(ax, columns[0], video_y, "sign video", "frames [T, H, W, 3]\nresize 256, crop 224", VIDEO_COLOUR)
    v1 = draw_box(ax, columns[1], video_y, "I3D (BSL-1K)", "16-frame windows, stride 1\n-> [T - 15, 1024]",
                  VIDEO_COLOUR)
    v2 = draw_box(ax, columns[2], video_y, "feature transformer", "CLIP ViT-B/32 blocks\n-> tokens [1 + 64, 512]",
                  VIDEO_COLOUR)
    v3 = draw_box(ax, columns[4], video_y, "video Gaussian head", r"$\mu$, $\log\sigma$ per token" "\n-> K samples",
                  HEAD_COLOUR)

    # Text branch, mirrored below.
    t0 = draw_box(ax, columns[0], text_y, "sentence", '"the next area we\'re going\nto talk about is rhythm"',
                  TEXT_COLOUR)
    t1 = draw_box(ax, columns[1], text_y, "CLIP BPE tokens", "SOT ... EOT, zero-padded\n-> ids [32]", TEXT_COLOUR)
    t2 = draw_box(ax, columns[2], text_y, "text encoder", "CLIP text transformer\n-> tokens [32, 512]", TEXT_COLOUR)
    t3 = draw_box(ax, columns[4], text_y, "text Gaussian head", r"$\mu$, $\log\sigma$ per token" "\n-> K samples",
                  HEAD_COLOUR)

    # Joint scores: token-wise similarity of the deterministic tokens, transport between the samples.
    s = draw_box(ax, columns[3], joint_y, "token-wise similarity", "clip-to-words, words-to-clips\n"
                 "learned token weights", JOINT_COLOUR, width=2.5)
    o = draw_box(ax, columns[4], joint_y, "optimal transport", "Sinkhorn plan between\nvideo and text samples",
                 JOINT_COLOUR, width=2.5)
    ax.text((s[1] + o[0]) / 2, joint_y, "+", ha="center", va="center", fontsize=18, fontweight="bold",
            color=EDGE_COLOUR)

    for left, right in ((v0, v1), (v1, v2), (t0, t1), (t1, t2)):
        arrow(ax, centre_right(left), centre_left(right))
    arrow(ax, centre_right(v2), centre_left(v3), "tokens")
    arrow(ax, centre_right(t2), centre_left(t3), "tokens")
    arrow(ax, (v2[1] - 0.3, v2[2]), (s[0] + 0.3, s[3]), "tokens", label_offset=(-0.45, -0.05))
    arrow(ax, (t2[1] - 0.3, t2[3]), (s[0] + 0.3, s[2]), "tokens", label_offset=(-0.45, -0.2))
    arrow(ax, ((v3[0] + v3[1]) / 2, v3[2]), ((o[0] + o[1]) / 2, o[3]), "K samples", label_offset=(0.5, -0.08))
    arrow(ax, ((t3[0] + t3[1]) / 2, t3[3]), ((o[0] + o[1]) / 2, o[2]), "K samples", label_offset=(0.5, -0.08))

    ax.text(columns[1], joint_y, "features are extracted once:\nscripts/extract_features.py", ha="center",
            va="center", fontsize=8.5, color="#555555", style="italic")
    ax.text(7.0, 0.22, "training: logits = similarity + OT -> symmetric InfoNCE      "
            r"retrieval: rank by similarity, uncertainty = mean $\exp(\log\sigma)$", ha="center", va="center",
            fontsize=9.5, fontweight="bold", color="#2d5a27")

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "img" / "pipeline.png", help="PNG file to write")
    args = parser.parse_args(argv)
    draw(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
