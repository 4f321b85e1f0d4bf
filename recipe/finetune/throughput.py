"""Training speed as the card and the bench report it: non-padding tokens per second of training (evaluations
excluded) and the padding share of the train batches. Imports transformers: import this only after Unsloth.
"""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback


class ThroughputCallback(TrainerCallback):
    """Seconds spent training (without the evaluations) and non-padding tokens trained on, in this session.

    Needs `include_num_input_tokens_seen="non_padding"` in the training arguments.
    """

    def __init__(self) -> None:
        self.started = 0.0
        self.eval_seconds = 0.0
        self.train_seconds = 0.0
        self.tokens_at_start = 0
        self.tokens = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.perf_counter()
        self.tokens_at_start = state.num_input_tokens_seen  # non-zero when resuming

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None, **kwargs: Any
    ) -> None:
        self.eval_seconds += (metrics or {}).get("eval_runtime", 0.0)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.train_seconds = time.perf_counter() - self.started - self.eval_seconds
        self.tokens = state.num_input_tokens_seen - self.tokens_at_start

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0


def padding_share(trainer: Any) -> float:
    """Share of padding in one epoch of train batches, as the trainer's own sampler and collator build them."""
    real = total = 0
    for batch in trainer.get_train_dataloader():
        real += int(batch["attention_mask"].sum())
        total += batch["input_ids"].numel()
    return 1 - real / total if total else 0.0
