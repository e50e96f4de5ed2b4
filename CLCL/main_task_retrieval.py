"""Train and evaluate UPRet (or the CiCo baseline) for sign-language video retrieval.

Single process:     python CLCL/main_task_retrieval.py --config configs/demo.yaml --do_train --do_eval
Several processes:  torchrun --nproc_per_node=4 CLCL/main_task_retrieval.py --config configs/ph.yaml --do_train
Older launcher:     python -m torch.distributed.launch --nproc_per_node=2 CLCL/main_task_retrieval.py ...

Values of ``--config`` are defaults; flags on the command line override them. ``--batch_size`` is
the global batch over all processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    # Lets the driver run both from the repository root and from inside CLCL/.
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from dataloaders.annotations import InvalidItem, Split, find_invalid_records, load_split  # noqa: E402
from dataloaders.features import FeatureReader, diagnose_feature_root  # noqa: E402
from dataloaders import validation  # noqa: E402
from dataloaders.safe_pickle import UnsafePickleError  # noqa: E402
from dataloaders.retrieval import EvalTextDataset, EvalVideoDataset, TrainDataset, drop_videos_without_features  # noqa: E402
from dataloaders.text import ClipTokenizer  # noqa: E402
from modules import distributed as du  # noqa: E402
from modules.checkpoint import (  # noqa: E402
    BEST_NAME,
    CheckpointError,
    LAST_NAME,
    PREV_NAME,
    capture_rng_state,
    find_latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    load_training_checkpoint,
    model_state_from,
    restore_rng_state,
    save_checkpoint,
    unwrap_model,
)
from modules.clip import CLIPConfig, config_from_state_dict, load_openai_weights  # noqa: E402
from modules.compilation import CompiledWithFallback  # noqa: E402
from modules.criterion import ProcessGroupComm, RetrievalLoss  # noqa: E402
from modules.engine import evaluate, train_one_epoch  # noqa: E402
from modules.logger import setup_logging  # noqa: E402
from modules.metrics import format_metrics_table  # noqa: E402
from modules.model import RetrievalModel  # noqa: E402
from modules.optimization import build_optimizer, build_scheduler, freeze_text_embeddings  # noqa: E402
from modules.similarity import DEFAULT_CHUNK_ELEMENTS  # noqa: E402

logger = logging.getLogger("upret")

# Architecture flags and their help; a CLIP file given with --pretrained_clip_name overrides them.
CLIP_FLAGS = {
    "embed_dim": "width of the joint token space",
    "vocab_size": "rows of the text token embedding",
    "context_length": "rows of the text positional embedding (--max_words of them are used)",
    "text_width": "width of the text transformer",
    "text_layers": "layers of the text transformer",
    "text_heads": "attention heads of the text transformer",
    "video_input_dim": "width of one clip feature",
    "video_width": "width of the feature transformer",
    "video_layers": "layers of the feature transformer",
    "video_heads": "attention heads of the feature transformer",
}
CLIP_FLAGS = {key: f"{text} (read from the file when --pretrained_clip_name is given)"
              for key, text in CLIP_FLAGS.items()}
CLIP_KEYS = tuple(CLIP_FLAGS)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the module docstring's layout and show every default."""


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser; every default is the released code's value unless noted."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    bool_flag = argparse.BooleanOptionalAction

    run = parser.add_argument_group("run")
    run.add_argument("--config", type=str, default=None, help="YAML file whose keys set the defaults of these flags")
    run.add_argument("--do_train", action="store_true", help="train, selecting the best epoch on --select_on")
    run.add_argument("--do_eval", action="store_true", help="evaluate on --eval_split (after --do_train: the best checkpoint)")
    run.add_argument("--output_dir", type=str, default="runs/upret", help="run folder for logs, checkpoints and results")
    run.add_argument("--seed", type=int, default=42, help="seed of Python, NumPy and torch")
    run.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto picks CUDA when available")
    run.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                     help="autocast dtype of the encoders, with fp32 weights and an fp32 loss; fp16 adds a "
                          "loss scaler. auto is bf16 on CUDA GPUs that support it, fp16 on older CUDA GPUs "
                          "and fp32 on the CPU")
    run.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                     help="run the training forward pass through torch.compile, falling back to eager "
                          "execution with a warning when compilation fails")
    run.add_argument("--resume", type=str, default=None,
                     help="training checkpoint to continue from, or 'latest' for the newest loadable "
                          "checkpoint_last.pt or checkpoint_prev.pt in --output_dir")
    run.add_argument("--save_every_steps", type=int, default=0,
                     help="also write checkpoint_last.pt every N optimizer steps inside an epoch, so that a crash "
                          "loses at most N steps (0: only at the end of each epoch)")
    run.add_argument("--init_model", type=str, default=None, help="model weights to start from or to evaluate")
    run.add_argument("--num_workers", type=int, default=2, help="data-loader worker processes per rank")
    run.add_argument("--log_every", type=int, default=20, help="log the loss terms every N steps")
    run.add_argument("--dist_timeout", type=float, default=None,
                     help="process-group timeout in seconds: a collective that waits longer (a rank died or hangs) "
                          "ends the run with an error. Default: 300 with gloo (CPU), 1800 with NCCL")
    run.add_argument("--wait_timeout", type=float, default=7200.0,
                     help="timeout in seconds for the ranks that wait while rank 0 alone evaluates or writes a "
                          "checkpoint")
    run.add_argument("--local_rank", "--local-rank", type=int, default=None,
                     help="set by python -m torch.distributed.launch; torchrun uses LOCAL_RANK instead")

    data = parser.add_argument_group("data")
    data.add_argument("--datatype", choices=("h2s", "ph", "csl", "demo"), default="ph", help="dataset")
    data.add_argument("--data_path", type=str, default=None, help="folder of the annotation pickles")
    data.add_argument("--features_path", type=str, default=None, help="root of the domain-agnostic features")
    data.add_argument("--features_path_retrain", type=str, default=None, help="root of the domain-aware features")
    data.add_argument("--alpha", type=float, default=0.9, help="weight of the domain-agnostic stream in the fusion")
    data.add_argument("--feature_len", type=int, default=64, help="clip features kept per video")
    data.add_argument("--max_words", type=int, default=32, help="text tokens per sentence, SOT and EOT included")
    data.add_argument("--text_aug_p", type=float, default=0.5, help="probability of the random-swap augmentation")
    data.add_argument("--select_on", choices=("dev", "test"), default="dev",
                      help="split for checkpoint selection; 'test' reproduces the published protocol")
    data.add_argument("--dev_size", type=float, default=0.05,
                      help="size of the dev slice taken from the training sentences where no dev split exists "
                           "(a fraction if < 1, else a count)")
    data.add_argument("--dev_seed", type=int, default=0,
                      help="seed of the dev slice, kept apart from --seed so that every run selects on the same sentences")
    data.add_argument("--released_ph_aware_path", action=bool_flag, default=False,
                      help="PHOENIX: train on the agnostic stream for both streams, as the released loader did")
    data.add_argument("--skip_invalid", action=bool_flag, default=False,
                      help="leave out videos with missing or invalid feature files and sentences with invalid "
                           "annotations (listed in <output_dir>/invalid_items.tsv) instead of stopping")

    model = parser.add_argument_group("model")
    model.add_argument("--method", choices=("upret", "cico"), default="upret", help="UPRet or the CiCo baseline")
    model.add_argument("--pretrained_clip_name", type=str, default=None,
                       help="path of OpenAI's ViT-B-32.pt (TorchScript archive or state dict); none = random init")
    default_sizes = CLIPConfig()
    for key, help_text in CLIP_FLAGS.items():
        model.add_argument(f"--{key}", type=int, default=getattr(default_sizes, key), help=help_text)
    model.add_argument("--sample_num", type=int, default=2, help="K, Monte Carlo samples per item (the mean is one)")
    model.add_argument("--dist_heads", type=int, default=8, help="attention heads of the distribution heads")
    model.add_argument("--dist_dropout", type=float, default=0.1, help="dropout of the distribution heads")
    model.add_argument("--checkpoint_heads", action=bool_flag, default=False,
                       help="recompute the distribution heads' activations in backward instead of keeping them "
                            "(same results, less memory, about one more forward pass of the heads)")

    loss = parser.add_argument_group("loss")
    loss.add_argument("--dual_mix", type=float, default=0.5, help="weight d of the clip-to-words direction, 1 - d of words-to-clips")
    loss.add_argument("--tau", type=float, default=0.07, help="temperature of the token-wise softmax")
    loss.add_argument("--ot_weight", type=float, default=1.0, help="w_ot, weight of the OT score in the logits")
    loss.add_argument("--ot_eps", type=float, default=0.1, help="entropic regularisation epsilon of Sinkhorn")
    loss.add_argument("--sinkhorn_iters", type=int, default=100, help="maximum Sinkhorn iterations")
    loss.add_argument("--sinkhorn_tol", type=float, default=1e-2, help="Sinkhorn tolerance on the scaling change")
    loss.add_argument("--ot_aggregation", choices=("max", "inner"), default="max",
                      help="max: the released max-then-mean of P*S; inner: <P, S>")
    loss.add_argument("--ot_mode", choices=("logits", "loss"), default="logits",
                      help="add the OT score to the logits (released) or use it as a separate InfoNCE term")
    loss.add_argument("--masked_softmax", action=bool_flag, default=False,
                      help="restrict the token-wise softmaxes to valid positions (the released code does not)")
    loss.add_argument("--sharded_loss", action=bool_flag, default=True,
                      help="with several processes, score only this process's videos against all gathered texts "
                           "(B_local x B_global pairs); the loss and gradients equal the global-batch loss")
    loss.add_argument("--similarity_chunk", type=int, default=DEFAULT_CHUNK_ELEMENTS,
                      help="similarity entries per chunk of the token-wise similarity in training (memory bound; "
                           "the result does not depend on it)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--batch_size", type=int, default=512, help="global training batch over all processes")
    optim.add_argument("--batch_size_val", type=int, default=64, help="evaluation batch (rank 0 evaluates alone)")
    optim.add_argument("--epochs", type=int, default=200, help="training epochs")
    optim.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    optim.add_argument("--weight_decay", type=float, default=1e-3, help="decoupled weight decay")
    optim.add_argument("--warmup_proportion", type=float, default=0.1, help="linear warm-up share of all steps")
    optim.add_argument("--optimizer", choices=("bertadam", "adamw"), default="bertadam",
                       help="bertadam: the released Adam, without bias correction and with per-tensor gradient clipping")
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="global gradient-norm clip (0 disables)")
    optim.add_argument("--train_text_embeddings", action=bool_flag, default=False,
                       help="train the text token and positional embeddings (frozen in the released runs)")

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--t2v_gallery", choices=("groups", "videos"), default="groups",
                            help="T2V ranks sentence groups by their best video (published) or all videos")
    evaluation.add_argument("--eval_split", choices=("dev", "test"), default="test",
                            help="split that --do_eval reports (dev where the test features are not available)")
    evaluation.add_argument("--eval_block_size", type=int, default=256, help="videos and sentences per scoring block")
    return parser


