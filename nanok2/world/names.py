"""Seeded syllable names, so that every world has its own people, places and organisations.

A small model cannot know the real world, and it must not learn answers by heart either: names are
built from random syllables, so that a fact learned in one world is useless in another. The
distinctive word of every name has three syllables drawn from 840 (about 10^8 words once the
weighting toward open syllables is counted), so two worlds of a few thousand entities share a name
with a probability of roughly 10^-4; `tests/test_world.py` checks that several seeds share none.
"""
from __future__ import annotations

import random

ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
          "th", "sh", "dr", "kr", "tr", "br", "gl", "st", "vr")
VOWELS = ("a", "e", "i", "o", "u")
# Open syllables are likelier: names stay pronounceable and short.
CODAS = ("", "", "", "", "n", "r", "l", "s", "m", "k")


class NameMaker:
    """Draws names unique within one world: no two names share a generated word, so each is a search key."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.words: set[str] = set()  # every generated word handed out so far, lowercase

    def word(self, syllables: int) -> str:
        parts = [self.rng.choice(ONSETS) + self.rng.choice(VOWELS) + self.rng.choice(CODAS)
                 for _ in range(syllables)]
        return "".join(parts).capitalize()

    def unique(self, pattern: str, **syllables: int) -> str:
        """`pattern` with each `{field}` filled by a fresh word of that many syllables."""
        while True:
            fresh = {field: self.word(n) for field, n in syllables.items()}
            lowered = {w.lower() for w in fresh.values()}
            if len(lowered) == len(fresh) and not lowered & self.words:
                self.words |= lowered
                return pattern.format(**fresh)

    def twin(self, name: str) -> str | None:
        """A near-miss of `name`: one vowel of one generated word changed (Tolvaris -> Tolveris)."""
        words = name.split()
        spots = [i for i, w in enumerate(words) if w.lower() in self.words]
        for _ in range(10):
            idx = self.rng.choice(spots)
            word = words[idx]
            i = self.rng.choice([j for j, ch in enumerate(word) if ch.lower() in VOWELS])
            vowel = self.rng.choice([v for v in VOWELS if v != word[i].lower()])
            changed = (word[:i] + vowel + word[i + 1:]).capitalize()
            if changed.lower() not in self.words:
                self.words.add(changed.lower())
                return " ".join(words[:idx] + [changed] + words[idx + 1:])
        return None
