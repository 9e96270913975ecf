"""The README's Python snippets run as written (in one process, in order, on the CPU)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


def test_readme_snippets_run(tmp_path):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4, "the README lost its snippets"
    script = tmp_path / "readme_snippets.py"
    script.write_text("\n\n".join(blocks))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The compile and export snippets each rewrote their one SDPA call, and the selection is
    # sparse.
    assert proc.stdout.count("flashprefill: 1 SDPA call(s) rewritten, 0 left dense") >= 2, \
        proc.stdout
    kept = re.search(r"kept (\d+)% of causal blocks, recall", proc.stdout)
    assert kept and int(kept.group(1)) < 100, proc.stdout
