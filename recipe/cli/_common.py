"""Arguments shared by several subcommands, and turning them into library inputs."""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recipe.errors import ConfigError

if TYPE_CHECKING:
    from recipe.prompt import DatetimePolicy


def add_project_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("assistant project")
    group.add_argument(
        "--project",
        type=Path,
        default=Path("."),
        metavar="DIR",
        help="the assistant's folder: flows under flows/ or data/, domain.yml or domain/, config.yml "
        "(default: current folder)",
    )
    group.add_argument(
        "--flows",
        type=Path,
        action="append",
        metavar="PATH",
        help="flows file or folder, instead of discovery (repeatable)",
    )
    group.add_argument(
        "--domain",
        type=Path,
        action="append",
        metavar="PATH",
        help="domain file or folder, instead of discovery (repeatable)",
    )
    group.add_argument(
        "--rasa-version",
        metavar="X.Y",
        default=None,
        help="the Rasa Pro release the assistant runs, 3.10 to 3.21: its command parser decides which "
        "commands are offered, trained and scored (3.16+ has no `hand over`; 3.14+ has agent "
        "commands) (default: the newest, 3.21)",
    )
    group.add_argument(
        "--max-errors",
        type=int,
        default=50,
        metavar="N",
        help="input problems listed before stopping; every file is read first, then every problem is "
        "printed as path:line, sorted; 0 lists all (default: 50)",
    )


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("prompt")
    group.add_argument(
        "--command-syntax",
        choices=["v1", "v2", "v3"],
        help="command dialect of the completions (default: from config.yml's command generator, else v2)",
    )
    group.add_argument(
        "--prompt-template",
        type=Path,
        metavar="FILE",
        help="Jinja2 template of the command prompt, or rasa:<file> for a template of your installed "
        "Rasa Pro (default: config.yml's prompt_template; else, with Rasa Pro installed, the one "
        "it picks for config.yml's generator and model; else ours for the syntax, in prompts/)",
    )
    group.add_argument(
        "--no-datetime",
        action="store_true",
        help="leave the date and time out of prompts (serve with include_date_time: false)",
    )
    group.add_argument(
        "--datetime",
        metavar="ISO",
        help="put this fixed date and time in every prompt instead of one derived from --seed",
    )
    group.add_argument("--seed", type=int, default=42, help="seed for derived dates, splits and sampling (default: 42)")
    group.add_argument(
        "--embeddings-config",
        type=Path,
        metavar="FILE",
        help="YAML of an OpenAI-compatible embeddings endpoint (provider, model, api_base, "
        "api_key_env): list the flows flow retrieval picks, as the runtime does (default: "
        "config.yml's flow_retrieval embeddings, else every startable flow)",
    )


def load_project_from_args(args: argparse.Namespace, *, flow_retrieval: bool = False, cache_dir: Path | None = None):
    """The project; with `flow_retrieval` (commands that render prompts) it lists flows as the runtime's flow
    retrieval would (`--embeddings-config`, else config.yml), embeddings cached in `cache_dir`/embeddings."""
    from recipe.project import load_project

    project = load_project(args.project, flows=args.flows, domain=args.domain)
    project.rasa_version = rasa_version_from_args(args)
    if flow_retrieval:
        from recipe.retrieval import flow_retrieval_for

        cache = cache_dir / "embeddings" if cache_dir is not None else None
        project.flow_retrieval = flow_retrieval_for(project, getattr(args, "embeddings_config", None), cache_dir=cache)
    return project


def rasa_version_from_args(args: argparse.Namespace):
    from recipe.commands import NEWEST_RASA_VERSION, parse_rasa_version

    text = getattr(args, "rasa_version", None)
    if text is None:
        return NEWEST_RASA_VERSION
    try:
        return parse_rasa_version(text)
    except ValueError as error:
        raise ConfigError(f"--rasa-version {text}: {error}") from None


def datetime_policy(args: argparse.Namespace, configured: bool | None) -> DatetimePolicy:
    """The prompts' date line from --no-datetime / --datetime / --seed and what the assistant (or the model's training
    info) says (`include_date_time`; None when it says nothing): the one place these flags become a policy."""
    from recipe.prompt import DatetimePolicy

    if args.datetime and args.no_datetime:
        raise ConfigError("--datetime and --no-datetime contradict each other; give one of them")
    include = not args.no_datetime and configured is not False
    return DatetimePolicy(include=include, fixed=parse_datetime_flag(args.datetime), seed=args.seed)


def parse_datetime_flag(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"--datetime {value}: expected an ISO date and time like 2026-03-05T14:05:09") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def add_action_server_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("custom actions")
    group.add_argument(
        "--action-endpoint",
        metavar="URL",
        help="webhook of your running action server (`rasa run actions`), e.g. "
        "http://localhost:5055/webhook: custom actions the tests do not stub run there for real "
        "(default: endpoints.yml's action_endpoint url, if any)",
    )
    group.add_argument(
        "--endpoints",
        type=Path,
        metavar="FILE",
        help="endpoints.yml to take action_endpoint from, ${VAR} filled from the environment "
        "(default: the project's endpoints.yml)",
    )
    group.add_argument(
        "--no-action-server",
        action="store_true",
        help="run no custom action, even when endpoints.yml names a server (slots they set stay unset)",
    )
    group.add_argument(
        "--action-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to wait for one action's answer before retrying (default: 10)",
    )


