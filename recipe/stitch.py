"""Stitching: new conversations from the passing paraphrases, and the prompt/completion rows of every conversation.

Synthetic conversation i takes, for every user turn, its i-th passing paraphrase (cycling when a turn has fewer) or
the original words when it has none; M = the most passing paraphrases any turn has. Every synthetic conversation is
replayed through the tracker, so each prompt's history and state match its own wording. A button-payload turn
updates the state but yields no row (it never reaches the command generator).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from recipe.annotate import TestAnnotation
from recipe.commands import CannotHandle, Command
from recipe.conversation import replay_test_case, state_disagrees
from recipe.project import Project
from recipe.prompt import PromptRenderer, prompt_variables
from recipe.types import TestCase
from recipe.validate import Verdict


@dataclass(frozen=True)
class Row:
    test_id: str
    turn: int
    variant: int  # 0: the original conversation; i > 0: synthetic conversation i
    prompt: str
    commands: tuple[Command, ...]
    original_text: str
    rephrased_text: str | None


def conversation_rows(
    project: Project,
    renderer: PromptRenderer,
    test_case: TestCase,
    annotation: TestAnnotation,
    passing: dict[int, list[Verdict]],
    when: datetime | None,
    abstention: bool = False,
    keep_disagreeing: bool = False,
) -> tuple[list[Row], int]:
    """Rows of the original conversation, then of each synthetic one.

    All variants share the conversation's date, so a turn whose prompt no paraphrase changed is an exact duplicate
    of the original row and deduplication removes it. With `abstention`, a turn annotated with no command at all
    yields a `cannot handle` row, so the model also learns when to abstain. A turn whose state the test
    contradicts (the replay disagreed with the test's bot turns or assertions after the previous turn) yields no
    row unless `keep_disagreeing`; returns the rows and how many were left out so.
    """
    variants = max((len(verdicts) for verdicts in passing.values()), default=0)
    rows: list[Row] = []
    disagreeing = 0
    for variant in range(variants + 1):
        chosen = {turn: verdicts[(variant - 1) % len(verdicts)] for turn, verdicts in passing.items() if verdicts}
        if variant == 0:
            chosen = {}

        def commands_for(number: int, _step, chosen=chosen) -> list[Command] | None:
            if number in chosen and chosen[number].label is not None:
                return list(chosen[number].label)
            return annotation.commands_for(number, _step)

        texts = {turn: verdict.text for turn, verdict in chosen.items()}
        turns = replay_test_case(project, test_case, commands_for, texts)
        for turn in turns:
            if not annotation.turns[turn.number - 1].trains:
                continue  # a payload or NLU turn: it changes the state, but the command generator never answers it
            if not keep_disagreeing and state_disagrees(turns, turn.number):
                disagreeing += 1
                continue
            label = commands_for(turn.number, turn.step)
            if label == [] and abstention:
                label = [CannotHandle()]
            if turn.is_payload or not label:
                continue
            prompt = renderer.render(prompt_variables(project, turn.state, turn.text, when))
            rows.append(
                Row(
                    test_id=test_case.id,
                    turn=turn.number,
                    variant=variant,
                    prompt=prompt,
                    commands=tuple(label),
                    original_text=turn.step.text,
                    rephrased_text=turn.text if turn.number in chosen else None,
                )
            )
    return rows, disagreeing