def resolve_path(value: Optional[str]) -> Optional[Path]:
    """Resolve a relative path in the working directory if it exists there, else in the repository root.

    A relative path that exists in neither place (such as a new run folder) is placed under the
    repository root, so runs started from ``CLCL/`` and from the root share their folders.
    """
    if value is None or str(value).lower() in ("", "none", "null"):
        return None
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


def _config_value(parser: argparse.ArgumentParser, action: argparse.Action, value: Any, source: Path) -> Any:
    """Check one config value the way argparse checks the flag; return it converted."""
    flag = action.option_strings[0]
    if value is None:
        return None
    if action.nargs == 0:  # store_true and --flag/--no-flag switches
        if not isinstance(value, bool):
            parser.error(f"{source}: {action.dest} must be true or false, got {value!r}")
        return value
    if action.type in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float, str))):
        parser.error(f"{source}: invalid value {value!r} for {action.dest} ({flag} expects a number)")
    if action.type is int and isinstance(value, float) and not value.is_integer():
        parser.error(f"{source}: invalid value {value!r} for {action.dest} ({flag} expects a whole number)")
    if action.type is not None:
        try:
            value = action.type(value)
        except (TypeError, ValueError):
            parser.error(f"{source}: invalid value {value!r} for {action.dest} ({flag} expects {action.type.__name__})")
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        parser.error(f"{source}: invalid value {value!r} for {action.dest}; expected one of {choices}")
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse flags on top of the defaults from ``--config``; reject unknown config keys."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        config_path = resolve_path(known.config)
        if config_path is None or not config_path.is_file():
            parser.error(f"config file not found: {known.config}")
        with open(config_path, encoding="utf-8") as handle:
            try:
                values = yaml.safe_load(handle) or {}
            except yaml.YAMLError as error:
                parser.error(f"{config_path} is not valid YAML: {error}")
        if not isinstance(values, dict):
            parser.error(f"{config_path} must contain a mapping of flag names to values")
        actions = {action.dest: action for action in parser._actions if action.option_strings}
        unknown = sorted(set(values) - set(actions) - {"help"})
        if unknown:
            parser.error(f"unknown keys in {config_path}: {', '.join(unknown)}")
        parser.set_defaults(**{key: _config_value(parser, actions[key], value, config_path)
                               for key, value in values.items()})
    args = parser.parse_args(argv)
    validate_args(parser, args)
    return args


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject values that would only fail later, naming the flag."""
    if not (args.do_train or args.do_eval):
        parser.error("nothing to do: pass --do_train and/or --do_eval")
    for name in ("data_path", "features_path", "features_path_retrain"):
        if getattr(args, name) is None:
            parser.error(f"--{name} is required (set it in the config or on the command line)")

    # Ranges.
    for name in ("alpha", "dual_mix", "text_aug_p"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(f"--{name} must lie in [0, 1], got {getattr(args, name)}")
    if not 0.0 <= args.warmup_proportion < 1.0:
        parser.error(f"--warmup_proportion must lie in [0, 1), got {args.warmup_proportion}")
    if args.seed < 0 or args.dev_seed < 0:
        parser.error(f"--seed and --dev_seed must not be negative, got {args.seed} and {args.dev_seed}")
    positive = ("feature_len", "batch_size", "batch_size_val", "epochs", "eval_block_size", "similarity_chunk", "sample_num",
                "sinkhorn_iters", "lr", "ot_eps", "tau", "sinkhorn_tol", "dev_size", "wait_timeout")
    for name in positive:
        if not getattr(args, name) > 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.dist_timeout is not None and not args.dist_timeout > 0:
        parser.error(f"--dist_timeout must be positive, got {args.dist_timeout}")
    for name in ("weight_decay", "max_grad_norm", "num_workers", "log_every", "dist_dropout", "save_every_steps"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must not be negative, got {getattr(args, name)}")
    if args.max_words < 3:
        parser.error(f"--max_words must be >= 3 (SOT, one token, EOT), got {args.max_words}")

    # Combinations.
    if args.method == "upret" and args.sample_num < 2:
        parser.error(f"--sample_num must be >= 2 for UPRet, got {args.sample_num}: the first sample is the mean "
                     "itself, so with one sample the log-sigma heads get no gradient")
    if args.resume and not args.do_train:
        parser.error("--resume continues training and needs --do_train; to evaluate a checkpoint use --init_model")
    if args.released_ph_aware_path and args.datatype != "ph":
        parser.error("--released_ph_aware_path reproduces a PHOENIX-2014T loader quirk; use it with --datatype ph")
    if args.method == "upret" and (args.embed_dim % 2 or args.embed_dim % args.dist_heads):
        parser.error(f"--embed_dim {args.embed_dim} must be even and divisible by --dist_heads {args.dist_heads}")
    if args.pretrained_clip_name in (None, "none", "None", "") and args.max_words > args.context_length:
        parser.error(f"--max_words {args.max_words} exceeds --context_length {args.context_length}, the rows of "
                     "the text positional embedding")


def resolve_precision(precision: str, device: torch.device) -> str:
    """Resolve ``auto`` to the precision of a run on ``device``, and check the other values.

    ``auto`` is bf16 on CUDA GPUs with bf16 support, fp16 (with a loss scaler) on older CUDA GPUs
    and fp32 on the CPU.

    Raises:
        ValueError: for bf16 on a CUDA GPU without bf16 support.
    """
    on_cuda = device.type == "cuda"
    bf16_supported = not on_cuda or torch.cuda.is_bf16_supported()
    if precision == "auto":
        if not on_cuda:
            return "fp32"
        return "bf16" if bf16_supported else "fp16"
    if precision == "bf16" and not bf16_supported:
        raise ValueError(f"--precision bf16: the GPU {torch.cuda.get_device_name(device)} does not support bf16. "
                         "Use --precision fp16 or fp32")
    if precision == "fp16" and not on_cuda:
        logger.warning("--precision fp16 on the CPU runs fp16 autocast with a CPU loss scaler, which is slower than "
                       "fp32 there. Use it to test the loss-scaling path, and bf16 or fp32 to train")
    return precision


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed the generators from (seed, epoch, rank) at the start of an epoch.

    Each rank draws its own Monte Carlo noise and dropout, and a run resumed at an epoch boundary
    repeats the draws of an uninterrupted run.
    """
    seed_everything(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]))


