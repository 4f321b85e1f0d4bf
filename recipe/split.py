"""Train/validation split by test case: seeded, covering, leak-free.

A greedy cover first puts into train the test cases that bring every command type, every started flow and every
set slot (each pass takes the test case adding most uncovered features; ties go to the first). The rest are shuffled
with the seed and added until train holds `train_frac` of the test cases. Paraphrases of one conversation never
cross sides, and a validation row whose prompt also appears in train is dropped.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from recipe.commands import Command, SetSlot, StartFlow


def coverage_features(commands: list[Command]) -> set[str]:
    """What a set of commands teaches: its command types, the flows it starts and the slots it sets."""
    features = set()
    for command in commands:
        features.add(f"type:{command.kind}")
        if isinstance(command, StartFlow):
            features.add(f"flow:{command.flow}")
        elif isinstance(command, SetSlot):
            features.add(f"slot:{command.slot}")
    return features


@dataclass
class Split:
    train: list[str]  # test case ids, input order
    validation: list[str]
    cover: list[str]  # the test cases the greedy cover put into train
    validation_lacks: list[str] = field(default_factory=list)  # features in train that validation never exercises


def split_test_cases(features: dict[str, set[str]], train_frac: float, seed: int) -> Split:
    """`features`: test case id -> coverage features, in input order."""
    order = list(features)
    uncovered = set().union(*features.values()) if features else set()
    cover: list[str] = []
    remaining = list(order)
    while uncovered:
        best = max(remaining, key=lambda case: len(features[case] & uncovered))  # max() keeps the first on ties
        gain = features[best] & uncovered
        if not gain:
            break
        cover.append(best)
        remaining.remove(best)
        uncovered -= gain
    target = max(len(cover), math.floor(len(order) * train_frac + 1e-9))
    rng = random.Random(seed)
    rng.shuffle(remaining)
    chosen = set(cover) | set(remaining[: max(0, target - len(cover))])
    train = [case for case in order if case in chosen]
    validation = [case for case in order if case not in chosen]
    in_train = set().union(*(features[c] for c in train)) if train else set()
    in_validation = set().union(*(features[c] for c in validation)) if validation else set()
    return Split(train=train, validation=validation, cover=cover, validation_lacks=sorted(in_train - in_validation))
