"""Each command's config dataclass is the single source of its defaults: the flags left out give exactly the
dataclass's defaults."""

from __future__ import annotations

from pathlib import Path

from recipe.cli import build_parser
from recipe.cli.evaluate import config_from_args as evaluate_config
from recipe.cli.serve import config_from_args as serve_config
from recipe.evaluate import EvaluateConfig, ModelSpec
from recipe.llm import is_loopback
from recipe.serve import ServeConfig


def test_evaluate_flags_default_to_evaluate_config() -> None:
    args = build_parser().parse_args(["evaluate", "val.jsonl", "--model", "runs/cmdgen"])
    assert evaluate_config(args) == EvaluateConfig(inputs=("val.jsonl",), models=(ModelSpec(model="runs/cmdgen"),))


def test_evaluate_flags_reach_the_config() -> None:
    argv = ["evaluate", "tests/", "--endpoint", "http://127.0.0.1:8000/v1", "--endpoint-model", "m", "--label", "big"]
    argv += ["--scoring", "rasa", "--fail-under", "80%", "--no-datetime", "--seed", "3", "-o", "report", "--worst", "2"]
    config = evaluate_config(build_parser().parse_args(argv))
    assert config.models == (ModelSpec(endpoint="http://127.0.0.1:8000/v1", endpoint_model="m", label="big"),)
    assert (config.scoring, config.fail_under, config.out, config.worst) == ("rasa", 0.8, Path("report"), 2)
    assert (config.datetime.include, config.datetime.seed) == (False, 3)


def test_serve_flags_default_to_serve_config() -> None:
    args = build_parser().parse_args(["serve", "--model", "runs/cmdgen"])
    assert serve_config(args) == ServeConfig(model="runs/cmdgen")


def test_serve_flags_reach_the_config() -> None:
    argv = ["serve", "--model", "runs/cmdgen", "--name", "cmdgen", "--port", "9000", "--max-pending", "4"]
    argv += ["--constrained", "--project", ".", "--default-max-tokens", "32", "--vllm-adapter"]
    config = serve_config(build_parser().parse_args(argv))
    assert (config.served_name, config.port, config.limits.max_pending) == ("cmdgen", 9000, 4)
    assert (config.constrained, config.project, config.limits.default_max_tokens) == (True, Path("."), 32)
    assert config.vllm_adapter


def test_only_this_machine_is_loopback() -> None:
    assert all(is_loopback(host) for host in ("127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]", "LOCALHOST"))
    assert not any(is_loopback(host) for host in ("0.0.0.0", "10.0.0.1", "example.com", "128.0.0.1"))