def connect_action_server(args: argparse.Namespace, project, cache_dir: Path | None):
    """Point `project.action_server` at the server the flags (or endpoints.yml) name, checked reachable now, before
    any other work; None when there is none. `cache_dir=None` keeps answers in memory only."""
    from recipe.actions import ActionEndpoint, ActionServer, read_action_endpoint

    explicit = args.action_endpoint or args.endpoints
    if args.no_action_server:
        if explicit:
            raise ConfigError("--no-action-server contradicts --action-endpoint/--endpoints; give one of them")
        return None
    if args.action_timeout <= 0:
        raise ConfigError(f"--action-timeout {args.action_timeout}: expected a positive number of seconds")
    endpoint: ActionEndpoint | None
    if args.action_endpoint:
        endpoint, remedy = ActionEndpoint(args.action_endpoint), "leave out --action-endpoint"
    else:
        path = args.endpoints or project.root / "endpoints.yml"
        if args.endpoints and not path.is_file():
            raise ConfigError(f"--endpoints {path}: file not found")
        endpoint = read_action_endpoint(path) if path.is_file() else None
        if endpoint is None:
            return None
        remedy = f"pass --no-action-server (the URL is {path}'s action_endpoint)"
    server = ActionServer(endpoint, project.domain, cache_dir=cache_dir, timeout_s=args.action_timeout, remedy=remedy)
    try:
        server.check_health()
    except ConfigError as error:
        if explicit:
            raise
        # Every Rasa project names its action server in endpoints.yml; one that is not running is no reason to
        # refuse the project: what the actions did is then read from the tests' own bot turns.
        logging.getLogger("recipe").warning(
            "%s; custom actions without a stub are read from the tests' bot turns instead (start the server, or "
            "pass --no-action-server to silence this)",
            error,
        )
        return None
    project.action_server = server
    return server


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        stream=sys.stderr, level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s: %(message)s"
    )


# ---------------------------------------------------------------------------------------------- --config replay

REPLAY_DEST = "replay_config"
_NOT_GIVEN = object()


def add_replay_argument(parser: argparse.ArgumentParser, written: str) -> None:
    """`--config FILE`: every option of a run from YAML, `written` (the run's own record of them) included, so a run
    replays with one flag; options typed on the command line win over the file."""
    parser.add_argument(
        "--config",
        dest=REPLAY_DEST,
        type=Path,
        metavar="YAML",
        help=f"options from a YAML file (keys as the long flags, e.g. num_rephrases: 3), or a run's {written} to "
        "replay it; flags given here win; paths in it are relative to the folder the command runs in",
    )


def subcommand_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise KeyError(command)


def apply_replay_config(parser: argparse.ArgumentParser, argv: list[str] | None, args: argparse.Namespace) -> None:
    """Fill every option the command line did not give from `--config`; each bad key or value is one file:line."""
    from recipe.errors import InputError, Problems
    from recipe.types import relative
    from recipe.yamlio import line_of, load_yaml, plain

    sub = subcommand_parser(parser, args.command)
    path: Path = getattr(args, REPLAY_DEST)
    shown = relative(path)
    document = load_yaml(path)
    if isinstance(document, dict) and isinstance(document.get("parameters"), dict):
        document = document["parameters"]  # a run's params.yaml: its `provenance` is a record, not an option
    if document is None:
        return
    if not isinstance(document, dict):
        raise InputError(shown, line_of(document), "expected a mapping of option names to values")
    actions = {
        action.dest: action
        for action in sub._actions
        if action.dest not in (REPLAY_DEST, "help", "run", "command") and action.dest is not argparse.SUPPRESS
    }
    problems = Problems()
    values: dict[str, Any] = {}
    for key, raw in document.items():
        dest = str(key).removeprefix("--").replace("-", "_")
        action = actions.get(dest)
        with problems.catch():
            if action is None:
                raise InputError(
                    shown, line_of(document, key), f"unknown option {key!r}; expected one of: {', '.join(actions)}"
                )
            try:
                values[dest] = _option_value(action, plain(raw))
            except (TypeError, ValueError) as error:
                raise InputError(shown, line_of(document, key), f"{key}: {error}") from None
    problems.raise_if_any()
    given = _given_on_command_line(parser, sub, argv)
    for dest, value in values.items():
        if dest not in given:
            setattr(args, dest, value)


def _option_value(action: argparse.Action, value: Any) -> Any:
    """A YAML value as the flag would have parsed it: its type applied, its choices checked."""
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if value is None:
        return None
    many = isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+")
    if many:
        items = value if isinstance(value, list) else [value]
        return [_one_value(action, item) for item in items]
    if isinstance(value, list | dict):
        raise ValueError(f"expected one value, got {type(value).__name__}")
    return _one_value(action, value)


def _one_value(action: argparse.Action, value: Any) -> Any:
    if isinstance(value, list | dict):
        raise ValueError(f"expected a plain value, got {type(value).__name__}")
    convert = action.type if callable(action.type) else None
    converted = convert(str(value) if convert is Path else value) if convert else value
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"expected one of {', '.join(map(str, action.choices))}, got {value!r}")
    return converted


def _given_on_command_line(
    parser: argparse.ArgumentParser, sub: argparse.ArgumentParser, argv: list[str] | None
) -> set[str]:
    """The options the command line itself set: parsed once more with every default a marker nobody can type."""
    saved = {action.dest: action.default for action in sub._actions if action.dest != "help"}
    appending = {action.dest for action in sub._actions if isinstance(action, argparse._AppendAction)}
    # A repeatable flag appends to its default, so its marker is None: any value at all was typed.
    sub.set_defaults(**{dest: None if dest in appending else _NOT_GIVEN for dest in saved})
    try:
        marked = parser.parse_args(argv)
    finally:
        sub.set_defaults(**saved)
    return {
        dest
        for dest, value in vars(marked).items()
        if value is not (None if dest in appending else _NOT_GIVEN) and dest in saved
    }
