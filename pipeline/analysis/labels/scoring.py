"""Detection and fuzzing: which excerpts a scorer sees, in which order, and what its answers score.

Detection shows as many non-activating excerpts as activating ones, unmarked, in a seeded random order. Fuzzing shows
activating excerpts only, all marked: half at the tokens where the feature fires, half at as many tokens where it does
not; the answer is right when it says which. In both, the order comes from one permutation drawn independently of
which excerpt is which, so nothing but the text tells them apart."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .examples import Excerpt


@dataclass(frozen=True)
class Item:
    excerpt: Excerpt
    truth: int                 # 1: activating (detection) / correctly marked (fuzzing)
    marks: tuple[bool, ...] | None  # tokens to mark, None for an unmarked excerpt


def detection_items(positives: list[Excerpt], negatives: list[Excerpt], rng: np.random.Generator) -> list[Item]:
    n = min(len(positives), len(negatives))
    items = [Item(e, 1, None) for e in positives[:n]] + [Item(e, 0, None) for e in negatives[:n]]
    return [items[i] for i in rng.permutation(len(items))]


def fuzzing_items(positives: list[Excerpt], rng: np.random.Generator) -> list[Item]:
    """Half of `positives` marked where the feature fires, half marked at as many of their zero tokens (an excerpt
    with no zero token cannot be marked wrongly and is left out of the wrong half)."""
    shuffled = [positives[i] for i in rng.permutation(len(positives))]
    right, wrong = [], []
    half = len(shuffled) // 2
    for e in shuffled:
        active = e.active
        if len(wrong) < half and (~active).any():
            zeros = np.flatnonzero(~active)
            k = min(max(int(active.sum()), 1), len(zeros))
            marks = np.zeros(len(active), bool)
            marks[rng.choice(zeros, size=k, replace=False)] = True
            wrong.append(Item(e, 0, tuple(marks.tolist())))
        elif len(right) < half:
            right.append(Item(e, 1, tuple(active.tolist())))
    n = min(len(right), len(wrong))
    items = right[:n] + wrong[:n]
    return [items[i] for i in rng.permutation(len(items))]


def batches(items: list[Item], size: int) -> list[list[Item]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@dataclass
class Tally:
    """A scorer's confusion counts over the excerpts it answered, and its malformed answers (whose excerpts count in
    neither)."""
    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0
    malformed: int = 0  # answers (requests), not excerpts
    answers: int = 0

    def add(self, truth: list[int], said: list[int] | None) -> None:
        self.answers += 1
        if said is None:
            self.malformed += 1
            return
        for t, s in zip(truth, said):
            if t and s:
                self.tp += 1
            elif t:
                self.fn += 1
            elif s:
                self.fp += 1
            else:
                self.tn += 1

    def merge(self, other: "Tally") -> "Tally":
        return Tally(**{k: getattr(self, k) + getattr(other, k) for k in asdict(self)})

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    def metrics(self) -> dict:
        """accuracy, precision, recall and F1 (positive: activating / correctly marked); None where undefined."""
        n = self.n
        precision = self.tp / (self.tp + self.fp) if self.tp + self.fp else None
        recall = self.tp / (self.tp + self.fn) if self.tp + self.fn else None
        f1 = 2 * self.tp / (2 * self.tp + self.fp + self.fn) if 2 * self.tp + self.fp + self.fn else None
        return {"accuracy": (self.tp + self.tn) / n if n else None, "precision": precision, "recall": recall,
                "f1": f1, "n": n, "malformed": self.malformed, "answers": self.answers}
