import pickle
import random
from collections import Counter

import numpy as np
import open_clip
import pytest

from dataloaders.text import EOT_ID, SOT_ID, ClipTokenizer, augment_text, random_swap

COLOURS = "red green blue yellow black white orange purple"


def reference_ids(text: str) -> list[int]:
    """Return SOT + BPE ids + EOT from open_clip's module-level tokenize, without truncation."""
    ids = open_clip.tokenize([text], context_length=200)[0].tolist()
    return ids[:ids.index(EOT_ID) + 1]


class FixedRandom:
    """Stand-in for random.Random that returns scripted values."""

    def __init__(self, integers: list[int], floats: list[float] = ()) -> None:
        self.integers = list(integers)
        self.floats = list(floats)

    def randint(self, low: int, high: int) -> int:
        return self.integers.pop(0)

    def random(self) -> float:
        return self.floats.pop(0)


@pytest.mark.parametrize("text", [
    "Hi!",
    "And now the weather forecast for tomorrow Thursday the twelfth August",
    "  The AILERON is   the control surface &amp; it's \"moved\" left.  ",
    "He is four years old.",
])
def test_encode_matches_open_clip(text: str) -> None:
    encoded = ClipTokenizer(max_words=32).encode(text)
    expected = reference_ids(text)

    assert encoded.dtype == np.int64
    assert encoded.shape == (32,)
    assert encoded[:len(expected)].tolist() == expected
    assert not encoded[len(expected):].any()


def test_encode_subsamples_uniformly() -> None:
    bpe = reference_ids(COLOURS)[1:-1]
    assert len(bpe) == 8  # each colour word is one BPE token

    # ids = [SOT, t0..t7], n = 9; linspace(1, 8, 4) = [1, 3.33, 5.67, 8] -> positions 1, 3, 5, 8.
    encoded = ClipTokenizer(max_words=6).encode(COLOURS)
    assert encoded.tolist() == [SOT_ID, bpe[0], bpe[2], bpe[4], bpe[7], EOT_ID]

    # ids = [SOT, t0..t6], n = 8; linspace(1, 7, 4) = [1, 3, 5, 7].
    seven = " ".join(COLOURS.split()[:7])
    assert ClipTokenizer(max_words=6).encode(seven).tolist() == [SOT_ID, bpe[0], bpe[2], bpe[4], bpe[6], EOT_ID]


def test_encode_boundary_lengths() -> None:
    bpe = reference_ids(COLOURS)[1:-1]
    # SOT + 4 ids + EOT fit exactly into 6 slots: no subsampling.
    four = " ".join(COLOURS.split()[:4])
    assert ClipTokenizer(max_words=6).encode(four).tolist() == [SOT_ID] + bpe[:4] + [EOT_ID]


def test_encode_long_text_keeps_ends() -> None:
    text = " ".join([COLOURS] * 5)  # 40 BPE ids
    encoded = ClipTokenizer(max_words=32).encode(text)
    bpe = reference_ids(text)[1:-1]

    assert encoded[0] == SOT_ID
    assert encoded[-1] == EOT_ID
    assert encoded[1] == bpe[0]
    assert encoded[-2] == bpe[-1]
    assert (encoded != 0).all()


def test_tokenizer_is_picklable() -> None:
    tokenizer = ClipTokenizer(max_words=16)
    tokenizer.encode("warm the cache")
    restored = pickle.loads(pickle.dumps(tokenizer))
    assert restored.encode("Hi!").tolist() == tokenizer.encode("Hi!").tolist()


def test_random_swap_preserves_words() -> None:
    text = "the quick brown fox jumps over the lazy dog"
    words = text.split()
    for seed in range(50):
        swapped = random_swap(text, random.Random(seed)).split()
        assert Counter(swapped) == Counter(words)
        assert sum(a != b for a, b in zip(swapped, words)) in (0, 2)


def test_random_swap_is_seeded() -> None:
    text = "one two three four five six"
    first = [random_swap(text, random.Random(seed)) for seed in range(20)]
    again = [random_swap(text, random.Random(seed)) for seed in range(20)]
    assert first == again
    assert len(set(first)) > 1


def test_random_swap_scripted_draws() -> None:
    assert random_swap("a b c d", FixedRandom([0, 2])) == "c b a d"
    assert random_swap("a b c d", FixedRandom([1, 1, 1, 3])) == "a d c b"
    # The first index and four equal redraws: the swap gives up.
    assert random_swap("a  b c d", FixedRandom([1, 1, 1, 1, 1, 3])) == "a  b c d"
    assert random_swap("single", FixedRandom([])) == "single"


def test_augment_text_threshold() -> None:
    assert augment_text("a b", FixedRandom([0, 1], [0.6])) == "b a"
    assert augment_text("a b", FixedRandom([0, 1], [0.5])) == "a b"
    assert augment_text("a b", FixedRandom([0, 1], [0.4])) == "a b"
    assert augment_text("a b", FixedRandom([]), p=0.0) == "a b"
    assert augment_text("a b", FixedRandom([0, 1]), p=1.0) == "b a"


def test_augment_text_rate() -> None:
    rng = random.Random(0)
    text = "one two three four five six seven eight"
    changed = sum(augment_text(text, rng, p=0.5) != text for _ in range(4000))
    # A fired swap always changes this text unless all four redraws repeat the first index (8**-4).
    assert 0.46 < changed / 4000 < 0.54