def _warn_on_changed_schedule(args: argparse.Namespace, checkpoint: dict[str, Any]) -> None:
    saved = json.loads(checkpoint.get("config_json", "{}"))
    for key in ("epochs", "batch_size", "lr", "warmup_proportion", "method", "seed"):
        if key in saved and saved[key] != getattr(args, key):
            logger.warning("--%s is %s but the checkpoint was trained with %s; the learning-rate schedule or the "
                           "data order changes from here on", key, getattr(args, key), saved[key])


def loader_seed(seed: int, epoch: int, rank: int) -> int:
    """Return the seed of the training loader's generator (the workers' base seed) for one epoch and rank."""
    return int(np.random.SeedSequence([seed, epoch, rank, 1]).generate_state(1)[0])


def load_resume_checkpoint(args: argparse.Namespace, output_dir: Path,
                           dist_info: du.DistInfo) -> tuple[Path, dict[str, Any]]:
    """Load the checkpoint named by ``--resume``, where ``latest`` means the newest loadable one in ``output_dir``.

    With ``latest``, rank 0 picks the file and the other ranks load the same one.
    """
    if args.resume != "latest":
        path = resolve_path(args.resume)
        if not path.is_file():
            raise FileNotFoundError(
                f"nothing to resume: {path} does not exist. Drop --resume to start a new run, or pass "
                "--resume latest to continue from the newest checkpoint in --output_dir."
            )
        return path, load_training_checkpoint(path)

    chosen: tuple[Optional[str], str] = (None, "")
    checkpoint: dict[str, Any] = {}
    if dist_info.is_main:
        try:
            path, checkpoint = find_latest_checkpoint(output_dir)
            chosen = (str(path), "")
        except FileNotFoundError as error:
            chosen = (None, str(error))
    chosen = du.broadcast_object(chosen)
    if chosen[0] is None:
        raise FileNotFoundError(chosen[1])
    path = Path(chosen[0])
    return path, checkpoint if dist_info.is_main else load_training_checkpoint(path)


