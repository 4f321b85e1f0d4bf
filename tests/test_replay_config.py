"""`recipe prepare-data --config FILE`: a run's params.yaml replays it; flags typed on the command line win; every bad
key or value in the file is one file:line with what was expected, exit 2."""

from __future__ import annotations

from pathlib import Path

from recipe.cli import main
from recipe.yamlio import load_yaml, plain

SPLITS = Path("4_train_test_split/ft_splits")


def prepare(*argv: str) -> int:
    return main(["prepare-data", "--no-progress", *argv])


def parameters(out: Path) -> dict:
    return plain(load_yaml(out / "params.yaml"))["parameters"]


def test_params_yaml_replays_the_run(tmp_path):
    first, replay = tmp_path / "first", tmp_path / "replay"
    options = ["--offline", "--num-rephrases", "3", "--train-frac", "0.5", "--seed", "7", "e2e_tests/du"]
    assert prepare(*options, "-o", str(first)) == 0
    assert prepare("--config", str(first / "params.yaml"), "-o", str(replay)) == 0

    written, replayed = parameters(first), parameters(replay)
    assert replayed.pop("out") == str(replay) and written.pop("out") == str(first)
    assert replayed == written
    assert "replay_config" not in replayed, "the replay's own --config is not an option of the data"
    for name in ("train.jsonl", "val.jsonl"):
        assert (replay / SPLITS / name).read_bytes() == (first / SPLITS / name).read_bytes()


def test_flags_win_over_the_file_and_a_repeatable_flag_replaces_its_list(tmp_path):
    config = tmp_path / "options.yml"
    config.write_text("seed: 3\nnum-rephrases: 2\nflows: [flows/general.yml]\ntests: [e2e_tests/du]\noffline: true\n")
    out = tmp_path / "out"
    assert prepare("--config", str(config), "--seed", "5", "--flows", "flows", "-o", str(out)) == 0
    used = parameters(out)
    assert used["seed"] == 5  # typed
    assert used["num_rephrases"] == 2  # from the file, under its flag's spelling
    assert used["flows"] == ["flows"]  # typed, not appended to the file's list
    assert used["tests"] == ["e2e_tests/du"]


def test_every_bad_option_is_one_line_with_its_line_number(tmp_path, capsys):
    config = tmp_path / "bad.yml"
    config.write_text(
        "num_rephrases: 2\nvalidation: fuzzy\nnum-rephrase: 3\ntrain_frac: lots\noffline: yes please\nseed: [1, 2]\n"
    )
    out = tmp_path / "out"
    assert prepare("--config", str(config), "-o", str(out)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[1] for line in lines] == ["2", "3", "4", "5", "6"]
    assert "expected one of strict, loose, got 'fuzzy'" in lines[0]
    assert "unknown option 'num-rephrase'" in lines[1] and "num_rephrases" in lines[1]
    assert "train_frac" in lines[2]
    assert "expected true or false" in lines[3]
    assert "expected one value" in lines[4]
    assert not out.exists(), "nothing runs on a bad config"


def test_a_config_that_is_not_a_mapping_is_refused(tmp_path, capsys):
    config = tmp_path / "list.yml"
    config.write_text("- seed\n- 3\n")
    assert prepare("--config", str(config), "-o", str(tmp_path / "out")) == 2
    assert "expected a mapping of option names to values" in capsys.readouterr().err
