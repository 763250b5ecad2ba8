"""The VS Code extension (editors/vscode): its TypeScript compiles, it packages to a .vsix, and a
Node test drives the real server over stdio with the capabilities the extension advertises.
The build runs in a temporary copy of editors/vscode (the `vscode_build` fixture)."""

from __future__ import annotations

import json
import os
import sys
import zipfile

import pytest

pytestmark = pytest.mark.external  # npm ci from the package registry, Node


def test_extension_compiles_packages_and_drives_the_server(vscode_build, tiny_weights, tmp_path):
    root = tmp_path / "ws"
    (root / "app").mkdir(parents=True)
    (root / "app" / "pricing.py").write_text("def apply_discount(total):\n    return total * 9 // 10\n")
    (root / "app" / "report.py").write_text(
        "from app import pricing\n\n\ndef report(lines):\n    total = pricing.app\n    return total\n")
    server = [sys.executable, "-m", "mtlsp", "serve", "--weights", str(tiny_weights),
              "--cache-dir", str(tmp_path / "cache"), "--log-level", "WARNING"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MTLSP_TEST_SERVER": json.dumps(server),
           "MTLSP_TEST_WORKSPACE": str(root)}
    out = vscode_build.npm("test", env=env).stdout
    assert "# pass 4" in out and "# fail 0" in out
    with zipfile.ZipFile(vscode_build.vsix) as vsix:
        names = set(vsix.namelist())
        manifest = json.loads(vsix.read("extension/package.json"))
    assert "extension/out/src/extension.js" in names
    assert any(n.startswith("extension/node_modules/vscode-languageclient/") for n in names)
    assert "onLanguage:python" in manifest["activationEvents"]
    assert {c["command"] for c in manifest["contributes"]["commands"]} == {"mtlsp.restart", "mtlsp.reindex", "mtlsp.explain"}
