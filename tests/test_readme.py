"""Every ```python block of README.md runs as written, in a fresh interpreter in an empty folder.

The quick start reads `runs/demo` (what `parallelflow demo` writes): a tiny checkpoint stands in for it.
Relative paths under `configs/` resolve to the repository's configs. A block building a paper-sized model
is slow.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_finetune import make_base_checkpoint

REPO = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(
    r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), flags=re.DOTALL | re.MULTILINE
)
# paper-sized configs (seconds to build, over a GB to save); a checkpoint loaded in a fresh interpreter
SLOW_MARKERS = ("-340m", "-1.3b", "runs/demo")


def _param(block: str) -> pytest.param:
    first = next(line for line in block.splitlines() if line and not line.startswith(("import", "from", "#")))
    marks = [pytest.mark.slow] if any(marker in block for marker in SLOW_MARKERS) else []
    return pytest.param(block, id=re.sub(r"\W+", "-", first)[:40].strip("-"), marks=marks)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("block", [_param(block) for block in BLOCKS])
def test_readme_block_runs_as_written(block, tmp_path):
    if "runs/demo" in block:
        make_base_checkpoint(tmp_path / "runs" / "demo")
    (tmp_path / "configs").symlink_to(REPO / "configs")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "hf"),
    }
    result = subprocess.run(
        [sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
