"""A scripted "LLM" for prepare-data tests: rephraser, teacher and oracle answers computed from the test files.

The rephraser answers with JSON paraphrases of the messages listed in our rephrase prompt; the teacher and the oracle
read the latest user message from the command prompt and answer with the commands that message really carries
(the test's own commands, or those derived from its assertions). A paraphrase starting with `Actually ` changes a
slot value on purpose: the oracle then answers with the changed value, so strict validation must reject it.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from recipe.annotate import annotate_from_assertions
from recipe.commands import SetSlot, Syntax, format_commands
from recipe.project import Project
from recipe.testcases import all_test_cases, load_tests
from recipe.testing.openai_server import Reply, prompt_of

_LISTED = re.compile(r"^(\d+)\. (.*)$")
_LATEST = re.compile(r'"""(.*)"""', re.DOTALL)

CHANGED_VALUE = "changed-on-purpose"


def paraphrases_of(text: str) -> list[str]:
    """Three paraphrases: two faithful ones and one that changes a value."""
    return [f"well, {text}", f"{text} if that works", f"Actually {text}"]


def commands_by_text(project: Project, specs: list[str]) -> dict[str, list]:
    table: dict[str, list] = {}
    for case in all_test_cases(load_tests(specs, project)):
        annotation = annotate_from_assertions(project, case)
        for turn, step in zip(annotation.turns, case.user_steps):
            if turn.commands:
                table.setdefault(step.text, list(turn.commands))
    return table


def rephrase_listing(prompt: str) -> list[tuple[int, str]]:
    body = prompt.split("Paraphrase each of these", 1)[1].split("Rules:", 1)[0]
    return [(int(m.group(1)), m.group(2)) for line in body.splitlines() if (m := _LISTED.match(line.strip()))]


class ScriptedAssistantLLM:
    """The responder. `faults` may return a Reply to inject for a request (kind, prompt, hit number) or None."""

    def __init__(
        self,
        project: Project,
        specs: list[str],
        syntax: Syntax = Syntax.V2,
        faults: Callable[[str, str, int], Reply | None] | None = None,
    ):
        self.syntax = syntax
        self.originals = commands_by_text(project, specs)
        self.paraphrases: dict[str, list] = {}
        for text, commands in self.originals.items():
            for paraphrase in paraphrases_of(text):
                if paraphrase.startswith("Actually "):
                    commands = [
                        SetSlot(c.slot, CHANGED_VALUE) if isinstance(c, SetSlot) and c.value else c for c in commands
                    ]
                self.paraphrases[paraphrase] = commands
        self.faults = faults
        self.kinds: Counter = Counter()
        self._lock = threading.Lock()

    def __call__(self, request: dict) -> Reply:
        prompt = prompt_of(request) or ""
        kind = "rephrase" if "Paraphrase each of these" in prompt else "commands"
        with self._lock:
            self.kinds[kind] += 1
            hit = self.kinds[kind]
        if self.faults is not None:
            injected = self.faults(kind, prompt, hit)
            if injected is not None:
                return injected
        if kind == "rephrase":
            listed = rephrase_listing(prompt)
            answer = {"rephrasings": [{"id": i, "texts": paraphrases_of(text)} for i, text in listed]}
            return Reply.text(json.dumps(answer))
        match = _LATEST.search(prompt.rsplit("## Latest user message", 1)[-1])
        latest = match.group(1) if match else ""
        commands = self.paraphrases.get(latest, self.originals.get(latest))
        if commands is None:
            return Reply.text("cannot handle")
        return Reply.text(format_commands(commands, self.syntax))


def write_llm_config(path: Path, base_url: str, timeout: float = 5.0) -> Path:
    path.write_text(
        "llm:\n  provider: self-hosted\n  model: scripted-model\n"
        f"  api_base: {base_url}\n  timeout: {timeout}\n  temperature: 0.0\n",
        encoding="utf-8",
    )
    return path
