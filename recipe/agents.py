"""Sub-agents and MCP servers of a Rasa Pro 3.14+ project, and the project's own commands.

Sub-agents: one folder per agent under `sub_agents/`, each with a `config.yml` whose `agent:` block names it
(`name`, `description`, `protocol` RASA or A2A); a flow step `call: <agent name>` runs it. MCP servers: the
`mcp_servers:` list of `endpoints.yml` (`name`, `url`, `type`); a flow step `call: <tool>` with `mcp_server: <name>`
and `mapping:` runs that server's tool. Neither is run by recipe: an agent's messages come from the tests' bot turns,
a tool's output slots from the tests' assertions and slot checks, like a custom action nothing runs.

Custom commands: `custom_commands.yml` in the project declares each command class the project adds to its command
generator (see README, "Custom commands"); parser, templates, validation, grammar and evaluate read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipe.commands import (
    _ARG_PATTERNS,
    _PLACEHOLDER,
    ALL_SYNTAXES,
    CustomCommandSpec,
    Syntax,
)
from recipe.errors import InputError, Problems
from recipe.types import relative
from recipe.yamlio import line_of, load_yaml

SUB_AGENTS_FOLDER = "sub_agents"
CUSTOM_COMMANDS_FILE = "custom_commands.yml"


@dataclass(frozen=True)
class Agent:
    name: str  # what `call:` names and what `restart agent` takes
    description: str
    protocol: str  # RASA | A2A
    path: str


def read_agents(root: Path, problems: Problems) -> dict[str, Agent]:
    """Every agent under `root/sub_agents/`, keyed by its `agent.name` (as the runtime keys them)."""
    folder = root / SUB_AGENTS_FOLDER
    agents: dict[str, Agent] = {}
    if not folder.is_dir():
        return agents
    for entry in sorted(folder.iterdir()):
        if not entry.is_dir():
            problems.add(InputError(relative(entry), None, "not a folder; expected sub_agents/<agent>/config.yml"))
            continue
        config = entry / "config.yml"
        shown = relative(config)
        if not config.is_file():
            problems.add(
                InputError(
                    relative(entry),
                    None,
                    "agent folder without config.yml; expected "
                    f"{SUB_AGENTS_FOLDER}/<agent>/config.yml with an `agent:` block",
                )
            )
            continue
        with problems.catch():
            data = load_yaml(config)
            block = data.get("agent") if isinstance(data, dict) else None
            if not isinstance(block, dict) or not block.get("name") or not block.get("description"):
                raise InputError(
                    shown,
                    line_of(data) if isinstance(data, dict) else None,
                    "expected `agent:` with `name` and `description`",
                )
            name = str(block["name"])
            protocol = str(block.get("protocol", "RASA")).upper()
            if protocol not in ("RASA", "A2A"):
                raise InputError(
                    shown, line_of(block, "protocol"), f"agent protocol `{protocol}`; expected RASA or A2A"
                )
            if name in agents:
                raise InputError(
                    shown,
                    line_of(block, "name"),
                    f"agent `{name}` is already defined in {agents[name].path}; names must be unique",
                )
            agents[name] = Agent(name, str(block["description"]), protocol, shown)
    return agents


def read_mcp_servers(root: Path, problems: Problems) -> dict[str, str]:
    """The `mcp_servers:` of the project's endpoints.yml: name -> url (or "" when none is given)."""
    path = root / "endpoints.yml"
    if not path.is_file():
        return {}
    servers: dict[str, str] = {}
    with problems.catch():
        data = load_yaml(path)
        listed = data.get("mcp_servers") if isinstance(data, dict) else None
        for server in listed or []:
            if not isinstance(server, dict) or not server.get("name"):
                raise InputError(
                    relative(path),
                    line_of(server) or line_of(data, "mcp_servers"),
                    "each of `mcp_servers` needs a `name` (and `url`, `type`)",
                )
            servers[str(server["name"])] = str(server.get("url") or "")
    return servers


def read_custom_commands(root: Path, problems: Problems) -> tuple[CustomCommandSpec, ...]:
    """The project's own commands from `custom_commands.yml`:

    ```yaml
    commands:
      - name: check balance            # the JSON `command` and what tests write in DU `commands:`
        arguments: {account: value}    # flow | slot | agent | value
        syntax:                        # one form per dialect; v3 and short default to v2
          v1: CheckBalance({account})
          v2: check balance {account}
        description: the user asks for an account's balance   # our templates list it (optional)
    ```
    """
    path = root / CUSTOM_COMMANDS_FILE
    if not path.is_file():
        return ()
    shown = relative(path)
    specs: list[CustomCommandSpec] = []
    with problems.catch():
        data = load_yaml(path)
        entries = data.get("commands") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise InputError(shown, line_of(data) if data is not None else None, "expected `commands:` with a list")
        for entry in entries:
            with problems.catch():
                specs.append(_custom_command(entry, shown, entries))
    return tuple(specs)


def _custom_command(entry: Any, shown: str, parent: Any) -> CustomCommandSpec:
    where = line_of(entry) or line_of(parent)
    if not isinstance(entry, dict) or not entry.get("name") or not isinstance(entry.get("syntax"), dict):
        raise InputError(shown, where, "a custom command needs `name` and `syntax: {v1: ..., v2: ...}`")
    arguments = entry.get("arguments") or {}
    if not isinstance(arguments, dict):
        raise InputError(shown, line_of(entry, "arguments"), "`arguments` must map argument name to its type")
    for name, kind in arguments.items():
        if kind not in _ARG_PATTERNS:
            raise InputError(
                shown,
                line_of(arguments, name),
                f"argument `{name}` has type `{kind}`; expected one of {', '.join(_ARG_PATTERNS)}",
            )
    forms: list[tuple[Syntax, str]] = []
    for dialect, form in entry["syntax"].items():
        try:
            syntax = Syntax(str(dialect))
        except ValueError:
            raise InputError(
                shown,
                line_of(entry["syntax"], dialect),
                f"dialect `{dialect}`; expected one of {', '.join(s.value for s in ALL_SYNTAXES)}",
            ) from None
        named = _PLACEHOLDER.findall(str(form))
        if sorted(named) != sorted(arguments):
            raise InputError(
                shown,
                line_of(entry["syntax"], dialect),
                f"form `{form}` names {named or 'no argument'}; expected each of "
                f"{list(arguments) or 'no argument'} once",
            )
        forms.append((syntax, str(form)))
    if not any(s in (Syntax.V2, Syntax.V3) for s, _ in forms) or Syntax.V1 not in dict(forms):
        raise InputError(shown, line_of(entry, "syntax"), "`syntax` needs a v1 and a v2 form")
    return CustomCommandSpec(
        name=str(entry["name"]),
        arguments=tuple((str(n), str(k)) for n, k in arguments.items()),
        forms=tuple(forms),
        description=None if entry.get("description") is None else str(entry["description"]),
    )
