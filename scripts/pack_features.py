"""Pack per-video feature pickles into one memory-mapped array per split, with no pickle left to load.

    python scripts/pack_features.py --src data/sign_feature/ph_domain_agnostic \\
        --dst data/sign_feature_packed/ph_domain_agnostic --splits train dev test

For each split, ``<src>/<split>/*.pkl`` becomes ``<dst>/<split>/features.npy`` (float32
[total_clips, C]) and ``<dst>/<split>/index.json`` (video name -> offset, number of clips). Pass the
packed root as ``--features_path`` or ``--features_path_retrain``: the reader detects the layout by
the index file. With ``--dst`` equal to ``--src`` the store is written next to the pickles and is
read in their place. Every pickle is read with the restricted unpickler and validated; an invalid
one stops the script unless ``--skip_invalid`` is given, which lists it in
``<dst>/<split>/invalid_items.tsv``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from dataloaders.annotations import InvalidItem  # noqa: E402
from dataloaders.features import pack_split  # noqa: E402
from dataloaders.validation import INVALID_LIST_NAME, write_invalid_list  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="feature root with one folder of <video_name>.pkl per split")
    parser.add_argument("--dst", required=True, help="root of the packed store (may equal --src)")
    parser.add_argument("--splits", nargs="+", default=["train", "dev", "test"],
                        help="split folders to pack; a split without a folder under --src is skipped with a message")
    parser.add_argument("--channels", type=int, default=1024,
                        help="expected width of one clip feature (0 accepts the width of the first file)")
    parser.add_argument("--skip_invalid", action="store_true",
                        help="leave out invalid files and list them in <dst>/<split>/invalid_items.tsv")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(message)s")
    src, dst = Path(args.src), Path(args.dst)
    packed = 0
    for split in args.splits:
        if not (src / split).is_dir():
            print(f"{split}: no folder {src / split}, skipped")
            continue
        try:
            report = pack_split(src, split, dst, channels=args.channels or None, skip_invalid=args.skip_invalid,
                                progress=not args.no_progress)
        except ValueError as error:
            # An invalid feature file is the user's data, and the message names it, so no traceback.
            hint = "" if args.skip_invalid else "; or pass --skip_invalid to leave invalid files out"
            print(f"error: {split}: {error}{hint}", file=sys.stderr)
            return 1
        packed += 1
        print(f"{split}: {report.num_videos} videos, {report.num_clips} clips of {report.channels} channels "
              f"-> {report.folder}")
        if report.invalid:
            rows = [(split, InvalidItem("", name, path, reason)) for name, path, reason in report.invalid]
            list_path = report.folder / INVALID_LIST_NAME
            write_invalid_list(list_path, rows)
            print(f"{split}: {len(report.invalid)} invalid files left out, listed in {list_path}")
    if packed == 0:
        print(f"no split folder of {args.splits} found under {src}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
