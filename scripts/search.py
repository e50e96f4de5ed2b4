"""Search the videos of a feature folder with free text, or the sentences of an annotation file with a video.

The model, its sizes and the fusion settings come from a training run of CLCL/main_task_retrieval.py
(``checkpoint_best.pt`` and the configuration saved with it). Every video of the feature folder is
encoded once into an index that is cached next to the checkpoint and rebuilt when the checkpoint or
the feature files change. Scores are the evaluation score of the driver: d * I2T + (1 - d) * T2I of
the token-wise softmax similarity (modules/similarity.py inference_score).

Each result also carries the model's uncertainty: the mean predicted standard deviation exp(log_sigma)
of the distribution head over the item's valid tokens and all D dimensions. A higher value means
a less certain embedding. CiCo checkpoints have no distribution heads, so they report none.

Examples:
    python scripts/search.py --checkpoint runs/demo/checkpoint_best.pt --query "the tall man reads a book"
    python scripts/search.py --checkpoint runs/demo --video S000610_P0006_T00 --annotations data/demo/annotations/test.pkl
    python scripts/search.py --checkpoint runs/demo --json < queries.txt      # one query per line
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from dataloaders.annotations import SentenceRecord, VideoRecord, read_annotation_pickle  # noqa: E402
from dataloaders.features import PACKED_INDEX, FeatureReader  # noqa: E402
from dataloaders.retrieval import EvalTextDataset, EvalVideoDataset  # noqa: E402
from dataloaders.text import ClipTokenizer  # noqa: E402
from modules.checkpoint import BEST_NAME, CheckpointError, load_checkpoint, model_state_from, save_checkpoint  # noqa: E402
from modules.clip import CLIPConfig, config_from_state_dict  # noqa: E402
from modules.engine import autocast_context  # noqa: E402
from modules.model import RetrievalModel  # noqa: E402
from modules.similarity import inference_score  # noqa: E402

logger = logging.getLogger("search")

INDEX_VERSION = 1
UNAVAILABLE = "uncertainty unavailable: a CiCo checkpoint has no distribution heads"


@dataclass
class Searcher:
    """A trained model with its run configuration, ready to encode queries and galleries."""

    model: RetrievalModel
    config: dict[str, Any]
    checkpoint: Path
    device: torch.device
    precision: str

    @property
    def has_uncertainty(self) -> bool:
        return self.model.method == "upret"


# ---------------------------------------------------------------------------------------------------------------------
# model


def _is_none(value: Any) -> bool:
    return value is None or str(value).lower() in ("", "none", "null")


def resolve_checkpoint(path: Path) -> Path:
    """Accept a checkpoint file or a run folder (then its ``checkpoint_best.pt``)."""
    if path.is_dir():
        path = path / BEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}; pass runs/<name>/checkpoint_best.pt or the run folder")
    return path


def read_run_config(checkpoint: dict[str, Any], path: Path) -> dict[str, Any]:
    """Return the driver flags of the run: the checkpoint's own copy, else ``config.yaml`` beside it."""
    if "config_json" in checkpoint:
        return json.loads(checkpoint["config_json"])
    config_path = path.parent / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} stores no configuration and {config_path} does not exist; search needs the "
                                "run's flags (sizes, method, alpha, feature_len)")
    with config_path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def clip_config_for(config: dict[str, Any], state: dict[str, torch.Tensor]) -> CLIPConfig:
    """Rebuild the tower sizes of a run.

    A run started from a CLIP file took its sizes from that file, which may be absent here, so they
    are read back from the trained weights (heads = width / 64, as in OpenAI's ViT models). A run
    without a CLIP file used its size flags.
    """
    if _is_none(config.get("pretrained_clip_name")):
        names = [field for field in CLIPConfig.__dataclass_fields__ if field != "feature_len"]
        return CLIPConfig(feature_len=int(config["feature_len"]), **{name: int(config[name]) for name in names})
    clip_state = {key.removeprefix("clip."): value for key, value in state.items() if key.startswith("clip.")}
    return config_from_state_dict(clip_state, feature_len=int(config["feature_len"]))


