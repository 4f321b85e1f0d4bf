"""Answers kept on disk, one JSON file per request key: `<dir>/<first 2 hex>/<key>.json`, written atomically.

One layout for every cache of a run (LLM answers, embeddings, custom-action answers); each kind says what a sound
entry looks like. Kept free of heavy imports (yamlio's ruamel is light): the action cache is used by commands that
never load the LLM client.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from recipe.yamlio import write_atomic

log = logging.getLogger("recipe")


class JsonCache:
    """A directory of answers by key; `check_answer` raises TypeError for an entry of the wrong shape."""

    kind = "cache"  # named in the warning about an unreadable entry
    json_default: Callable[[Any], Any] | None = None  # how values JSON cannot hold are written (None: refused)

    def __init__(self, directory: Path):
        self.directory = directory

    def path_for(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def check_answer(self, answer: Any) -> None:
        if not isinstance(answer, dict):
            raise TypeError("bad answer")

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored answer, or None when absent or unreadable (a corrupted entry is a miss and gets rewritten)."""
        path = self.path_for(key)
        try:
            answer = json.loads(path.read_text(encoding="utf-8"))["answer"]
            self.check_answer(answer)
            return answer
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("ignoring unreadable %s entry %s: %s", self.kind, path, error)
            return None

    def put(self, key: str, request: Mapping[str, Any], answer: Mapping[str, Any]) -> None:
        # Encoded in one piece and written at once (json.dump to a file writes every token on its own); readers see
        # no file or a complete one.
        text = json.dumps(
            {"key": key, "request": request, "answer": answer}, ensure_ascii=False, default=self.json_default
        )
        write_atomic(self.path_for(key), text)
