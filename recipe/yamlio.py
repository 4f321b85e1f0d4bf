"""YAML reading that keeps every object's file and line, and YAML/JSON writing that is atomic.

ruamel's round-trip loader attaches line numbers to every mapping and sequence; `line_of` reads them back (1-based)
so that every error can name `path:line`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from recipe.errors import ConfigError, InputError
from recipe.types import relative


def _reader() -> YAML:
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    return yaml


# Constructs that must be closed: when one is not, the parser notices lines later (or at the end of the file), so
# the line where it was opened is the one to show.
_UNCLOSED = {
    "while parsing a flow sequence": "a `[` list opened here is not closed",
    "while parsing a flow mapping": "a `{` mapping opened here is not closed",
    "while scanning a quoted scalar": "a quoted string opened here is not closed",
}
# The parser's token names, in words a user recognises.
_TOKEN_WORDS = {
    "<block end>": "the end of the indented block",
    "'<block sequence start>'": "a list item `-` (check the indentation)",
    "'<block mapping start>'": "a new mapping (check the indentation)",
    "'?'": "a mapping key (check the indentation)",
    "found character '\\t' that cannot start any token": "found a tab; indent YAML with spaces",
    "mapping values are not allowed here": "a `: ` inside a value starts a mapping here (quote the value)",
    "found unexpected end of stream": "reached the end of the file",
    "'<stream end>'": "the end of the file",
}


def _yaml_problem(error: MarkedYAMLError) -> tuple[int | None, str]:
    """(line, message) of a YAML syntax error, pointing where the user has to look."""
    problem = error.problem or error.context or "syntax error"
    for token, words in _TOKEN_WORDS.items():
        problem = problem.replace(token, words)
    problem_line = error.problem_mark.line + 1 if error.problem_mark is not None else None
    context_line = error.context_mark.line + 1 if error.context_mark is not None else None
    if isinstance(error, DuplicateKeyError):
        key = re.search(r'duplicate key "(.*?)" with value', problem)
        return problem_line, f"duplicate key `{key.group(1) if key else '?'}` (a key may appear once per mapping)"
    if error.context in _UNCLOSED and context_line is not None:
        where = "" if "end of the file" in problem else f" at line {problem_line}"
        return context_line, f"{_UNCLOSED[error.context]} ({problem}{where})"
    return problem_line or context_line, problem


# Aliases let a small file stand for a huge document (`a: &a [x, x]`, `b: &b [*a, *a]`, ...: the "billion laughs"):
# whatever walks the data afterwards would walk every copy. A real test suite expands to far less.
MAX_EXPANDED_NODES = 1_000_000


def load_yaml(path: Path) -> Any:
    """Parse a YAML file; a syntax error becomes `path:line: invalid YAML: ...`, as do nesting too deep to read and
    aliases that expand to more than `MAX_EXPANDED_NODES` values."""
    shown = relative(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(shown, None, "file not found") from None
    except UnicodeDecodeError as error:
        raise InputError(
            shown,
            None,
            f"cannot read file: not UTF-8 text ({error.reason} at byte {error.start}); expected a UTF-8 YAML file",
        ) from None
    except OSError as error:
        raise InputError(shown, None, f"cannot read file: {error.strerror or error}") from None
    try:
        data = _reader().load(text)
    except MarkedYAMLError as error:
        line, problem = _yaml_problem(error)
        raise InputError(shown, line, f"invalid YAML: {problem}; expected well-formed YAML") from None
    except YAMLError as error:
        raise InputError(shown, None, f"invalid YAML: {' '.join(str(error).split())}") from None
    except RecursionError:
        raise InputError(
            shown, None, "invalid YAML: nested too deeply to read; expected at most a few hundred levels of nesting"
        ) from None
    expansion_problem = _expansion_problem(data)
    if expansion_problem:
        raise InputError(shown, None, f"invalid YAML: {expansion_problem}")
    return data


def _expansion_problem(data: Any) -> str | None:
    """Why the document is too big once its aliases are expanded (or refers to itself), else None. Counts each
    shared container once per use, in time linear in the distinct containers, without recursion."""
    expanded: dict[int, int] = {}  # id of a container -> values it stands for, aliases expanded
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        node, children_done = stack.pop()
        if not isinstance(node, (dict, list)) or (id(node) in expanded and not children_done):
            continue
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        if children_done:
            on_path.discard(id(node))
            expanded[id(node)] = 1 + sum(expanded.get(id(child), 1) for child in children)
            if expanded[id(node)] > MAX_EXPANDED_NODES:
                return (
                    f"its aliases expand to more than {MAX_EXPANDED_NODES:,} values (an alias bomb?); expected "
                    "a document whose anchors are reused a reasonable number of times"
                )
            continue
        if id(node) in on_path:
            return "an alias refers to the mapping or list it is inside of; expected aliases to earlier values only"
        on_path.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in children if isinstance(child, (dict, list)))
    return None


def load_config_section(path: str | Path, section: str) -> Any:
    """A small YAML config file (an LLM or embeddings config): its keys under `section:`, or at top level; every
    way it can be unreadable is one `ConfigError` line."""
    path = Path(path)
    try:
        data = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read: {error}") from None
    except YAMLError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "invalid YAML"
        raise ConfigError(f"{path}: invalid YAML: {first_line}") from None
    if isinstance(data, dict) and section in data:
        data = data[section]
    return {} if data is None else data


def line_of(node: Any, key: Any = None) -> int | None:
    """1-based line of a mapping/sequence, or of one of its keys/items when `key` is given."""
    try:
        if key is None:
            return node.lc.line + 1
        if isinstance(node, CommentedMap):
            return node.lc.key(key)[0] + 1
        if isinstance(node, CommentedSeq):
            return node.lc.item(key)[0] + 1
    except (AttributeError, KeyError, IndexError, TypeError):
        pass
    return None


def plain(node: Any) -> Any:
    """ruamel containers and scalars turned into plain dicts, lists, str, int, float, bool, None."""
    if isinstance(node, dict):
        return {str(key): plain(value) for key, value in node.items()}
    if isinstance(node, list):
        return [plain(item) for item in node]
    if isinstance(node, bool) or node is None:
        return node
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    return node


def dump_yaml(data: Any) -> str:
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.allow_unicode = True
    yaml.sort_base_mapping_type_on_output = False  # type: ignore[assignment]  # keep key order; ruamel types it as None
    yaml.width = 4096
    stream = io.StringIO()
    yaml.dump(data, stream)
    return stream.getvalue()


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new, never half of it."""
    with open_atomic(path) as handle:
        handle.write(text)


@contextlib.contextmanager
def open_atomic(path: Path, binary: bool = False) -> Iterator[IO[Any]]:
    """A file written in pieces that readers see whole or not at all: a temp file beside it, renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def jsonl_line(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


def write_yaml(path: Path, data: Any) -> None:
    write_atomic(path, dump_yaml(data))


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(jsonl_line(row) for row in rows))
