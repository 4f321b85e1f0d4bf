"""prepare-data at scale: identical requests in flight are paid once, and shards merge into the one-run data set.

The large runs (the example copied 10x and 40x) are in bench/bench_scale.py, never here.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

from recipe.cli import main
from recipe.llm import LLMClient, LLMConfig
from recipe.project import load_project
from recipe.testcases import load_tests
from recipe.testing import FaultSchedule, Reply, ScriptedOpenAIServer

ROOT = Path(__file__).resolve().parent.parent


def _client(
    server: ScriptedOpenAIServer, cache: Path | None, in_flight: dict | None = None, role: str = "llm"
) -> LLMClient:
    config = LLMConfig(provider="self-hosted", model="m", api_base=server.base_url, timeout=5)
    return LLMClient(
        config, cache_dir=cache, environ={}, backoff_base_s=0.01, backoff_cap_s=0.05, role=role, in_flight=in_flight
    )


def test_identical_requests_in_flight_are_paid_once(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "send 40 to Mia"}]

    async def scenario(server: ScriptedOpenAIServer) -> None:
        shared: dict = {}
        teacher, oracle = _client(server, tmp_path, shared, "teacher"), _client(server, tmp_path, shared, "oracle")
        try:
            results = await asyncio.gather(
                *(client.chat(messages) for client in (teacher, oracle) * 4),
                teacher.chat([{"role": "user", "content": "another"}]),
            )
        finally:
            await teacher.aclose()
            await oracle.aclose()
        assert [r.text for r in results[:8]] == ["start flow transfer_money"] * 8
        assert sum(not r.cached for r in results[:8]) == 1  # one paid, seven waited for it
        assert server.hits("send 40 to Mia") == 1 and server.hits("another") == 1
        assert (teacher.usage.api_calls, oracle.usage.api_calls) == (2, 0)
        assert teacher.usage.cache_hits + oracle.usage.cache_hits == 7

    with ScriptedOpenAIServer(FaultSchedule("start flow transfer_money"), latency_s=0.2) as server:
        asyncio.run(scenario(server))


def test_a_failed_call_does_not_fail_the_requests_waiting_for_it(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "hello"}]

    async def scenario(server: ScriptedOpenAIServer) -> None:
        client = _client(server, tmp_path)
        client.retry = replace(client.retry, max_retries=0)
        try:
            first, second = await asyncio.gather(client.chat(messages), client.chat(messages), return_exceptions=True)
        finally:
            await client.aclose()
        assert isinstance(first, Exception)  # the leader's 400 is its own
        assert not isinstance(second, Exception) and second.text == "ok" and not second.cached  # asked again itself
        assert server.hits("hello") == 2 and client.usage.failures == 1

    schedule = FaultSchedule("ok").fail_first(1, Reply.error(400))
    with ScriptedOpenAIServer(schedule, latency_s=0.2) as server:
        asyncio.run(scenario(server))


def _tree(folder: Path, skip: tuple[str, ...] = ("cache", "params.yaml", "result_summary.yaml")) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).parts[0] not in skip
    }


def test_shards_by_test_file_merge_into_the_one_run_data_set(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    files = [f.path for f in load_tests(["e2e_tests/"], load_project(ROOT))]
    whole = tmp_path / "whole"
    assert (
        main(["prepare-data", "--offline", "--no-progress", "--num-rephrases", "2", "-o", str(whole), "e2e_tests/"])
        == 0
    )
    shards = []
    for index, path in enumerate(files):  # one shard per test file, each its own output folder (and cache)
        shards.append(tmp_path / f"shard_{index}")
        assert (
            main(["prepare-data", "--offline", "--no-progress", "--num-rephrases", "2", "-o", str(shards[-1]), path])
            == 0
        )
    merged = tmp_path / "merged"
    assert main(["prepare-data", "--merge", *map(str, shards), "-o", str(merged), "e2e_tests/"]) == 0
    whole_tree, merged_tree = _tree(whole), _tree(merged)
    assert whole_tree.keys() == merged_tree.keys()
    assert [name for name in whole_tree if whole_tree[name] != merged_tree[name]] == []  # byte-identical
    assert any(name.endswith("train.jsonl") for name in whole_tree) and len(whole_tree) > 50

    # The merged summary counts what the one run counts.
    from recipe.yamlio import load_yaml, plain

    one = plain(load_yaml(whole / "result_summary.yaml"))
    both = plain(load_yaml(merged / "result_summary.yaml"))
    for key in ("num_input_e2e_tests", "num_ft_data_points", "num_train_data_points", "num_val_data_points"):
        assert both[key] == one[key], key
    assert both["recipe"]["split"] == {k: v for k, v in one["recipe"]["split"].items()}
    assert {k: v["rows"] for k, v in both["recipe"]["per_test_case"].items()} == {
        k: v["rows"] for k, v in one["recipe"]["per_test_case"].items() if v["rows"]
    }
    counted = Counter(
        json.loads(line)["original_test_name"]
        for line in (whole / "3_llm_finetune_data" / "llm_ft_data.jsonl").read_text().splitlines()
    )
    assert {k: v["rows"] for k, v in one["recipe"]["per_test_case"].items() if v["rows"]} == dict(counted)


def test_merge_refuses_shards_of_other_options_and_missing_folders(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(ROOT)
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    test = "e2e_tests/hotels/hotel_du.yml"
    assert main(["prepare-data", "--offline", "--no-progress", "--num-rephrases", "0", "-o", str(v2), test]) == 0
    assert (
        main(
            [
                "prepare-data",
                "--offline",
                "--no-progress",
                "--num-rephrases",
                "0",
                "--command-syntax",
                "v1",
                "-o",
                str(v1),
                test,
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["prepare-data", "--merge", str(v2), str(v1), "-o", str(tmp_path / "m"), test]) == 2
    assert "differ in command_syntax" in capsys.readouterr().err
    assert main(["prepare-data", "--merge", str(v2), str(tmp_path / "nothing"), "-o", str(tmp_path / "m"), test]) == 2
    assert "dataset_info.json: not found" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def _reused(out: Path) -> int:
    from recipe.yamlio import load_yaml, plain

    return plain(load_yaml(out / "result_summary.yaml"))["recipe"]["test_cases_reused"]


def test_a_rerun_takes_unchanged_test_cases_from_the_cache_and_redoes_changed_ones(tmp_path: Path) -> None:
    import shutil

    project = tmp_path / "assistant"
    shutil.copytree(ROOT / "flows", project / "flows")
    shutil.copytree(ROOT / "e2e_tests", project / "e2e_tests")
    out = tmp_path / "out"
    argv = [
        "prepare-data",
        "--offline",
        "--no-progress",
        "--project",
        str(project),
        "-o",
        str(out),
        str(project / "e2e_tests"),
    ]
    assert main(argv) == 0
    first = _tree(out)
    assert _reused(out) == 0

    assert main(argv) == 0  # nothing changed: every test case comes from the cache, the files are the same
    total = plain_summary(out)["num_input_e2e_tests"]
    assert _reused(out) == total
    again = _tree(out)
    assert [name for name in first if name != "result_summary.yaml" and again.get(name) != first[name]] == []

    # One test case changes: it is made again, every other one (its file's included) is taken from the cache.
    changed = sorted((project / "e2e_tests").rglob("*_du.yml"))[0]
    text = changed.read_text(encoding="utf-8")
    assert "- user: " in text
    changed.write_text(text.replace("- user: ", "- user: well, ", 1), encoding="utf-8")
    assert main(argv) == 0
    assert _reused(out) == total - 1

    # The assistant changes (a flow or domain file): nothing is reused.
    flow_file = sorted((project / "flows").rglob("*.yml"))[0]
    flow_file.write_text(flow_file.read_text(encoding="utf-8") + "\n# edited\n", encoding="utf-8")
    assert main(argv) == 0
    assert _reused(out) == 0


def plain_summary(out: Path) -> dict:
    from recipe.yamlio import load_yaml, plain

    return plain(load_yaml(out / "result_summary.yaml"))


def test_the_offline_path_never_imports_the_openai_sdk(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = (
        "import sys; from recipe.cli import main; "
        f"code = main(['prepare-data', '--offline', '--no-progress', '-o', {str(tmp_path / 'out')!r}, "
        "'e2e_tests/hotels/hotel_du.yml']); "
        "print('openai' in sys.modules); sys.exit(code)"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_rows_come_back_from_the_spool_in_input_order_whatever_order_test_cases_finish(tmp_path: Path) -> None:
    from recipe.records import RowSpool, SpooledRow

    spool = RowSpool(tmp_path / "rows")
    try:
        for position in (2, 0, 3, 1):  # finishing order
            spool.add(
                position,
                [SpooledRow({"n": f"{position}.{i}", "text": "a\nb\u2028c"}, ("start flow",)) for i in range(position)],
            )
        rows = list(spool.rows())
    finally:
        spool.close()
    assert [row.record["n"] for row in rows] == ["1.0", "2.0", "2.1", "3.0", "3.1", "3.2"]
    assert rows[0].record["text"] == "a\nb\u2028c" and rows[0].kinds == ("start flow",)
