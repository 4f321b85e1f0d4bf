"""The bundled example's tests copied N times, with unique test case names: a stand-in for a large assistant.

Copy k of `e2e_tests/` goes to `<dest>/copy_<k>/` (conftest included) and every `test_case:` name gets ` #k`, so
test ids, rephrase prompts and the split see N times as many distinct test cases. Used by bench/bench_scale.py and
bench/bench_prepare.py --copies.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_NAME = re.compile(r"^(\s*-\s*test_case:\s*)(.+?)\s*$", re.MULTILINE)


def copied_tests(dest: Path, copies: int, source: Path = ROOT / "e2e_tests") -> list[str]:
    """Write `copies` renamed copies of `source` under `dest`; returns the test folders to pass to prepare-data."""
    folders = []
    for k in range(1, copies + 1):
        target = dest / f"copy_{k:03d}"
        if not target.exists():
            shutil.copytree(source, target)
            for path in target.rglob("*.yml"):
                text = path.read_text(encoding="utf-8")
                path.write_text(_NAME.sub(lambda m, k=k: f"{m.group(1)}{m.group(2)} #{k}", text), encoding="utf-8")
        folders.append(str(target))
    return folders
