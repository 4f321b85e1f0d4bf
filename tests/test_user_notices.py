"""What a new user sees: the smoke settings, the 8-bit-on-CPU ETA warning, one log line per step, charts that show
zero counts, integer ticks and a legend that covers no bar, and notices where an option does nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_smoke_yaml_is_the_smoke_flag():
    from recipe.finetune.config import load_yaml_values
    from recipe.finetune.tiny import SMOKE_SETTINGS

    assert load_yaml_values(ROOT / "finetune" / "cpu-smoke.yaml") == SMOKE_SETTINGS
    assert SMOKE_SETTINGS["quantization"] == "none" and SMOKE_SETTINGS["model"] == "recipe:tiny"


def test_smoke_flag_builds_the_config_and_refuses_a_second_config():
    from recipe.cli import build_parser
    from recipe.cli.finetune import config_from_args
    from recipe.errors import ConfigError

    args = build_parser().parse_args(["finetune", "--smoke", "--data", "d", "-o", "o", "--epochs", "1"])
    config = config_from_args(args)
    assert (config.model, config.quantization, config.max_train_rows, config.num_train_epochs) == (
        "recipe:tiny",
        "none",
        48,
        1.0,
    )
    both = build_parser().parse_args(
        ["finetune", "--smoke", "--config", "finetune/config.yaml", "--data", "d", "-o", "o"]
    )
    with pytest.raises(ConfigError, match="--smoke and --config"):
        config_from_args(both)


def test_the_shortest_rows_are_kept_in_file_order():
    from recipe.finetune.data import Example, shortest

    rows = [
        Example(({"role": "user", "content": "x" * n},), "start flow a", "f", i) for i, n in enumerate([9, 1, 5, 3])
    ]
    assert [row.line for row in shortest(rows, 2)] == [1, 3]
    assert shortest(rows, None) == rows and shortest(rows, 10) == rows


def test_8bit_on_a_cpu_warns_with_a_measured_eta(caplog):
    import logging

    from recipe.finetune import model
    from recipe.finetune.config import FinetuneConfig
    from recipe.finetune.progress import LogLineCallback
    from recipe.finetune.train import slow_setup_reason

    config = FinetuneConfig(data="d", output_dir="o", quantization="8bit")
    reason = slow_setup_reason(config, "hf")
    assert (reason is not None) == (not model.cuda_available())
    assert slow_setup_reason(FinetuneConfig(data="d", output_dir="o", quantization="none"), "hf") is None
    callback = LogLineCallback("8-bit quantization on a CPU")
    state = SimpleNamespace(global_step=0, max_steps=1001, is_world_process_zero=True)
    callback.on_train_begin(None, state, None)
    callback._started -= 24.0  # the first step took 24 s
    state.global_step = 1
    with caplog.at_level(logging.WARNING, logger="recipe.finetune"):
        callback.on_step_end(None, state, None)
        callback.on_step_end(None, state, None)  # said once
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "recipe.finetune"]
    assert len(warnings) == 1 and "about 6 h 40 min more (1000 steps)" in warnings[0] and "--smoke" in warnings[0]


def test_one_concise_line_per_logging_step():
    from recipe.finetune.progress import duration_text, log_line

    assert log_line({"loss": 2.94571, "learning_rate": 0.02, "grad_norm": 1.83, "epoch": 0.6667}, 8, 36, 58.2) == (
        "step 8/36 epoch 0.67: loss 2.9457, lr 2.0e-02, grad norm 1.83, ETA 58 s"
    )
    assert log_line({"eval_loss": 0.5110, "eval_runtime": 1.2, "epoch": 3.0}, 36, 36, None) == (
        "step 36/36 epoch 3.00: val loss 0.5110 (1 s)"
    )
    assert log_line({"total_flos": 1.0}, 3, 36, None) is None
    assert (duration_text(24_000), duration_text(190), duration_text(42)) == ("6 h 40 min", "3 min 10 s", "42 s")


def test_bar_charts_show_zero_counts_integer_ticks_and_a_legend_beside_the_bars():
    import matplotlib.pyplot as plt

    from recipe.coverage import bar_figure

    figure = bar_figure(
        ["start flow", "cancel flow", "cannot handle"],
        [("written", [2, 1, 0]), ("derived", [1, 0, 0])],
        "Command types",
        "commands",
    )
    axes = figure.axes[0]
    figure.canvas.draw()
    ticks = [tick for tick in axes.get_xticks() if axes.get_xlim()[0] <= tick <= axes.get_xlim()[1]]
    assert ticks and all(float(tick).is_integer() for tick in ticks), ticks
    assert any(text.get_text().strip() == "0 (none)" for text in axes.texts)
    legend = axes.get_legend().get_window_extent()
    bars = [patch.get_window_extent() for patch in axes.patches if patch.get_width() > 0]
    assert bars and not any(legend.overlaps(bar) for bar in bars)
    assert legend.y0 >= axes.get_window_extent().y1 - 1  # above the plot area
    plt.close(figure)


def test_coverage_names_commands_in_the_syntax_it_says():
    from recipe.commands import Syntax
    from recipe.coverage import command_label

    assert [command_label(kind, Syntax.V2) for kind in ("clarify", "knowledge", "chitchat", "start flow")] == [
        "disambiguate flows",
        "provide info",
        "offtopic reply",
        "start flow",
    ]
    assert command_label("knowledge", Syntax.V3) == "search and reply"
    assert command_label("knowledge", Syntax.V1) == "SearchAndReply"


def test_abstention_rows_say_when_no_turn_is_empty(tmp_path):
    result = subprocess.run(
        [
            "recipe",
            "prepare-data",
            "--offline",
            "--no-progress",
            "--abstention-rows",
            "-o",
            str(tmp_path / "out"),
            "e2e_tests/hotels",
        ],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "--abstention-rows: no turn has empty commands" in result.stderr