def resume_position(checkpoint: dict[str, Any]) -> tuple[int, int]:
    """Return (epoch, optimizer steps of that epoch already done) at which a checkpoint continues."""
    epoch = int(checkpoint["epoch"])
    # Checkpoints without "epoch_finished" were written only at the end of an epoch.
    if checkpoint.get("epoch_finished", True):
        return epoch + 1, 0
    return epoch, int(checkpoint["epoch_step"])


def _restore_scaler(scaler: torch.amp.GradScaler, checkpoint: dict[str, Any], path: Path) -> None:
    saved = checkpoint.get("scaler") or {}
    if saved and scaler.is_enabled():
        scaler.load_state_dict(saved)
    elif saved:
        logger.warning("%s contains a loss-scaler state, but this run does not use --precision fp16, so it is ignored",
                       path)


def _restore_rng_mid_epoch(args: argparse.Namespace, checkpoint: dict[str, Any], epoch: int, epoch_step: int,
                           dist_info: du.DistInfo) -> None:
    """Restore this rank's generators saved inside an epoch, so the draws continue as without the restart."""
    states = checkpoint.get("rng_states") or []
    if int(checkpoint.get("world_size", 1)) == dist_info.world_size and len(states) == dist_info.world_size:
        restore_rng_state(states[dist_info.rank])
        return
    logger.warning("the checkpoint was written by %s processes and this run has %d, so the random draws of the rest "
                   "of epoch %d are reseeded: the run will not repeat an uninterrupted one exactly",
                   checkpoint.get("world_size", "?"), dist_info.world_size, epoch)
    seed_everything(int(np.random.SeedSequence([args.seed, epoch, dist_info.rank, epoch_step]).generate_state(1)[0]))


def clip_config_from_args(args: argparse.Namespace) -> CLIPConfig:
    values = {key: getattr(args, key) for key in CLIP_KEYS}
    return CLIPConfig(feature_len=args.feature_len, **values)


def build_model(args: argparse.Namespace) -> RetrievalModel:
    """Build the model; load OpenAI CLIP weights when ``--pretrained_clip_name`` is a file."""
    clip_path = resolve_path(args.pretrained_clip_name)
    if clip_path is not None:
        if not clip_path.is_file():
            raise FileNotFoundError(
                f"CLIP weights not found: {args.pretrained_clip_name}. Put OpenAI's ViT-B-32.pt there, or pass "
                "--pretrained_clip_name none to start from random weights."
            )
        from modules.clip import read_checkpoint

        state = read_checkpoint(clip_path)
        if not any(key.startswith("transformer.") for key in state) or any(key.startswith("clip.") for key in state):
            raise ValueError(
                f"{clip_path} is not an OpenAI CLIP file (no transformer.* weights). Pass a checkpoint of this "
                "project with --init_model, and --pretrained_clip_name none or the path of ViT-B-32.pt"
            )
        config = config_from_state_dict(state, feature_len=args.feature_len)
    else:
        config = clip_config_from_args(args)
    model = RetrievalModel(
        config, method=args.method, sample_num=args.sample_num, dist_heads=args.dist_heads,
        dist_dropout=args.dist_dropout,
    )
    if args.method == "upret" and getattr(args, "checkpoint_heads", False):
        model.video_dist_head.checkpoint_activations = True
        model.text_dist_head.checkpoint_activations = True
    if clip_path is not None:
        report = load_openai_weights(model.clip, clip_path)
        logger.info("loaded CLIP weights from %s: %d tensors", clip_path, len(report.loaded))
    if not args.train_text_embeddings:
        freeze_text_embeddings(model)
        if clip_path is None:
            logger.warning("the text token and positional embeddings are random and frozen; pass "
                           "--train_text_embeddings when training without a CLIP file")
    return model


