"""CLIP BPE tokenisation at a fixed length, and the random-swap text augmentation used in training."""

from __future__ import annotations

import functools
import random

import numpy as np
from open_clip.tokenizer import SimpleTokenizer

SOT_ID = 49406
EOT_ID = 49407
PAD_ID = 0

# Failed redraws of the second index after which random_swap leaves the text unchanged.
MAX_SWAP_REDRAWS = 4


@functools.lru_cache(maxsize=1)
def _bpe_tokenizer() -> SimpleTokenizer:
    """Build the CLIP BPE tokenizer once per process from the vocabulary shipped with open_clip."""
    return SimpleTokenizer()


class ClipTokenizer:
    """CLIP BPE tokenizer with the retrieval rule for long texts.

    ``encode`` returns ``[SOT] + BPE ids + [EOT]`` zero-padded to ``max_words``. A text whose SOT
    plus BPE ids number more than ``max_words - 1`` is subsampled uniformly rather than truncated,
    so the end of the sentence is kept. The open_clip tokenizer is built lazily per process and is
    not part of the pickled state, so instances are cheap to send to DataLoader workers.
    """

    def __init__(self, max_words: int = 32) -> None:
        if max_words < 3:
            raise ValueError(f"max_words must be at least 3 (SOT, one token, EOT), got {max_words}")
        self.max_words = max_words
        self.sot_id = SOT_ID
        self.eot_id = EOT_ID

    def __repr__(self) -> str:
        return f"ClipTokenizer(max_words={self.max_words})"

    def encode(self, text: str) -> np.ndarray:
        """Tokenise one text into int64 ids of shape [max_words].

        The BPE step cleans the text (ftfy, HTML unescaping, whitespace) and lower-cases it. With
        ids = [SOT] + BPE ids of length n > max_words - 1, SOT is kept plus the positions
        ``floor(linspace(1, n - 1, max_words - 2))``, which always include the last BPE id.
        """
        tokenizer = _bpe_tokenizer()
        if tokenizer.sot_token_id != SOT_ID or tokenizer.eot_token_id != EOT_ID:
            raise RuntimeError(
                f"the installed open_clip vocabulary has SOT={tokenizer.sot_token_id}, EOT={tokenizer.eot_token_id}; "
                f"expected {SOT_ID} and {EOT_ID} of the CLIP BPE vocabulary (open_clip_torch 3.3.0 has them)"
            )

        ids = [SOT_ID] + tokenizer.encode(text)
        if len(ids) > self.max_words - 1:
            positions = np.linspace(1, len(ids) - 1, self.max_words - 2).astype(np.int64)
            ids = [SOT_ID] + [ids[position] for position in positions]
        ids.append(EOT_ID)

        encoded = np.full(self.max_words, PAD_ID, dtype=np.int64)
        encoded[:len(ids)] = ids
        return encoded


def random_swap(text: str, rng: random.Random) -> str:
    """Swap two randomly chosen words of a whitespace-split text (EDA random swap, n = 1).

    The second index is redrawn while it equals the first. After ``MAX_SWAP_REDRAWS`` failed draws,
    and for a text of fewer than two words, the text is returned unchanged. A swapped text is
    joined with single spaces.
    """
    words = text.split()
    if len(words) < 2:
        return text

    first = rng.randint(0, len(words) - 1)
    for _ in range(MAX_SWAP_REDRAWS):
        second = rng.randint(0, len(words) - 1)
        if second != first:
            words[first], words[second] = words[second], words[first]
            return " ".join(words)
    return text


def augment_text(text: str, rng: random.Random, p: float = 0.5) -> str:
    """Apply ``random_swap`` with probability ``p``, else return the text unchanged.

    The draw is ``rng.random() > 1 - p``, which for p = 0.5 is the released rule ``random() > 0.5``.
    """
    if p <= 0.0:
        return text
    if p >= 1.0 or rng.random() > 1.0 - p:
        return random_swap(text, rng)
    return text
