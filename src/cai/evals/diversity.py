"""Word n-gram overlap between prompts, and the diversity of a set of prompts.

Texts are compared after `normalise` (lower case, punctuation to spaces, whitespace collapsed), as
sets of word n-grams (`shingles`): the overlap of two texts is the Jaccard index of their sets, 1.0
for texts that normalise the same. `OverlapIndex` finds, among the texts added to it, the one that
overlaps a new text most, looking only at texts that share an n-gram with it, so that checking each
of N texts against all earlier ones costs far less than N² comparisons when they share little.

The diversity of a set (`diversity`):

- `distinct_n`: distinct word n-grams over all n-grams in the set (Li et al. 2016), for n = 1, 2, 3;
  it falls as a set grows, so compare sets of similar size;
- `self_similarity_1`, `self_similarity_3`: the mean overlap of word sets and of word 3-grams over
  every pair of texts in the set (0: no two share one; 1: all the same). Distinct requests rarely
  share a 3-gram, so the word-set figure is the one that moves; the 3-gram one is the measure the
  near-duplicate check uses.

    cai redteam generate redteam.per_category=4   # reports both for the generated prompts and the seeds
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

Shingles = frozenset[tuple[str, ...]]


def normalise(text: str) -> str:
    """Lower case, punctuation to spaces, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def shingles(text: str, n: int = 3) -> Shingles:
    """The word n-grams of the normalised text; a text of fewer than `n` words is one n-gram of all
    its words (so it still matches itself), and an empty text has none."""
    words = normalise(text).split()
    if len(words) < n:
        return frozenset([tuple(words)]) if words else frozenset()
    return frozenset(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def jaccard(a: Shingles, b: Shingles) -> float:
    """|a ∩ b| / |a ∪ b|; 0.0 when both are empty."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


class OverlapIndex:
    """Texts under keys, indexed by their word n-grams, to find the most overlapping one fast."""

    def __init__(self, n: int = 3):
        self.n = n
        self._sets: dict[Hashable, Shingles] = {}
        self._exact: dict[str, Hashable] = {}
        self._postings: dict[tuple[str, ...], list[Hashable]] = {}

    def __len__(self) -> int:
        return len(self._sets)

    def add(self, key: Hashable, text: str) -> None:
        """Add `text` under `key` (a key given twice keeps its first text)."""
        if key in self._sets:
            return
        s = shingles(text, self.n)
        self._sets[key] = s
        self._exact.setdefault(normalise(text), key)
        for g in s:
            self._postings.setdefault(g, []).append(key)

    def exact(self, text: str) -> Hashable | None:
        """The key of a text that normalises the same as `text`, or None."""
        return self._exact.get(normalise(text))

    def nearest(self, text: str) -> tuple[Hashable | None, float]:
        """(key, overlap) of the added text that overlaps `text` most; (None, 0.0) when none shares
        an n-gram with it. A text that normalises the same wins with 1.0."""
        same = self.exact(text)
        if same is not None:
            return same, 1.0
        s = shingles(text, self.n)
        shared: Counter[Hashable] = Counter(k for g in s for k in self._postings.get(g, ()))
        best: tuple[Hashable | None, float] = (None, 0.0)
        for key, common in shared.items():
            # |a ∩ b| is `common`; the union follows from the two sizes, so no set is rebuilt.
            score = common / (len(s) + len(self._sets[key]) - common)
            if score > best[1]:
                best = (key, score)
        return best


def distinct_n(texts: Iterable[str], n: int) -> float | None:
    """Distinct word n-grams over all word n-grams of the normalised texts; None when there are none."""
    total = 0
    seen: set[tuple[str, ...]] = set()
    for text in texts:
        words = normalise(text).split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else None


def self_similarity(texts: Sequence[str], n: int = 3) -> float | None:
    """The mean Jaccard overlap of word n-grams over all pairs of `texts`; None under two texts.
    Exact: pairs that share no n-gram count 0, and only pairs that share one are compared."""
    if len(texts) < 2:
        return None
    sets = [shingles(t, n) for t in texts]
    postings: dict[tuple[str, ...], list[int]] = {}
    for i, s in enumerate(sets):
        for g in s:
            postings.setdefault(g, []).append(i)
    total = 0.0
    for i, s in enumerate(sets):
        common = Counter(j for g in s for j in postings[g] if j > i)
        total += sum(c / (len(s) + len(sets[j]) - c) for j, c in common.items())
    pairs = len(texts) * (len(texts) - 1) / 2
    return total / pairs


def diversity(texts: Sequence[str]) -> dict[str, Any]:
    """The diversity figures of a set of texts: its size, mean length in words, distinct-1/2/3 and
    self-similarity of word sets and of word 3-grams."""
    words = [len(normalise(t).split()) for t in texts]
    return {
        "prompts": len(texts),
        "mean_words": sum(words) / len(words) if words else None,
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "distinct_3": distinct_n(texts, 3),
        "self_similarity_1": self_similarity(texts, 1),
        "self_similarity_3": self_similarity(texts, 3),
    }