def load_searcher(checkpoint_path: Path, device: torch.device) -> Searcher:
    """Build the run's model and load its trained weights (strictly, so a wrong configuration fails loudly)."""
    checkpoint_path = resolve_checkpoint(checkpoint_path)
    checkpoint = load_checkpoint(checkpoint_path)
    config = read_run_config(checkpoint, checkpoint_path)
    state = model_state_from(checkpoint)
    model = RetrievalModel(
        clip_config_for(config, state),
        method=config.get("method", "upret"),
        sample_num=int(config.get("sample_num", 2)),
        dist_heads=int(config.get("dist_heads", 8)),
        dist_dropout=float(config.get("dist_dropout", 0.1)),
    )
    model.load_state_dict(state)
    model.to(device).eval()
    precision = config.get("precision", "fp32")
    if device.type != "cuda" or precision not in ("fp32", "bf16"):
        precision = "fp32"
    logger.info("loaded %s (%s, epoch %s) on %s", checkpoint_path, model.method, checkpoint.get("epoch", "?"), device)
    return Searcher(model, config, checkpoint_path, device, precision)


# ---------------------------------------------------------------------------------------------------------------------
# encoding


def mean_sigma(log_sigma: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Return the mean of exp(log_sigma) over the valid tokens and all dimensions.

    Args:
        log_sigma: [B, T, D] log standard deviations of the distribution head.
        mask: [B, T], 1 at valid tokens.

    Returns:
        [B] mean standard deviations; NaN for an item without valid tokens.
    """
    mask = mask.to(log_sigma.dtype)
    total = (log_sigma.exp() * mask[:, :, None]).sum(dim=(1, 2))
    return total / (mask.sum(dim=1) * log_sigma.shape[-1])


def _keep(out: dict[str, torch.Tensor], with_sigma: bool) -> dict[str, torch.Tensor]:
    selected = {key: out[key].float().cpu() for key in ("tokens", "mask", "weights")}
    if with_sigma:
        selected["sigma"] = mean_sigma(out["log_sigma"].float(), out["mask"]).cpu()
    return selected


def _concat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


@torch.no_grad()
def encode_videos(searcher: Searcher, loader: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Encode video batches into ``tokens`` [N, 1 + L, D], ``mask``, ``weights`` and, for UPRet, ``sigma`` [N]."""
    parts = []
    for batch in loader:
        with autocast_context(searcher.device, searcher.precision):
            out = searcher.model.encode_video(batch["video"].to(searcher.device),
                                              batch["video_mask"].to(searcher.device),
                                              with_distribution=searcher.has_uncertainty)
        parts.append(_keep(out, searcher.has_uncertainty))
    return _concat(parts)


@torch.no_grad()
def encode_texts(searcher: Searcher, loader: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Encode token-id batches into ``tokens`` [N, Lt, D], ``mask``, ``weights`` and, for UPRet, ``sigma`` [N]."""
    parts = []
    for batch in loader:
        with autocast_context(searcher.device, searcher.precision):
            out = searcher.model.encode_text(batch["text_ids"].to(searcher.device),
                                             with_distribution=searcher.has_uncertainty)
        parts.append(_keep(out, searcher.has_uncertainty))
    return _concat(parts)


def tokenizer_for(searcher: Searcher) -> ClipTokenizer:
    return ClipTokenizer(max_words=int(searcher.config.get("max_words", 32)))


# ---------------------------------------------------------------------------------------------------------------------
# the cached indexes


def list_feature_videos(reader: FeatureReader) -> list[str]:
    """List the video names of a feature folder (per-video pickles or a packed store), sorted."""
    if reader.packed is not None:
        return sorted(reader.packed.videos)
    folder = reader.root / reader.subset
    if not folder.is_dir():
        hint = ""
        if (reader.root / PACKED_INDEX).is_file() or any(reader.root.glob("*.pkl")):
            hint = (f". {reader.root} itself has feature files, so it looks like a split folder: pass "
                    f"--features_root {reader.root.parent} --split {reader.root.name}")
        raise FileNotFoundError(f"feature folder not found: {folder}; pass --features_root and --split so that "
                                f"<features_root>/<split>/<video_name>.pkl exists{hint}")
    names = sorted(path.stem for path in folder.glob("*.pkl"))
    if not names:
        raise FileNotFoundError(f"no feature files (*.pkl or {PACKED_INDEX}) in {folder}")
    return names


def _file_stamp(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def feature_fingerprint(readers: Sequence[FeatureReader], names: Sequence[str]) -> list[str]:
    """Describe every feature file by path, size and modification time, so any change alters the index key."""
    stamps = []
    for reader in readers:
        if reader.packed is not None:
            stamps.append(_file_stamp(reader.packed.index_path))
            stamps.append(_file_stamp(reader.packed.features_path))
        else:
            stamps.extend(_file_stamp(reader.path(name)) for name in names)
    return stamps


def index_key(parts: Sequence[Any]) -> str:
    return hashlib.sha256(json.dumps(list(parts), default=str).encode("utf-8")).hexdigest()


def cached(path: Path, key: str, build, rebuild: bool) -> dict[str, Any]:
    """Load the index stored at ``path`` if its key matches, else build it and store it atomically."""
    if path.is_file() and not rebuild:
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a damaged cache is rebuilt rather than trusted
            logger.warning("cannot read the index %s (%s); rebuilding it", path, error)
        else:
            if stored.get("key") == key and stored.get("version") == INDEX_VERSION:
                logger.info("using the index %s", path)
                return stored
            logger.info("the checkpoint or the files changed since %s was built; rebuilding it", path)
    index = build()
    index.update(key=key, version=INDEX_VERSION)
    save_checkpoint(index, path)
    logger.info("wrote the index %s", path)
    return index


def video_index(searcher: Searcher, args: argparse.Namespace) -> dict[str, Any]:
    """Encode (or load from the cache) every video of ``<features_root>/<split>``."""
    config = searcher.config
    agnostic_root = args.features_root or config.get("features_path")
    if _is_none(agnostic_root):
        raise ValueError("no feature folder: pass --features_root (the run's configuration names none)")
    aware_root = args.features_root_aware or (None if args.features_root else config.get("features_path_retrain"))
    agnostic = FeatureReader(_resolve(agnostic_root), args.split)
    # Without a second stream the fusion (1 - alpha) * F + alpha * F returns the single stream.
    aware = FeatureReader(_resolve(aware_root), args.split) if not _is_none(aware_root) else agnostic
    names = list_feature_videos(agnostic)
    alpha, feature_len = float(config["alpha"]), int(config["feature_len"])

    key = index_key([_file_stamp(searcher.checkpoint), alpha, feature_len, args.split, repr(agnostic), repr(aware),
                     feature_fingerprint([agnostic, aware] if aware is not agnostic else [agnostic], names)])
    path = args.index or searcher.checkpoint.parent / f"search_index_{args.split}.pt"

    # NOTE: the index keeps every token in float32 so that scores equal the evaluation's, which
    # costs (1 + feature_len) * embed_dim * 4 bytes per video: 133 kB with ViT-B/32 sizes.
    def build() -> dict[str, Any]:
        records = [SentenceRecord(sentence_id=name, text="", videos=[VideoRecord(name, None)]) for name in names]
        dataset = EvalVideoDataset(records, agnostic, aware, alpha=alpha, feature_len=feature_len)
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
        logger.info("encoding %d videos of %s", len(names), agnostic.root / args.split)
        return {"names": names, **encode_videos(searcher, loader)}

    return cached(path, key, build, args.rebuild_index)


def sentence_index(searcher: Searcher, args: argparse.Namespace) -> dict[str, Any]:
    """Encode (or load from the cache) every sentence of the ``--annotations`` file."""
    if args.annotations is None:
        raise ValueError("a video query ranks sentences: pass --annotations PATH (an annotation pickle)")
    records = read_annotation_pickle(args.annotations)
    key = index_key([_file_stamp(searcher.checkpoint), _file_stamp(args.annotations), searcher.config.get("max_words")])
    path = searcher.checkpoint.parent / f"search_sentences_{args.annotations.stem}.pt"

    def build() -> dict[str, Any]:
        loader = DataLoader(EvalTextDataset(records, tokenizer_for(searcher)), batch_size=args.batch_size)
        logger.info("encoding %d sentences of %s", len(records), args.annotations)
        return {
            "ids": [record.sentence_id for record in records],
            "texts": [record.text for record in records],
            **encode_texts(searcher, loader),
        }

    return cached(path, key, build, args.rebuild_index)


def _resolve(value: str) -> Path:
    """Resolve a relative path from the run configuration in the working directory, else in the repository root."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


# ---------------------------------------------------------------------------------------------------------------------
# queries


def _items(index: dict[str, Any], rows: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    items = {key: index[key] for key in ("tokens", "mask", "weights")}
    if rows is not None:
        items = {key: value[rows] for key, value in items.items()}
    return items


def _score(searcher: Searcher, video: dict[str, torch.Tensor], text: dict[str, torch.Tensor]) -> torch.Tensor:
    config = searcher.config
    device = searcher.device
    return inference_score(
        {key: value.to(device) for key, value in video.items()},
        {key: value.to(device) for key, value in text.items()},
        dual_mix=float(config.get("dual_mix", 0.5)),
        tau=float(config.get("tau", 0.07)),
        block_size=int(config.get("eval_block_size", 256)),
        masked_softmax=bool(config.get("masked_softmax", False)),
    ).cpu()


def _sigma(index: dict[str, Any], row: int) -> Optional[float]:
    return float(index["sigma"][row]) if "sigma" in index else None


def search_text(searcher: Searcher, videos: dict[str, Any], query: str, top_k: int) -> dict[str, Any]:
    """Rank the indexed videos for one sentence; return the query's uncertainty and the top-k videos."""
    ids = torch.from_numpy(tokenizer_for(searcher).encode(query))[None]
    text = encode_texts(searcher, [{"text_ids": ids}])
    scores = _score(searcher, _items(videos), _items(text))[:, 0]  # [num_videos]
    top = torch.topk(scores, k=min(top_k, scores.numel()))
    results = [
        {"rank": rank, "video": videos["names"][row], "score": float(score), "uncertainty": _sigma(videos, row)}
        for rank, (score, row) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1)
    ]
    return {"query": query, "type": "text", "uncertainty": _sigma(text, 0), "results": results}


def search_video(searcher: Searcher, videos: dict[str, Any], sentences: dict[str, Any], name: str,
                 top_k: int) -> dict[str, Any]:
    """Rank the sentences of the annotation file for one indexed video; return the top-k sentences."""
    if name not in videos["names"]:
        raise KeyError(f"video {name!r} is not in the index of {len(videos['names'])} videos; check --features_root "
                       "and --split")
    row = videos["names"].index(name)
    scores = _score(searcher, _items(videos, slice(row, row + 1)), _items(sentences))[0]  # [num_sentences]
    top = torch.topk(scores, k=min(top_k, scores.numel()))
    results = [
        {"rank": rank, "sentence_id": sentences["ids"][column], "text": sentences["texts"][column],
         "score": float(score), "uncertainty": _sigma(sentences, column)}
        for rank, (score, column) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1)
    ]
    return {"query": name, "type": "video", "uncertainty": _sigma(videos, row), "results": results}


def format_result(answer: dict[str, Any]) -> str:
    """Format the results of one query as a human-readable table."""
    def sigma(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.4f}"

    kind = "sentence" if answer["type"] == "text" else "video"
    lines = [f"{kind} query: {answer['query']}   (uncertainty {sigma(answer['uncertainty'])})"]
    for result in answer["results"]:
        item = result.get("video") or f"{result['sentence_id']}  {result['text']}"
        lines.append(f"  {result['rank']:>3}  {result['score']:8.4f}  sigma {sigma(result['uncertainty'])}  {item}")
    if answer["uncertainty"] is None:
        lines.append(f"  ({UNAVAILABLE})")
    return "\n".join(lines)


def iter_queries(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """Yield (kind, text) pairs from the flags, or else from stdin until EOF or an empty line.

    On stdin a line ``video:NAME`` is a video query and any other line is a sentence.
    """
    if args.query or args.video:
        yield from (("text", query) for query in args.query)
        yield from (("video", name) for name in args.video)
        return
    if sys.stdin.isatty():
        print("Type a sentence (or video:NAME) and press Enter; an empty line ends.", file=sys.stderr)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            return
        if line.startswith("video:"):
            yield "video", line.removeprefix("video:").strip()
        else:
            yield "text", line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="checkpoint of a training run (runs/<name>/checkpoint_best.pt) or the run folder")
    parser.add_argument("--features_root", type=str, default=None,
                        help="root of the domain-agnostic features (default: the run's --features_path)")
    parser.add_argument("--features_root_aware", type=str, default=None,
                        help="root of the domain-aware features, fused with weight 1 - alpha (default: the run's "
                             "--features_path_retrain unless --features_root is given; without one the single "
                             "stream is used as is)")
    parser.add_argument("--split", default="test", help="subset folder of the videos to search")
    parser.add_argument("--annotations", type=Path, default=None,
                        help="annotation pickle whose sentences a video query ranks")
    parser.add_argument("--query", action="append", default=[], help="a sentence to search for (repeatable)")
    parser.add_argument("--video", action="append", default=[],
                        help="the name of an indexed video whose best sentences to list (repeatable)")
    parser.add_argument("--top_k", type=int, default=5, help="results per query")
    parser.add_argument("--json", action="store_true", help="print one JSON object per query")
    parser.add_argument("--index", type=Path, default=None,
                        help="cache file of the video index (default: search_index_<split>.pt beside the checkpoint)")
    parser.add_argument("--rebuild_index", action="store_true", help="encode the gallery again even if cached")
    parser.add_argument("--batch_size", type=int, default=64, help="videos or sentences per encoding batch")
    parser.add_argument("--num_workers", type=int, default=0, help="data-loader workers while encoding videos")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto picks CUDA when available")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    if args.top_k < 1:
        raise SystemExit(f"--top_k must be positive, got {args.top_k}")
    if args.video and args.annotations is None:
        raise SystemExit("error: --video ranks the sentences of an annotation file: pass --annotations PATH "
                         "(an annotation pickle)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S", stream=sys.stderr)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    searcher = load_searcher(args.checkpoint, device)
    if not searcher.has_uncertainty:
        logger.warning(UNAVAILABLE)
    videos = video_index(searcher, args)
    sentences = None

    answers = []
    for kind, text in iter_queries(args):
        if kind == "text":
            answer = search_text(searcher, videos, text, args.top_k)
        else:
            if args.annotations is None:
                logger.error("skipped 'video:%s': a video query needs --annotations PATH (an annotation pickle)", text)
                continue
            sentences = sentences if sentences is not None else sentence_index(searcher, args)
            try:
                answer = search_video(searcher, videos, sentences, text, args.top_k)
            except KeyError as error:
                if args.query or args.video:
                    raise SystemExit(error.args[0]) from None
                logger.error("%s", error.args[0])
                continue
        if not searcher.has_uncertainty:
            answer["note"] = UNAVAILABLE
        answers.append(answer)
        print(json.dumps(answer) if args.json else format_result(answer), flush=True)
    return answers


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, CheckpointError) as error:
        # The message names the file and the fix, so the command ends with it instead of a traceback.
        sys.exit(f"error: {error}")