def load_init_model(model: RetrievalModel, args: argparse.Namespace) -> None:
    """Load ``--init_model`` into ``model``.

    Raises:
        CheckpointError: the weights do not fit the model built from the flags. The message lists
            the model flags whose values differ from the configuration saved in the checkpoint.
    """
    path = resolve_path(args.init_model)
    try:
        load_model_weights(model, path)
    except RuntimeError as error:
        if not str(error).startswith("Error(s) in loading state_dict"):
            raise
        saved = json.loads(load_checkpoint(path).get("config_json", "{}"))
        model_flags = (*CLIP_KEYS, "feature_len", "method", "dist_heads", "pretrained_clip_name")
        differing = [f"--{key} {saved[key]}" for key in model_flags
                     if key in saved and str(saved[key]) != str(getattr(args, key))]
        hint = (f"It was trained with {' '.join(differing)}; pass the same flags." if differing else
                "Build the model with the flags it was trained with (its run folder has config.yaml).")
        # torch lists every differing tensor, so only the start of its first detail line is kept.
        details = str(error).splitlines()[1:] or [""]
        first = details[0].strip()
        first = first if len(first) <= 150 else first[:150] + " ..."
        raise CheckpointError(f"{path} does not fit the model built from these flags ({first}). {hint}") from None


