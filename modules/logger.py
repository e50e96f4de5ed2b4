"""Logging set-up: rank 0 logs to stdout and to a file in the run folder, other ranks warn only."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

FORMAT = "%(asctime)s | %(levelname)s | %(message)s"


def setup_logging(log_file: Optional[Path] = None, rank: int = 0, level: int = logging.INFO) -> None:
    """Configure the root logger once per process.

    Rank 0 logs ``level`` and above to stdout and, if given, to ``log_file`` (appended, so a resumed
    run keeps its history). Other ranks log warnings and errors to stderr with their rank.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()

    if rank == 0:
        formatter = logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S")
        stream = logging.StreamHandler(sys.stdout)
        stream.setFormatter(formatter)
        root.addHandler(stream)
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            file_handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
            file_handler.setFormatter(formatter)
            root.addHandler(file_handler)
        root.setLevel(level)
    else:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter(f"%(asctime)s | rank {rank} | %(levelname)s | %(message)s"))
        root.addHandler(stream)
        root.setLevel(logging.WARNING)
