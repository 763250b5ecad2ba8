"""Source trees to repository-documents, as the paper built its GitHub corpus.

One document per repository (a checkout) or per top-level package (an entry of a
site-packages directory).  A document is its files concatenated, each behind a path header.
Directory order is shuffled with a seed, but a subdirectory's files stay together, so related
code sits close in the stream, the way a reader of the repository would meet it.

The builder writes a manifest of everything it included; evaluation consults it to refuse a
repository the model was trained on.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# The development set of DEVELOPERS.md: never train on what is evaluated.
DEFAULT_EXCLUDE = ("pallets/flask", "pydantic/pydantic", "huggingface/evaluate")
SOURCE_SUFFIXES = (".py", ".pyi")
MAX_FILE_BYTES = 1 << 20  # larger files are generated tables, not code worth learning
SKIP_DIRS = {"__pycache__", "node_modules", "site-packages", "dist-packages"}
REPO_MARKERS = (".git", "pyproject.toml", "setup.py", "setup.cfg")
# Folder names too generic to identify a repository (many projects ship a `tests` package).
GENERIC_NAMES = {"tests", "test", "testing", "docs", "examples", "scripts", "benchmarks", "src"}


def normalize_name(name: str) -> str:
    """Compare package and repository names the way PyPI does: case- and separator-blind.

    ``pallets/flask`` names the repository; its package is ``flask``, so the owner is dropped.
    """
    return re.sub(r"[-_.]+", "_", name.rstrip("/").split("/")[-1]).lower()


@dataclass
class SourceFile:
    path: str  # relative to the document's root, '/'-separated, shown in the header
    text: str


@dataclass
class Document:
    name: str
    root: str
    files: list[SourceFile] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(len(f.text.encode("utf-8")) for f in self.files)


def read_source(path: Path) -> str | None:
    """The text of a plausible source file, or None for binary, huge or non-UTF-8 files."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def ordered_files(root: Path, rng: random.Random) -> Iterator[Path]:
    """Files under ``root`` in shuffled order, each subdirectory's files kept contiguous."""
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return
    rng.shuffle(entries)
    for entry in entries:
        if entry.is_symlink() or entry.name.startswith("."):
            continue
        if entry.is_dir():
            if entry.name not in SKIP_DIRS and not entry.name.endswith((".dist-info", ".egg-info")):
                yield from ordered_files(entry, rng)
        elif entry.suffix in SOURCE_SUFFIXES:
            yield entry


def load_document(name: str, root: Path, base: Path, seed: int) -> Document:
    """All readable source files under ``root``, paths shown relative to ``base``."""
    doc = Document(name=name, root=str(root))
    paths = [root] if root.is_file() else ordered_files(root, random.Random(f"{seed}:{name}"))
    for path in paths:
        text = read_source(path)
        if text is not None and text.strip():
            doc.files.append(SourceFile(path.relative_to(base).as_posix(), text))
    return doc


def units(root: Path) -> Iterator[tuple[str, Path]]:
    """(name, path) of each document under ``root``: the root itself if it is a checkout,
    otherwise each top-level package or module (the layout of a site-packages directory)."""
    if any((root / marker).exists() for marker in REPO_MARKERS):
        yield root.resolve().name, root
        return
    for entry in sorted(root.iterdir()):
        if entry.name.startswith((".", "_")) or entry.name in SKIP_DIRS:
            continue
        if entry.is_dir() and not entry.name.endswith((".dist-info", ".egg-info", ".data")):
            yield entry.name, entry
        elif entry.is_file() and entry.suffix in SOURCE_SUFFIXES:
            yield entry.stem, entry


def build_documents(
    roots: Iterable[Path], exclude: Iterable[str] = DEFAULT_EXCLUDE, seed: int = 0
) -> tuple[list[Document], list[str]]:
    """Documents from every root, minus excluded names.  Returns (documents, skipped names)."""
    banned = {normalize_name(n) for n in exclude}
    docs: list[Document] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for root in roots:
        root = Path(root)
        for name, path in units(root):
            key = normalize_name(name)
            if key in banned:
                skipped.append(name)
                continue
            if key in seen:  # the same package found under two roots: keep the first
                continue
            doc = load_document(name, path, path.parent if path.is_dir() else root, seed)
            if doc.files:
                seen.add(key)
                docs.append(doc)
    return docs, skipped


def corpus_manifest(docs: list[Document], roots: list[str], skipped: list[str], exclude: list[str]) -> dict:
    """What a training run read: every document with its file count and size, and what the
    exclusion list kept out.  Evaluation refuses a repository named here."""
    return {
        "roots": roots,
        "exclude_list": exclude,
        "excluded": skipped,
        "documents": [{"name": d.name, "files": len(d.files), "bytes": d.bytes} for d in docs],
    }


def manifest_names(manifest: dict) -> set[str]:
    """Normalised names of every document a manifest says the model was trained on."""
    return {normalize_name(d["name"]) for d in manifest.get("documents", [])}


def load_manifest(path: Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"corpus manifest {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corpus manifest {path} is not valid JSON: {e}") from e


def repository_names(root: Path) -> set[str]:
    """Names a checkout is known by: its folder, its packages (``src/x``, ``x/__init__.py``),
    and its ``origin`` remote if it has one.  Used to match it against a training manifest."""
    root = Path(root)
    names = {normalize_name(root.resolve().name)}
    for base in (root, root / "src"):
        if base.is_dir():
            for entry in base.iterdir():
                if entry.is_dir() and (entry / "__init__.py").exists():
                    names.add(normalize_name(entry.name))
    names -= GENERIC_NAMES
    git_config = root / ".git" / "config"
    if git_config.is_file():
        for url in re.findall(r"url\s*=\s*(\S+)", git_config.read_text(errors="replace")):
            names.add(normalize_name(url.removesuffix(".git")))
    return names


def refuse_trained_on(root: Path, manifest: dict) -> None:
    """Raise if the model's training corpus included this repository or one of its packages."""
    overlap = repository_names(root) & (manifest_names(manifest) - GENERIC_NAMES)
    if overlap:
        raise ValueError(
            f"refusing to evaluate on {root}: the training corpus included {sorted(overlap)}"
        )
