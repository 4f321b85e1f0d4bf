"""Each command's config dataclass is the single source of its defaults: the flags left out give exactly the
dataclass's defaults."""

from __future__ import annotations

from pathlib import Path

from recipe.cli import build_parser
from recipe.cli.evaluate import config_from_args as evaluate_config
from recipe.evaluate import EvaluateConfig, ModelSpec


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
