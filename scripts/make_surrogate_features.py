"""Write surrogate I3D-style video features in the published per-video pickle layout.

Real I3D features are 1024-d vectors, one per 16-frame window with stride 1 (T - 15 clips for a
video of T >= 16 frames, one clip for a shorter video whose frames are padded by repeating the last
frame). This tool builds features of the same shape from sign structure instead of pixels, so that
the retrieval model can be trained and evaluated end to end without the real feature files.

Feature model (shared by both modes, see ``SurrogateFeatureModel``):

* Every sign state s has a latent vector ``gloss[g(s)] + state_scale * offset[s]``, so the states of
  one gloss are related. Silence (state 0) has only its own small offset.
* Every signer has a latent offset of scale ``signer_scale``.
* Frame t of a video is ``state[s_t] + signer + frame_noise * N(0, I)``.
* Clip c is the mean of frames c .. c + 15, mapped to ``dim`` by a fixed random projection and tanh.
  The two streams share this noise-free signal.
* Each stream adds its own noise, drawn per frame in ``dim`` dimensions and averaged over the same
  16-frame windows, so that overlapping clips have correlated noise with standard deviation
  ``aware_noise`` or ``agnostic_noise`` per clip. The domain-agnostic stream is the noisier one by
  default, so the fusion (1 - alpha) * aware + alpha * agnostic has an optimum strictly inside (0, 1).

Every random draw is keyed by (seed, purpose, id or name), so a video's features do not depend on
which other videos are processed, on ``--limit``, on ``--workers`` or on the processing order.

Modes:

* ``phoenix`` reads the PHOENIX-2014T per-frame HMM sign-state alignments (JSON lines, one video per
  line, ``alignments.pami0``) and writes ``<out>/ph_domain_{agnostic,aware}/<split>/<video_id>.pkl``.
* ``demo`` invents a small English corpus with a sign lexicon and writes annotation pickles in the
  list layout plus ``<out>/features/domain_{agnostic,aware}/<split>/<video_name>.pkl``.

Examples::

    python scripts/make_surrogate_features.py phoenix --out /tmp/surrogate_ph --workers 2
    python scripts/make_surrogate_features.py demo --out /tmp/surrogate_demo
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import multiprocessing
import os
import pickle
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

# One BLAS thread per process, set before numpy loads OpenBLAS, because the variable has no effect
# once numpy is imported. The products here are small ([~100, 128] x [128, 1024]). On a 2-core VM at
# load average 7, one such float32 product took 0.25 ms with 1 OpenBLAS thread and 20 ms with 2
# (numpy 2.4, OpenBLAS 0.3.31). Parallelism comes from --workers instead.
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

logger = logging.getLogger("make_surrogate_features")

STREAMS = ("domain_agnostic", "domain_aware")
PICKLE_PROTOCOL = 5
DEFAULT_ALIGNMENT_FILES = ("phoenix-2014t.train.jsonl.gz", "phoenix-2014t.dev.jsonl.gz")

# Purpose tags of the keyed random streams. Changing one changes every feature written.
_TAG_GLOSS = 1
_TAG_STATE = 2
_TAG_SIGNER = 3
_TAG_PROJECTION = 4
_TAG_FRAME_NOISE = 5
_TAG_STREAM_NOISE = 6
_TAG_DEMO_LEXICON = 7
_TAG_DEMO_SENTENCES = 8
_TAG_DEMO_TIMING = 9


# ---------------------------------------------------------------------------------------------
# Shared feature model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SurrogateConfig:
    """Sizes and noise levels of the surrogate features. Every scale is a standard deviation."""

    seed: int = 0
    dim: int = 1024
    latent_dim: int = 128
    window: int = 16
    state_scale: float = 0.5
    signer_scale: float = 0.5
    frame_noise: float = 0.3
    aware_noise: float = 0.5
    agnostic_noise: float = 0.8

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for name in ("dim", "latent_dim", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("state_scale", "signer_scale", "frame_noise", "aware_noise", "agnostic_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class VideoTask:
    """One video to synthesise: its output location, signer and per-frame sign-state ids [T]."""

    subset: str
    video_name: str
    source_name: str
    signer: str
    state_ids: np.ndarray


def string_key(text: str) -> int:
    """Map a string to a stable 64-bit integer (unlike ``hash``, it does not change per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def keyed_rng(seed: int, tag: int, *keys: int) -> np.random.Generator:
    """Return a generator that depends only on (seed, purpose tag, keys); all must be >= 0."""
    return np.random.default_rng([seed, tag, *keys])


def clip_count(num_frames: int, window: int = 16) -> int:
    """Return the number of stride-1 windows of a video: T - window + 1, and 1 for a shorter video."""
    return max(1, num_frames - window + 1)


def window_means(frames: np.ndarray, window: int) -> np.ndarray:
    """Average ``frames`` [T, d] over every stride-1 window of ``window`` frames.

    A video shorter than the window is padded by repeating its last frame, as the I3D extractor
    pads its input. Returns float32 [clip_count(T, window), d]. The sums come from a float64
    cumulative sum, so the cost is O(T * d) whatever the window length.
    """
    if frames.ndim != 2 or frames.shape[0] == 0:
        raise ValueError(f"frames must have shape [T >= 1, d], got {frames.shape}")
    if frames.shape[0] < window:
        padding = np.repeat(frames[-1:], window - frames.shape[0], axis=0)
        frames = np.concatenate([frames, padding], axis=0)
    cumulative = np.zeros((frames.shape[0] + 1, frames.shape[1]), dtype=np.float64)
    np.cumsum(frames, axis=0, dtype=np.float64, out=cumulative[1:])
    return ((cumulative[window:] - cumulative[:-window]) / window).astype(np.float32)


class SurrogateFeatureModel:
    """Generator of the clip features of both streams from per-frame sign-state ids.

    ``gloss_of_state[s]`` is the gloss id of state s, or -1 for a state without a gloss (silence).
    Table rows are drawn per id, so the vector of a state is the same for any table size.

    NOTE: real I3D features are non-negative (average-pooled ReLU outputs). These features are
    centred on zero (tanh plus Gaussian noise), so code must not assume non-negative inputs from them.
    """

    def __init__(self, config: SurrogateConfig, gloss_of_state: np.ndarray) -> None:
        self.config = config
        latent = config.latent_dim
        gloss_of_state = np.asarray(gloss_of_state, dtype=np.int64)

        gloss_table = {
            int(g): keyed_rng(config.seed, _TAG_GLOSS, int(g)).standard_normal(latent, dtype=np.float32)
            for g in np.unique(gloss_of_state[gloss_of_state >= 0])
        }
        self.state_table = np.zeros((len(gloss_of_state), latent), dtype=np.float32)
        for state, gloss in enumerate(gloss_of_state):
            offset = keyed_rng(config.seed, _TAG_STATE, state).standard_normal(latent, dtype=np.float32)
            self.state_table[state] = config.state_scale * offset
            if gloss >= 0:
                self.state_table[state] += gloss_table[int(gloss)]

        # The projection keeps the pre-activation standard deviation near 1 for a window inside one
        # sign, so tanh is mildly nonlinear: it saturates only for the larger coordinates.
        expected_variance = 1.0 + config.state_scale**2 + config.signer_scale**2
        scale = 1.0 / np.sqrt(latent * expected_variance)
        projection_rng = keyed_rng(config.seed, _TAG_PROJECTION, 0)
        self.projection = (scale * projection_rng.standard_normal((latent, config.dim))).astype(np.float32)
        self._signer_offsets: Dict[str, np.ndarray] = {}

    def signer_offset(self, signer: str) -> np.ndarray:
        """Return the latent offset [latent_dim] of a signer, drawn from the signer's name."""
        if signer not in self._signer_offsets:
            rng = keyed_rng(self.config.seed, _TAG_SIGNER, string_key(signer))
            offset = self.config.signer_scale * rng.standard_normal(self.config.latent_dim, dtype=np.float32)
            self._signer_offsets[signer] = offset
        return self._signer_offsets[signer]

    def video_features(self, state_ids: np.ndarray, signer: str, video_key: str) -> Dict[str, np.ndarray]:
        """Build the clip features of one video.

        Args:
            state_ids: int [T], the sign-state id of every frame.
            signer: signer name, which selects the signer offset.
            video_key: unique video name, which seeds the frame noise and the stream noise.

        Returns:
            ``{"domain_agnostic": float32 [N, dim], "domain_aware": float32 [N, dim]}`` with
            N = clip_count(T, window).
        """
        config = self.config
        state_ids = np.asarray(state_ids)
        if state_ids.ndim != 1 or state_ids.size == 0:
            raise ValueError(f"video {video_key}: state_ids must be a non-empty 1-D array, got {state_ids.shape}")
        if state_ids.min() < 0 or state_ids.max() >= len(self.state_table):
            raise ValueError(
                f"video {video_key}: state ids must lie in [0, {len(self.state_table) - 1}], "
                f"got [{state_ids.min()}, {state_ids.max()}]"
            )
        num_frames = state_ids.size
        key = string_key(video_key)

        # Latent frames [T, latent] -> window means [N, latent] -> shared signal [N, dim].
        frame_rng = keyed_rng(config.seed, _TAG_FRAME_NOISE, key)
        frames = self.state_table[state_ids] + self.signer_offset(signer)
        frames += config.frame_noise * frame_rng.standard_normal(frames.shape, dtype=np.float32)
        signal = np.tanh(window_means(frames, config.window) @ self.projection)

        # Frame noise scaled by sqrt(window) has standard deviation noise_level after window averaging
        # (for videos of at least `window` frames, because padding repeats the last noise frame).
        features = {}
        for stream_index, stream in enumerate(STREAMS):
            noise_level = config.agnostic_noise if stream == "domain_agnostic" else config.aware_noise
            noise_rng = keyed_rng(config.seed, _TAG_STREAM_NOISE, key, stream_index)
            noise = noise_rng.standard_normal((num_frames, config.dim), dtype=np.float32)
            noise *= noise_level * np.sqrt(config.window)
            features[stream] = (signal + window_means(noise, config.window)).astype(np.float32)
        return features


# ---------------------------------------------------------------------------------------------
# Writing (single process or a worker pool)
# ---------------------------------------------------------------------------------------------


@dataclass
class WriteJob:
    """Everything a worker needs to rebuild the feature model and place the files."""

    config: SurrogateConfig
    gloss_of_state: np.ndarray
    stream_roots: Dict[str, Path]
    skip_existing: bool


@dataclass
class WriteSummary:
    """Counts of one run, per subset."""

    clips: Dict[str, List[int]] = field(default_factory=dict)
    skipped: Dict[str, int] = field(default_factory=dict)
    bytes_written: int = 0


# Per-process state of the worker pool: the feature model is built once per worker by
# `_init_worker`, because sending its tables with every task would cost more than the work.
_worker_job: Optional[WriteJob] = None
_worker_model: Optional[SurrogateFeatureModel] = None


def _init_worker(job: WriteJob) -> None:
    global _worker_job, _worker_model
    _worker_job = job
    _worker_model = SurrogateFeatureModel(job.config, job.gloss_of_state)


def feature_path(root: Path, subset: str, video_name: str) -> Path:
    """Return ``<root>/<subset>/<video_name>.pkl``, the published per-video feature path."""
    return root / subset / f"{video_name}.pkl"


def write_feature_file(path: Path, name: str, feature: np.ndarray) -> int:
    """Pickle ``{'name', 'feature'}`` to ``path`` atomically and return the file size in bytes.

    The temporary file plus ``os.replace`` means that an interrupted run never leaves a truncated
    file that ``--skip_existing`` would keep.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        pickle.dump({"name": name, "feature": feature}, handle, protocol=PICKLE_PROTOCOL)
    os.replace(temporary, path)
    return path.stat().st_size


def _write_video(task: VideoTask) -> Tuple[str, int, bool, int]:
    """Write both stream files of one video and return (subset, clips, skipped, bytes written)."""
    assert _worker_job is not None and _worker_model is not None, "worker used before _init_worker"
    paths = {
        stream: feature_path(root, task.subset, task.video_name) for stream, root in _worker_job.stream_roots.items()
    }
    if _worker_job.skip_existing and all(path.exists() for path in paths.values()):
        return task.subset, 0, True, 0

    features = _worker_model.video_features(task.state_ids, task.signer, f"{task.subset}/{task.video_name}")
    written = 0
    for stream, path in paths.items():
        written += write_feature_file(path, task.source_name, features[stream])
    return task.subset, features[STREAMS[0]].shape[0], False, written


def write_videos(tasks: Sequence[VideoTask], job: WriteJob, workers: int) -> WriteSummary:
    """Synthesise and write the features of ``tasks``, in ``workers`` processes if more than one."""
    summary = WriteSummary()
    progress = tqdm(total=len(tasks), unit="video", desc="features", mininterval=1.0)

    def record(result: Tuple[str, int, bool, int]) -> None:
        subset, clips, skipped, written = result
        if skipped:
            summary.skipped[subset] = summary.skipped.get(subset, 0) + 1
        else:
            summary.clips.setdefault(subset, []).append(clips)
        summary.bytes_written += written
        progress.update(1)

    if workers <= 1:
        _init_worker(job)
        for task in tasks:
            record(_write_video(task))
    else:
        chunk_size = max(1, min(64, len(tasks) // (4 * workers)))
        with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
            for result in pool.imap_unordered(_write_video, tasks, chunksize=chunk_size):
                record(result)
    progress.close()
    return summary


def log_summary(summary: WriteSummary, seconds: float, stream_roots: Dict[str, Path]) -> None:
    """Log videos and clips per subset, bytes written and the run time."""
    for subset in sorted(set(summary.clips) | set(summary.skipped)):
        clips = np.asarray(summary.clips.get(subset, []), dtype=np.int64)
        skipped = summary.skipped.get(subset, 0)
        if clips.size:
            logger.info(
                "%s: %d videos written, %d skipped as existing, clips per video min %d / mean %.1f / max %d, %d clips",
                subset, clips.size, skipped, clips.min(), clips.mean(), clips.max(), clips.sum(),
            )
        else:
            logger.info("%s: 0 videos written, %d skipped as existing", subset, skipped)
    for stream, root in stream_roots.items():
        logger.info("%s stream written under %s", stream, root)
    logger.info("wrote %.2f GB in %.1f s", summary.bytes_written / 1e9, seconds)


# ---------------------------------------------------------------------------------------------
# Mode phoenix: real sign-state alignments
# ---------------------------------------------------------------------------------------------


def read_alignment_tasks(paths: Sequence[Path], limit: Optional[int] = None) -> List[VideoTask]:
    """Read PHOENIX-2014T alignment files (gzipped or plain JSON lines) into video tasks.

    Each line contains ``name`` ("<split>/<video id>"), ``signer``, ``num_frames`` and
    ``alignments.pami0`` (one sign-state id per frame). ``limit`` keeps the first N videos per file.
    """
    tasks: List[VideoTask] = []
    seen = set()
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"alignment file not found: {path}. Pass existing files with --alignments.")
        opener = gzip.open if path.suffix == ".gz" else open
        count = 0
        with opener(path, "rt", encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if limit is not None and count >= limit:
                    break
                if not line.strip():
                    continue
                task = _parse_alignment_line(line, f"{path}:{line_number}")
                if (task.subset, task.video_name) in seen:
                    logger.warning("%s:%d: duplicate video %s ignored", path, line_number, task.source_name)
                    continue
                seen.add((task.subset, task.video_name))
                tasks.append(task)
                count += 1
        logger.info("read %d videos from %s", count, path)
    return tasks


def _parse_alignment_line(line: str, where: str) -> VideoTask:
    record = json.loads(line)
    try:
        name = record["name"]
        states = np.asarray(record["alignments"]["pami0"], dtype=np.int64)
        num_frames = int(record["num_frames"])
        signer = str(record["signer"])
    except KeyError as error:
        raise ValueError(f"{where}: missing key {error} in alignment record") from error
    if "/" not in name:
        raise ValueError(f"{where}: name {name!r} is not of the form '<split>/<video id>'")
    if states.size != num_frames or num_frames == 0:
        raise ValueError(f"{where}: {name} has {states.size} alignment labels for num_frames={num_frames}")
    if states.min() < 0:
        raise ValueError(f"{where}: {name} has a negative sign-state id")
    subset, video_id = name.split("/", 1)
    return VideoTask(subset=subset, video_name=video_id, source_name=name, signer=signer, state_ids=states)


def phoenix_gloss_of_state(num_states: int, states_per_gloss: int) -> np.ndarray:
    """Return the gloss id [num_states] of each PHOENIX sign state, -1 for silence (state 0).

    NOTE: the grouping is inferred from the id layout, not read from a lexicon: states
    1 + 3k .. 3 + 3k form gloss k. On the 3,680 training and dev videos whose runs of gloss ids
    match their gloss string word for word, 905 of the 947 groups map to a single gloss word.
    ``states_per_gloss=1`` turns the grouping off (every state gets its own gloss vector).
    """
    states = np.arange(num_states)
    return np.where(states == 0, -1, (states - 1) // states_per_gloss)


def run_phoenix(args: argparse.Namespace, config: SurrogateConfig) -> WriteSummary:
    paths = [Path(path) for path in args.alignments]
    tasks = read_alignment_tasks(paths, args.limit)
    if not tasks:
        raise ValueError(f"no videos found in {', '.join(map(str, paths))}")
    num_states = int(max(task.state_ids.max() for task in tasks)) + 1
    stream_roots = {stream: Path(args.out) / f"ph_{stream}" for stream in STREAMS}
    job = WriteJob(config, phoenix_gloss_of_state(num_states, args.states_per_gloss), stream_roots, args.skip_existing)
    start = time.perf_counter()
    summary = write_videos(tasks, job, args.workers)
    log_summary(summary, time.perf_counter() - start, stream_roots)
    return summary


# ---------------------------------------------------------------------------------------------
# Mode demo: a small invented corpus
# ---------------------------------------------------------------------------------------------

# Verb signs: base form, third person singular, past tense.
_DEMO_VERBS = {
    "READ": ("read", "reads", "read"), "BUY": ("buy", "buys", "bought"), "SELL": ("sell", "sells", "sold"),
    "COOK": ("cook", "cooks", "cooked"), "LIKE": ("like", "likes", "liked"), "WANT": ("want", "wants", "wanted"),
    "FIND": ("find", "finds", "found"), "PAINT": ("paint", "paints", "painted"),
    "CLEAN": ("clean", "cleans", "cleaned"), "CARRY": ("carry", "carries", "carried"),
    "SEE": ("see", "sees", "saw"), "EAT": ("eat", "eats", "ate"),
}
_DEMO_INTRANSITIVE = ("READ", "COOK", "PAINT", "CLEAN", "EAT")
_DEMO_SUBJECTS = ("TEACHER", "DOCTOR", "CHILD", "MOTHER", "FATHER", "FRIEND", "FARMER", "NEIGHBOUR", "STUDENT", "BAKER")
# Object signs: singular, plural.
_DEMO_OBJECTS = {
    "BOOK": ("book", "books"), "APPLE": ("apple", "apples"), "CAR": ("car", "cars"), "HOUSE": ("house", "houses"),
    "FLOWER": ("flower", "flowers"), "FISH": ("fish", "fish"), "LETTER": ("letter", "letters"),
    "TABLE": ("table", "tables"), "BICYCLE": ("bicycle", "bicycles"), "CAKE": ("cake", "cakes"),
}
_ALL_OBJECTS = tuple(_DEMO_OBJECTS)
# Objects that make sense with each verb.
_DEMO_VERB_OBJECTS = {
    "READ": ("BOOK", "LETTER"), "COOK": ("FISH", "CAKE", "APPLE"), "EAT": ("APPLE", "FISH", "CAKE"),
    "PAINT": ("HOUSE", "TABLE", "BICYCLE", "FLOWER", "CAR"), "CLEAN": ("HOUSE", "TABLE", "CAR", "BICYCLE", "FISH"),
    "CARRY": ("BOOK", "APPLE", "FLOWER", "LETTER", "TABLE", "BICYCLE", "CAKE", "FISH"),
    "BUY": _ALL_OBJECTS, "SELL": _ALL_OBJECTS, "LIKE": _ALL_OBJECTS, "WANT": _ALL_OBJECTS, "FIND": _ALL_OBJECTS,
    "SEE": _ALL_OBJECTS,
}
_DEMO_ADJECTIVES = ("RED", "BIG", "OLD", "NEW", "SMALL", "GREEN", "BLUE", "CHEAP")
_DEMO_NUMBERS = ("TWO", "THREE")
# Time signs: English phrase, tense.
_DEMO_TIMES = {
    "TODAY": ("today", "present"), "TOMORROW": ("tomorrow", "future"), "YESTERDAY": ("yesterday", "past"),
    "MORNING": ("every morning", "present"), "EVENING": ("in the evening", "present"),
    "MONDAY": ("on Monday", "present"), "SUNDAY": ("on Sunday", "present"),
}
_DEMO_PLACES = {
    "HOME": "at home", "SCHOOL": "at school", "CITY": "in the city", "GARDEN": "in the garden",
    "MARKET": "at the market", "VILLAGE": "in the village",
}
_DEMO_PARTICLES = ("MY", "NOT", "AGAIN")
DEMO_LEXICON = (
    tuple(_DEMO_SUBJECTS) + tuple(_DEMO_VERBS) + tuple(_DEMO_OBJECTS) + _DEMO_ADJECTIVES + _DEMO_NUMBERS
    + tuple(_DEMO_TIMES) + tuple(_DEMO_PLACES) + _DEMO_PARTICLES
)


@dataclass(frozen=True)
class DemoSign:
    """A lexicon entry: its sign-state ids and the base duration of each state in frames."""

    gloss: str
    state_ids: Tuple[int, ...]
    durations: Tuple[int, ...]


def build_demo_lexicon(seed: int) -> Tuple[Dict[str, DemoSign], np.ndarray]:
    """Give every demo gloss 2-4 consecutive sign states with base durations of 2-6 frames.

    Returns the lexicon and ``gloss_of_state`` [num_states] (state 0 is silence, gloss -1).
    """
    rng = keyed_rng(seed, _TAG_DEMO_LEXICON, 0)
    lexicon: Dict[str, DemoSign] = {}
    gloss_of_state = [-1]
    for gloss_index, gloss in enumerate(DEMO_LEXICON):
        num_states = int(rng.integers(2, 5))
        first = len(gloss_of_state)
        state_ids = tuple(range(first, first + num_states))
        durations = tuple(int(d) for d in rng.integers(2, 7, size=num_states))
        lexicon[gloss] = DemoSign(gloss, state_ids, durations)
        gloss_of_state.extend([gloss_index] * num_states)
    return lexicon, np.asarray(gloss_of_state, dtype=np.int64)


def sample_demo_sentence(rng: np.random.Generator) -> Tuple[str, List[str]]:
    """Draw one English sentence and its sign sequence.

    English order is time, subject, verb, object, place. The signed order follows a fixed
    sign-language-like rule instead: time, place, subject, object (adjective and numeral after the
    noun), verb, then negation and "again" at the end. Articles and auxiliaries have no sign.
    """
    time_sign = str(rng.choice(list(_DEMO_TIMES))) if rng.random() < 0.35 else None
    tense = _DEMO_TIMES[time_sign][1] if time_sign else "present"
    subject = str(rng.choice(_DEMO_SUBJECTS))
    determiner = str(rng.choice(["the", "my", "a"]))
    verb = str(rng.choice(list(_DEMO_VERBS)))
    negated = rng.random() < 0.2
    has_object = verb not in _DEMO_INTRANSITIVE or rng.random() < 0.6
    place = str(rng.choice(list(_DEMO_PLACES))) if rng.random() < 0.3 else None
    again = rng.random() < 0.1

    base, third_person, past = _DEMO_VERBS[verb]
    if tense == "past":
        verb_words = ["did", "not", base] if negated else [past]
    elif tense == "future":
        verb_words = ["will", "not", base] if negated else ["will", base]
    else:
        verb_words = ["does", "not", base] if negated else [third_person]

    words = [determiner, subject.lower()] + verb_words
    subject_signs = [subject]
    if determiner == "my":
        subject_signs.insert(0, "MY")
    object_signs: List[str] = []
    if has_object:
        noun = str(rng.choice(_DEMO_VERB_OBJECTS[verb]))
        adjective = str(rng.choice(_DEMO_ADJECTIVES)) if rng.random() < 0.35 else None
        number = str(rng.choice(_DEMO_NUMBERS)) if rng.random() < 0.2 else None
        singular, plural = _DEMO_OBJECTS[noun]
        noun_phrase = [plural if number else singular]
        object_signs = [noun]
        if adjective:
            noun_phrase.insert(0, adjective.lower())
            object_signs.append(adjective)
        if number:
            words += [number.lower()] + noun_phrase
            object_signs.append(number)
        else:
            article = str(rng.choice(["a", "the"]))
            if article == "a" and noun_phrase[0][0] in "aeiou":
                article = "an"
            words += [article] + noun_phrase
    if place:
        words += _DEMO_PLACES[place].split()
    if again:
        words.append("again")
    if time_sign:
        words = _DEMO_TIMES[time_sign][0].split() + words

    signs: List[str] = []
    if time_sign:
        signs.append(time_sign)
    if place:
        signs.append(place)
    signs += subject_signs + object_signs + [verb]
    if negated:
        signs.append("NOT")
    if again:
        signs.append("AGAIN")
    text = " ".join(words)
    return text[0].upper() + text[1:], signs


def demo_video_states(
    signs: Sequence[str], lexicon: Dict[str, DemoSign], video_name: str, signer: str, seed: int,
    min_frames: int, max_frames: int,
) -> np.ndarray:
    """Lay out the per-frame sign-state ids [T] of one signed performance of ``signs``.

    The signer's tempo (0.8-1.25) and a per-state jitter (0.7-1.35) stretch the base durations;
    silence frames (state 0) open and close the video and sit between some signs. A sequence whose
    length falls outside [min_frames, max_frames] is resampled (nearest frame) to the nearest bound,
    so a short bound can drop states.
    """
    tempo = keyed_rng(seed, _TAG_DEMO_TIMING, string_key(signer)).uniform(0.8, 1.25)
    rng = keyed_rng(seed, _TAG_DEMO_TIMING, string_key(video_name))
    frames: List[int] = [0] * int(rng.integers(2, 7))
    for index, gloss in enumerate(signs):
        if index:
            frames += [0] * int(rng.integers(0, 4))
        sign = lexicon[gloss]
        for state, base in zip(sign.state_ids, sign.durations):
            frames += [state] * max(1, int(round(base * tempo * rng.uniform(0.7, 1.35))))
    frames += [0] * int(rng.integers(2, 7))

    states = np.asarray(frames, dtype=np.int64)
    target = int(np.clip(states.size, min_frames, max_frames))
    if target != states.size:
        states = states[np.floor(np.arange(target) * states.size / target).astype(np.int64)]
    return states


def build_demo_corpus(
    args: argparse.Namespace, lexicon: Dict[str, DemoSign],
) -> Tuple[Dict[str, dict], List[VideoTask]]:
    """Draw disjoint sentences per split and 1..max videos per sentence by distinct signers.

    Returns ``{split: {sentence_id: [{'text', 'video_name', 'num_frames'}, ...]}}`` and the video tasks.
    """
    rng = keyed_rng(args.seed, _TAG_DEMO_SENTENCES, 0)
    split_sizes = {"train": args.train_sentences, "dev": args.dev_sentences, "test": args.test_sentences}
    requested = sum(split_sizes.values())
    sentences: Dict[str, List[str]] = {}
    attempts = 0
    while len(sentences) < requested:
        attempts += 1
        if attempts > 200 * requested + 1000:
            raise ValueError(f"the demo grammar produced only {len(sentences)} distinct sentences of "
                             f"{args.min_words}-{args.max_words} words; request fewer sentences")
        text, signs = sample_demo_sentence(rng)
        if args.min_words <= len(text.split()) <= args.max_words and text not in sentences:
            sentences[text] = signs

    annotations: Dict[str, dict] = {split: {} for split in split_sizes}
    tasks: List[VideoTask] = []
    items = list(sentences.items())
    sentence_index = 0
    for split, size in split_sizes.items():
        for text, signs in items[sentence_index:sentence_index + size]:
            sentence_id = f"S{sentence_index:06d}"
            sentence_index += 1
            num_videos = int(rng.integers(args.min_videos, args.max_videos + 1))
            signers = rng.choice(args.num_signers, size=num_videos, replace=False)
            entries = []
            for signer_index in sorted(int(s) for s in signers):
                signer = f"P{signer_index:04d}"
                video_name = f"{sentence_id}_{signer}_T00"
                states = demo_video_states(
                    signs, lexicon, video_name, signer, args.seed, args.min_frames, args.max_frames,
                )
                entries.append({"text": text, "video_name": video_name, "num_frames": int(states.size)})
                tasks.append(VideoTask(split, video_name, video_name, signer, states))
            annotations[split][sentence_id] = entries
    return annotations, tasks


def run_demo(args: argparse.Namespace, config: SurrogateConfig) -> WriteSummary:
    lexicon, gloss_of_state = build_demo_lexicon(args.seed)
    annotations, tasks = build_demo_corpus(args, lexicon)
    annotation_dir = Path(args.out) / "annotations"
    annotation_dir.mkdir(parents=True, exist_ok=True)
    for split, entries in annotations.items():
        with open(annotation_dir / f"{split}.pkl", "wb") as handle:
            pickle.dump(entries, handle, protocol=4)
        logger.info("%s: %d sentences, %d videos -> %s", split, len(entries),
                    sum(len(videos) for videos in entries.values()), annotation_dir / f"{split}.pkl")

    stream_roots = {stream: Path(args.out) / "features" / stream for stream in STREAMS}
    job = WriteJob(config, gloss_of_state, stream_roots, args.skip_existing)
    start = time.perf_counter()
    summary = write_videos(tasks, job, args.workers)
    log_summary(summary, time.perf_counter() - start, stream_roots)
    return summary


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _common_parser() -> argparse.ArgumentParser:
    defaults = SurrogateConfig()
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("output and feature model")
    group.add_argument("--out", required=True, help="output folder (created if missing)")
    group.add_argument("--seed", type=int, default=defaults.seed, help="non-negative seed of every random draw")
    group.add_argument("--dim", type=int, default=defaults.dim, help="feature width per clip (I3D: 1024)")
    group.add_argument("--latent_dim", type=int, default=defaults.latent_dim,
                       help="width of the latent sign-state, signer and frame vectors")
    group.add_argument("--state_scale", type=float, default=defaults.state_scale,
                       help="std of a state's own offset added to its gloss vector (gloss vectors have std 1)")
    group.add_argument("--signer_scale", type=float, default=defaults.signer_scale,
                       help="std of the latent per-signer offset")
    group.add_argument("--frame_noise", type=float, default=defaults.frame_noise,
                       help="std of the latent per-frame noise, shared by both streams")
    group.add_argument("--aware_noise", type=float, default=defaults.aware_noise,
                       help="per-clip noise std of the domain-aware stream "
                            "(the noise-free signal has std about 0.56 with the other defaults)")
    group.add_argument("--agnostic_noise", type=float, default=defaults.agnostic_noise,
                       help="per-clip noise std of the domain-agnostic stream")
    group.add_argument("--workers", type=int, default=1, help="worker processes (1 = run in this process)")
    group.add_argument("--skip_existing", action="store_true",
                       help="keep videos whose two stream files already exist (to resume an interrupted run)")
    group.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING"], help="logging level")
    return parser


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser with the ``phoenix`` and ``demo`` sub-commands."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="mode", required=True)
    common = _common_parser()

    phoenix = subparsers.add_parser(
        "phoenix", parents=[common], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="features from PHOENIX-2014T sign-state alignments",
        description="Write <out>/ph_domain_{agnostic,aware}/<split>/<video_id>.pkl for every aligned video.",
    )
    phoenix.add_argument(
        "--alignments", nargs="+", required=True,
        help="alignment files in JSON lines, optionally gzipped, e.g. "
             f"{' and '.join(DEFAULT_ALIGNMENT_FILES)}",
    )
    phoenix.add_argument("--limit", type=int, default=None, help="write only the first N videos of each file")
    phoenix.add_argument("--states_per_gloss", type=int, default=3,
                         help="consecutive state ids that form one gloss (1 = no gloss sharing)")

    demo = subparsers.add_parser(
        "demo", parents=[common], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="a small invented corpus with annotations and features",
        description="Write <out>/annotations/{train,dev,test}.pkl and <out>/features/domain_{agnostic,aware}/<split>/.",
    )
    demo.add_argument("--train_sentences", type=int, default=600, help="sentences in the train split")
    demo.add_argument("--dev_sentences", type=int, default=100, help="sentences in the dev split")
    demo.add_argument("--test_sentences", type=int, default=100, help="sentences in the test split")
    demo.add_argument("--min_videos", type=int, default=1, help="minimum videos per sentence")
    demo.add_argument("--max_videos", type=int, default=3, help="maximum videos per sentence")
    demo.add_argument("--num_signers", type=int, default=8, help="number of demo signers")
    demo.add_argument("--min_frames", type=int, default=40,
                      help="minimum frames per video (shorter ones are stretched)")
    demo.add_argument("--max_frames", type=int, default=120,
                      help="maximum frames per video (longer ones are squeezed)")
    demo.add_argument("--min_words", type=int, default=3, help="minimum English words per sentence")
    demo.add_argument("--max_words", type=int, default=8, help="maximum English words per sentence")
    return parser


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit through ``parser.error`` (status 2) when flag values are out of range."""
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.mode == "phoenix":
        if args.limit is not None and args.limit < 1:
            parser.error(f"--limit must be >= 1, got {args.limit}")
        if args.states_per_gloss < 1:
            parser.error(f"--states_per_gloss must be >= 1, got {args.states_per_gloss}")
        return
    if not 1 <= args.min_videos <= args.max_videos <= args.num_signers:
        parser.error("need 1 <= --min_videos <= --max_videos <= --num_signers, got "
                     f"{args.min_videos}, {args.max_videos}, {args.num_signers}")
    if not 1 <= args.min_frames <= args.max_frames:
        parser.error(f"need 1 <= --min_frames <= --max_frames, got {args.min_frames}, {args.max_frames}")
    if not 1 <= args.min_words <= args.max_words:
        parser.error(f"need 1 <= --min_words <= --max_words, got {args.min_words}, {args.max_words}")
    if min(args.train_sentences, args.dev_sentences, args.test_sentences) < 1:
        parser.error("every split needs at least one sentence (--train_sentences, --dev_sentences, --test_sentences)")


def main(argv: Optional[Sequence[str]] = None) -> WriteSummary:
    """Parse ``argv`` (default: ``sys.argv[1:]``), write the files and return the write summary."""
    parser = build_parser()
    args = parser.parse_args(argv)
    validate_args(parser, args)
    logging.basicConfig(level=args.log_level, format="%(asctime)s | %(levelname)s | %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S")
    logger.setLevel(args.log_level)

    config = SurrogateConfig(
        seed=args.seed, dim=args.dim, latent_dim=args.latent_dim, state_scale=args.state_scale,
        signer_scale=args.signer_scale, frame_noise=args.frame_noise, aware_noise=args.aware_noise,
        agnostic_noise=args.agnostic_noise,
    )
    logger.info("mode %s, feature model %s", args.mode, asdict(config))
    if args.mode == "phoenix":
        return run_phoenix(args, config)
    return run_demo(args, config)


if __name__ == "__main__":
    main()