class Data:
    """The splits and feature readers of one run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.data_path = resolve_path(args.data_path)
        self.agnostic_root = resolve_path(args.features_path)
        self.aware_root = resolve_path(args.features_path_retrain)
        for flag, path in (("--data_path", self.data_path), ("--features_path", self.agnostic_root),
                           ("--features_path_retrain", self.aware_root)):
            if not path.is_dir():
                raise FileNotFoundError(f"{flag} folder not found: {path}. See 'Data layout' in README.md for where "
                                        "the annotation and feature files go.")
        self.tokenizer = ClipTokenizer(max_words=args.max_words)
        self._splits: dict[str, Split] = {}
        self._checked: set[tuple[str, bool]] = set()
        # An evaluation-only run keeps the list of the training run in the same folder, as main() does.
        prefix = "" if args.do_train else f"eval_{args.eval_split}_"
        self.invalid_list_path = (resolve_path(args.output_dir) or Path("runs/upret")) / (
            prefix + validation.INVALID_LIST_NAME)
        self.invalid_rows: list[tuple[str, InvalidItem]] = []

    def split(self, name: str) -> Split:
        if name not in self._splits:
            split = load_split(
                self.args.datatype, self.data_path, name, dev_size=self.args.dev_size, seed=self.args.dev_seed
            )
            if self.args.datatype == "h2s" and name in ("train", "dev") and not (self.data_path / "train.pkl").is_file():
                # Records rebuilt from the realigned CSV include segments that were never cut into clips.
                split.records = drop_videos_without_features(split.records, list(self.readers(split)))
            invalid = find_invalid_records(split.records, split.source)
            if invalid:
                self._handle_invalid(split, invalid, "annotated sentences and videos",
                                     len(split.records) + split.num_videos)
            self._splits[name] = split
        return self._splits[name]

    def readers(self, split: Split, train: bool = False) -> tuple[FeatureReader, FeatureReader]:
        channels = self.args.video_input_dim
        agnostic = FeatureReader(self.agnostic_root, split.feature_subset, channels=channels)
        if train and self.args.datatype == "ph" and self.args.released_ph_aware_path:
            return agnostic, agnostic
        return agnostic, FeatureReader(self.aware_root, split.feature_subset, channels=channels)

    def check_features(self, name: str, train: bool = False) -> None:
        """Load every feature file of split ``name`` once before training; drop or reject invalid videos.

        The main rank reads the files and sends the invalid videos to the others, so every rank keeps
        the same records. A split is checked once per set of readers.
        """
        split = self.split(name)
        if split.num_videos == 0:
            raise validation.InvalidDataError(
                f"the {name} split of {self.data_path} has no videos with features; check the annotation files "
                f"and <features root>/{split.feature_subset}")
        if (name, train) in self._checked:
            return
        readers = list(dict.fromkeys(self.readers(split, train=train)))
        invalid, num_missing = validation.find_invalid_videos_on_main(
            split.records, readers, du.is_main_process(), du.broadcast_object, description=f"checking {name} features",
        )
        self._checked.add((name, train))
        if not invalid:
            return

        num_videos = split.num_videos
        hint = ""
        if num_missing * 2 >= num_videos:  # at least half the files of one stream
            names = [video.name for record in split.records for video in record.videos]
            guesses = [diagnose_feature_root(reader.root, split.feature_subset, names) for reader in readers]
            hint = " ".join(dict.fromkeys(guess for guess in guesses if guess))
            hint = (f"Most feature files are missing, so a feature root probably points at the wrong folder. "
                    f"{hint}".strip())
        if name == "dev" and self.args.datatype == "ph" and num_missing:
            hint += (" The PHOENIX-2014T dev videos need their own features under <features root>/dev; extract them "
                     "or select on the test split with --select_on test.")
        if all(item.reason == validation.MISSING_REASON for item in invalid) and not self.args.skip_invalid:
            # Only missing files: keep the short message of the common case of an incomplete copy.
            self._record_invalid(name, invalid)
            examples = ", ".join(item.path for item in invalid[:3])
            raise FileNotFoundError(
                f"{num_missing} of {num_videos * len(readers)} feature files of the {name} split are missing, for "
                f"example {examples}. Check --features_path and --features_path_retrain (expected layout "
                f"<root>/{split.feature_subset}/<video_name>.pkl or a packed store), or pass --skip_invalid to leave "
                f"these videos out; all are listed in {self.invalid_list_path}. {hint}".strip()
            )
        self._handle_invalid(split, invalid, "videos", num_videos, hint=hint)

    def _record_invalid(self, split_name: str, invalid: list[InvalidItem]) -> None:
        self.invalid_rows.extend((split_name, item) for item in invalid)
        if du.is_main_process():
            validation.write_invalid_list(self.invalid_list_path, self.invalid_rows)

    def _handle_invalid(self, split: Split, invalid: list[InvalidItem], what: str, total: int,
                        hint: str = "") -> None:
        """List the invalid items in the run folder, then leave them out (--skip_invalid) or raise."""
        self._record_invalid(split.name, invalid)
        if not self.args.skip_invalid:
            raise validation.InvalidDataError(
                validation.format_invalid_error(what, split.name, invalid, total, self.invalid_list_path, hint))
        validation.log_invalid_items(split.name, invalid, self.invalid_list_path)
        split.records = validation.drop_invalid_items(split.records, invalid)
        logger.warning("%s split: left out %d invalid items (listed in %s); %d sentences with %d videos remain",
                       split.name, len(invalid), self.invalid_list_path, len(split.records), split.num_videos)
        if not split.records:
            raise validation.InvalidDataError(
                f"no valid sentence is left in the {split.name} split after leaving out {len(invalid)} invalid items "
                f"(listed in {self.invalid_list_path}). {hint}".strip())

    def train_dataset(self) -> TrainDataset:
        split = self.split("train")
        agnostic, aware = self.readers(split, train=True)
        return TrainDataset(
            split.records, agnostic, aware, self.tokenizer, alpha=self.args.alpha,
            feature_len=self.args.feature_len, text_aug_p=self.args.text_aug_p, seed=self.args.seed,
        )

    def eval_loaders(self, name: str) -> tuple[DataLoader, DataLoader, np.ndarray]:
        split = self.split(name)
        agnostic, aware = self.readers(split)
        videos = EvalVideoDataset(split.records, agnostic, aware, alpha=self.args.alpha, feature_len=self.args.feature_len)
        texts = EvalTextDataset(split.records, self.tokenizer)
        kwargs = {"batch_size": self.args.batch_size_val, "num_workers": self.args.num_workers, "shuffle": False}
        return DataLoader(videos, **kwargs), DataLoader(texts, **kwargs), videos.video_to_sentence


def run_evaluation(
    args: argparse.Namespace, model: torch.nn.Module, data: Data, split_name: str, dist_info: du.DistInfo
) -> dict[str, Any]:
    video_loader, text_loader, video_to_sentence = data.eval_loaders(split_name)
    metrics, _ = evaluate(
        model, video_loader, text_loader, video_to_sentence, dist_info.device,
        dual_mix=args.dual_mix, tau=args.tau, masked_softmax=args.masked_softmax,
        block_size=args.eval_block_size, t2v_gallery=args.t2v_gallery, precision=args.precision,
    )
    logger.info("%s split (%d videos, %d sentences):\n%s", split_name, len(video_to_sentence),
                int(video_to_sentence.max()) + 1, format_metrics_table(metrics))
    return metrics


def evaluate_on_main(args, model, data, split_name, dist_info) -> Optional[dict[str, Any]]:
    """Evaluate on rank 0 while the other ranks wait; return the metrics on every rank."""
    metrics = run_evaluation(args, model, data, split_name, dist_info) if dist_info.is_main else None
    return du.broadcast_object(metrics)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def plot_history(history: list[dict[str, Any]], path: Path, select_on: str) -> None:
    """Draw the training loss and the selection-split R@1 per epoch into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_r1) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot(epochs, [row["train"]["loss"] for row in history], marker="o")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_r1.plot(epochs, [row[select_on]["t2v"]["R1"] for row in history], marker="o", label="T2V R@1")
    ax_r1.plot(epochs, [row[select_on]["v2t"]["R1"] for row in history], marker="s", label="V2T R@1")
    ax_r1.set_xlabel("epoch")
    ax_r1.set_ylabel(f"{select_on} R@1 (%)")
    ax_r1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train(args: argparse.Namespace, model: RetrievalModel, data: Data, dist_info: du.DistInfo,
          output_dir: Path) -> dict[str, Any]:
    """Train for ``args.epochs`` epochs, evaluating and checkpointing after each one."""
    world = dist_info.world_size
    if args.batch_size % world != 0:
        raise ValueError(f"--batch_size {args.batch_size} is not divisible by the {world} processes; use a multiple "
                         f"of {world} (it is the global batch, split evenly over the processes)")
    local_batch = args.batch_size // world

    data.check_features("train", train=True)
    data.check_features(args.select_on)
    if args.do_eval:
        data.check_features(args.eval_split)
    train_set = data.train_dataset()
    sampler = du.ResumableDistributedSampler(train_set, num_replicas=world, rank=dist_info.rank, shuffle=True,
                                             seed=args.seed, drop_last=True)
    # The workers' base seed comes from this generator, reseeded every epoch. Without it, creating the
    # iterator draws from the global torch generator, and a resumed epoch would draw its model noise
    # out of step with an uninterrupted one.
    loader_generator = torch.Generator()
    loader = DataLoader(train_set, batch_size=local_batch, sampler=sampler, num_workers=args.num_workers,
                        drop_last=True, pin_memory=dist_info.device.type == "cuda", generator=loader_generator,
                        persistent_workers=False)  # workers must see set_epoch, so they restart each epoch
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(
            f"the training split has {len(train_set)} sentences, fewer than one global batch of "
            f"{args.batch_size}; lower --batch_size"
        )
    total_steps = steps_per_epoch * args.epochs

    core = model
    criterion = RetrievalLoss(
        method=args.method, dual_mix=args.dual_mix, tau=args.tau, ot_weight=args.ot_weight, ot_eps=args.ot_eps,
        sinkhorn_iters=args.sinkhorn_iters, sinkhorn_tol=args.sinkhorn_tol, ot_aggregation=args.ot_aggregation,
        ot_mode=args.ot_mode, masked_softmax=args.masked_softmax,
        gather=du.gather_outputs if dist_info.distributed else None,
        comm=ProcessGroupComm() if dist_info.distributed and args.sharded_loss else None,
        chunk_elements=args.similarity_chunk,
    )
    optimizer = build_optimizer(core, name=args.optimizer, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = build_scheduler(optimizer, total_steps=total_steps, warmup=args.warmup_proportion)
    # Only fp16 needs loss scaling: bf16 has fp32's exponent range, so its gradients do not underflow.
    scaler = torch.amp.GradScaler(dist_info.device.type, enabled=args.precision == "fp16")

    start_epoch, start_step, global_step = 0, 0, 0
    best_score, best_epoch = -1.0, -1
    history: list[dict[str, Any]] = []
    checkpoint: dict[str, Any] = {}
    if resolve_path(args.resume) is not None:
        resume_path, checkpoint = load_resume_checkpoint(args, output_dir, dist_info)
        _warn_on_changed_schedule(args, checkpoint)
        core.load_state_dict(model_state_from(checkpoint))
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        _restore_scaler(scaler, checkpoint, resume_path)
        start_epoch, start_step = resume_position(checkpoint)
        global_step = int(checkpoint["step"])
        best_score, best_epoch = float(checkpoint["best_score"]), int(checkpoint["best_epoch"])
        history = json.loads(checkpoint.get("history_json", "[]"))
        logger.info("resumed from %s at epoch %d, step %d of the epoch (global step %d)", resume_path, start_epoch,
                    start_step, global_step)
        if start_epoch >= args.epochs:
            logger.warning("the checkpoint has already finished %d epochs, so there is nothing to train; raise "
                           "--epochs to continue", start_epoch)
        previous_best = resume_path.parent / BEST_NAME
        if dist_info.is_main and previous_best.is_file() and previous_best.resolve() != (output_dir / BEST_NAME).resolve():
            shutil.copy2(previous_best, output_dir / BEST_NAME)
    elif dist_info.is_main and (output_dir / LAST_NAME).is_file():
        logger.warning("%s already has %s of an earlier run; this new run replaces its checkpoints (pass --resume "
                       "latest to continue that run instead, or choose another --output_dir)", output_dir, LAST_NAME)

    if dist_info.distributed:
        ddp_kwargs = {"device_ids": [dist_info.local_rank]} if dist_info.device.type == "cuda" else {}
        model = torch.nn.parallel.DistributedDataParallel(core, **ddp_kwargs)
    if args.compile:
        # Evaluation calls the encoders of `core` directly, so only the training forward pass is compiled.
        model = CompiledWithFallback(model)

    num_params = sum(p.numel() for p in core.parameters())
    trainable = sum(p.numel() for p in core.parameters() if p.requires_grad)
    logger.info(
        "training %s: %d sentences, global batch %d (%d per process, world size %d), %d steps per epoch, "
        "%d epochs; %.2fM parameters (%.2fM trainable)",
        args.method, len(train_set), args.batch_size, local_batch, world, steps_per_epoch, args.epochs,
        num_params / 1e6,
        trainable / 1e6,
    )
    sentence_ids = [record.sentence_id for record in train_set.records]

    def save_state(epoch: int, epoch_step: int, step: int, finished: bool,
                   loss_sums: Optional[dict[str, float]] = None) -> None:
        """Write checkpoint_last.pt on rank 0, keeping the one before as checkpoint_prev.pt."""
        # Continuing inside an epoch needs the generators of every rank, so all ranks join this gather.
        rng_states = du.all_gather_object(capture_rng_state()) if not finished else []
        if dist_info.is_main:
            state = {
                "model": core.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "epoch_step": epoch_step,
                "epoch_finished": finished,
                "step": step,
                "best_score": best_score,
                "best_epoch": best_epoch,
                "history_json": json.dumps(history, default=str),
                "config_json": json.dumps(vars(args), default=str),
                "world_size": world,
                "loss_sums": dict(loss_sums or {}),
                "rng_states": rng_states,
            }
            if scaler.is_enabled():
                state["scaler"] = scaler.state_dict()
            save_checkpoint(state, output_dir / LAST_NAME, previous=output_dir / PREV_NAME)
            logger.info("saved %s at epoch %d, step %d of %d (global step %d)", output_dir / LAST_NAME, epoch,
                        epoch_step, steps_per_epoch, step)

    for epoch in range(start_epoch, args.epochs):
        skip_steps = start_step if epoch == start_epoch else 0
        seed_epoch(args.seed, epoch, dist_info.rank)
        loader_generator.manual_seed(loader_seed(args.seed, epoch, dist_info.rank))
        sampler.set_epoch(epoch)
        sampler.set_skip(skip_steps * local_batch)
        train_set.set_epoch(epoch)
        if skip_steps:
            _restore_rng_mid_epoch(args, checkpoint, epoch, skip_steps, dist_info)

        def save_mid_epoch(epoch_step: int, step: int, sums: dict[str, float], epoch: int = epoch) -> None:
            # The last step needs no mid-epoch file, because the end-of-epoch checkpoint follows the evaluation.
            if epoch_step % args.save_every_steps or epoch_step >= steps_per_epoch:
                return
            save_state(epoch, epoch_step, step, finished=False, loss_sums=sums)
            du.wait_for_main()

        train_terms, global_step = train_one_epoch(
            model, criterion, loader, optimizer, scheduler, epoch, global_step, dist_info,
            precision=args.precision, max_grad_norm=args.max_grad_norm, log_every=args.log_every,
            sentence_ids=sentence_ids, scaler=scaler, start_step=skip_steps,
            loss_sums=checkpoint.get("loss_sums") if skip_steps else None,
            on_step=save_mid_epoch if args.save_every_steps else None,
        )
        metrics = evaluate_on_main(args, core, data, args.select_on, dist_info)
        score = metrics["t2v"]["R1"]
        history.append({"epoch": epoch, "train": train_terms, args.select_on: metrics})
        improved = score >= best_score  # a tie goes to the later epoch, as in the released code
        if improved:
            best_score, best_epoch = score, epoch
        logger.info(
            "epoch %d done in %.1fs: loss %.4f, %s T2V R@1 %.2f (best %.2f at epoch %d)",
            epoch, train_terms["epoch_time_s"], train_terms["loss"], args.select_on, score, best_score, best_epoch,
        )

        save_state(epoch, steps_per_epoch, global_step, finished=True)
        if dist_info.is_main:
            if improved:
                save_checkpoint({"model": core.state_dict(), "epoch": epoch,
                                 "config_json": json.dumps(vars(args), default=str)}, output_dir / BEST_NAME)
            plot_history(history, output_dir / "curves.png", args.select_on)
        du.wait_for_main()

    return {"history": history, "best_epoch": best_epoch, "best_score": best_score, "steps": global_step}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    dist_info = du.init_distributed(args.local_rank, device=args.device, timeout_s=args.dist_timeout,
                                    wait_timeout_s=args.wait_timeout)
    output_dir = resolve_path(args.output_dir) or Path("runs/upret")
    output_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(output_dir / "log.txt", rank=dist_info.rank)
    args.precision = resolve_precision(args.precision, dist_info.device)
    seed_everything(args.seed)
    start = time.time()
    try:
        logger.info("arguments: %s", json.dumps(vars(args), sort_keys=True, default=str))
        # An evaluation-only run must not overwrite the files of the training run in the same folder.
        prefix = "" if args.do_train else f"eval_{args.eval_split}_"
        if dist_info.is_main:
            with open(output_dir / f"{prefix}config.yaml", "w", encoding="utf-8") as handle:
                yaml.safe_dump(vars(args), handle, sort_keys=True)

        data = Data(args)
        model = build_model(args).to(dist_info.device)
        if args.init_model:
            load_init_model(model, args)
            logger.info("initialised the model from %s", args.init_model)
        elif args.do_eval and not args.do_train:
            logger.warning("evaluating without --init_model: the heads (and the towers without a CLIP file) are "
                           "randomly initialised; pass --init_model CHECKPOINT to evaluate a trained model")

        if args.do_eval and not args.do_train:
            data.check_features(args.eval_split)
        results: dict[str, Any] = {"method": args.method, "datatype": args.datatype, "config": vars(args)}
        if args.do_train:
            outcome = train(args, model, data, dist_info, output_dir)
            results["selection"] = {
                "split": args.select_on,
                "best_epoch": outcome["best_epoch"],
                "best_t2v_R1": outcome["best_score"],
            }
            if args.select_on == "test":
                logger.warning("checkpoints were selected on the test split; the test numbers are optimistic")
            if args.select_on == "dev" and args.datatype in ("h2s", "csl"):
                results["selection"]["dev_sentence_ids"] = [r.sentence_id for r in data.split("dev").records]
            results["history"] = outcome["history"]
            results["steps"] = outcome["steps"]
            load_model_weights(model, output_dir / BEST_NAME)
        if args.do_eval:
            results["eval_split"] = args.eval_split
            results["eval"] = evaluate_on_main(args, model, data, args.eval_split, dist_info)
        results["wall_time_s"] = time.time() - start
        if dist_info.is_main:
            results_path = output_dir / ("results.json" if args.do_train else f"eval_{args.eval_split}.json")
            write_json(results_path, results)
            logger.info("results written to %s (%.1f s)", results_path, results["wall_time_s"])
        return results
    finally:
        du.cleanup_distributed()


def run_cli(argv: Optional[Sequence[str]] = None) -> int:
    """Run :func:`main` as a command and return its exit status.

    Missing files, unreadable checkpoints, invalid data and unsafe pickles come from the user's flags
    and files, and their messages already name the file and the fix. So they end the command with that
    message (also in ``log.txt``) and status 1 instead of a traceback. Any other exception keeps its
    traceback.
    """
    try:
        main(argv)
    except (FileNotFoundError, CheckpointError, UnsafePickleError, validation.InvalidDataError) as error:
        logger.error("%s: %s", type(error).__name__, error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli())
