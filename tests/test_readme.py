"""The README's generated blocks are what their command renders now (`python bench/report.py
--readme`): the targets table from bench/results, the `fastgrad memory` example and the 7B
layer-wise table from the memory model. A number edited by hand, or a change not carried into the
README, fails here. (The compile table: tests/test_aot.py; the comparison: tests/test_cli.py.)"""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    return report


@pytest.mark.parametrize("block", ["targets", "memory-example", "memory-modes"])
def test_readme_block_is_its_rendering(block):
    report = _report()
    render = {
        "targets": report.render_targets,
        "memory-example": report.render_memory_example,
        "memory-modes": report.render_memory_modes,
    }[block]
    readme = (ROOT / "README.md").read_text()
    text = readme.split(f"<!-- {block}:begin -->\n", 1)[1].split(f"\n<!-- {block}:end -->", 1)[0]
    assert text == render(), f"README's {block} block is stale: run python bench/report.py --readme"
