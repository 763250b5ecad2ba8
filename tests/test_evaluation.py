"""``mtlsp eval``: call-site extraction, metrics, baselines, the store's hidden search, the CLI."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mtlsp.complete import prompt
from mtlsp.complete.static import Jedi
from mtlsp.evaluation import metrics
from mtlsp.evaluation.bits import copy_files
from mtlsp.evaluation.bm25 import BM25, query_before, terms
from mtlsp.evaluation.fresh import caller_text, fresh_name, module_name, plan_trials
from mtlsp.evaluation.sites import cut, find_sites, sample
from mtlsp.store.files import Entries
from mtlsp.store.memory_store import FileUpdate, MemoryStore, NewChunk, StoreOptions

LEDGER = '''\
"""Ledgers."""


def compute_total(items):
    return sum(items)


class Ledger:
    def add_entry(self, amount):
        self.amount = amount

    def close_books(self):
        return compute_total([1, 2])


def shared_helper():
    return 1
'''

REPORT = '''\
from pkg.ledger import Ledger, compute_total
from pkg import ledger as lg


def shared_helper():
    return 2


def build(rows):
    book = Ledger()
    book.add_entry(compute_total(rows))
    shared_helper()
    data = {}
    data.get("x")
    print(len(rows))
    return lg.compute_total(rows), str(book)
'''

EMPTY_USE = '''\
def unrelated():
    return [x for x in range(3)]
'''


def write_repo(root: Path) -> Path:
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "ledger.py").write_text(LEDGER)
    (root / "pkg" / "report.py").write_text(REPORT)
    (root / "pkg" / "other.py").write_text(EMPTY_USE)
    (root / "README.md").write_text("# A ledger package\n\nCompute totals of ledgers.\n")
    return root


def sources(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in root.rglob("*.py")}


# ---------------------------------------------------------------- call sites


def test_extractor_finds_exactly_the_cross_file_call_sites(tmp_path):
    root = write_repo(tmp_path / "repo")
    sites = find_sites(sources(root))
    got = [(s.path, s.line, s.column, s.name, s.target, s.defined_in) for s in sites]
    assert got == [
        ("pkg/report.py", 9, 11, "Ledger", "Ledger()", ("pkg/ledger.py",)),
        ("pkg/report.py", 10, 9, "add_entry", "add_entry(compute_total(rows))", ("pkg/ledger.py",)),
        ("pkg/report.py", 10, 19, "compute_total", "compute_total(rows))", ("pkg/ledger.py",)),
        ("pkg/report.py", 15, 14, "compute_total", "compute_total(rows), str(book)", ("pkg/ledger.py",)),
    ]
    # left out: shared_helper (defined in the calling file too), data.get (a dict method), len and
    # str and print and range (builtins), compute_total inside ledger.py (defined there)
    text = (root / "pkg" / "report.py").read_text()
    for s in sites:
        assert text[s.offset:].startswith(s.name)
        assert text.splitlines()[s.line][s.column:].rstrip() == s.target


def test_cut_keeps_the_lines_after_and_types_characters(tmp_path):
    root = write_repo(tmp_path / "repo")
    text = (root / "pkg" / "report.py").read_text()
    site = find_sites(sources(root))[0]
    cut_text, cursor = cut(text, site, 2)
    assert cut_text[:cursor].endswith("book = Le")
    assert cut_text[cursor:].startswith("\n    book.add_entry(")
    assert cut_text.count("\n") == text.count("\n")


def test_sampling_is_reproducible_by_seed(tmp_path):
    sites = list(range(50))
    a, b, c = sample(sites, 10, seed=3), sample(sites, 10, seed=3), sample(sites, 10, seed=4)
    assert a == b and a != c and len(a) == 10 and a == sorted(a)
    assert sample(sites, None, 0) == sites and sample(sites, 99, 0) == sites


# ---------------------------------------------------------------- metrics


def test_metrics_on_hand_made_pairs():
    assert metrics.levenshtein("kitten", "sitting") == 3
    assert metrics.levenshtein("", "abc") == 3
    assert metrics.edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert metrics.edit_similarity("  foo(x)", "foo(x)  ") == 1.0
    assert metrics.edit_similarity("", "") == 1.0
    assert metrics.exact_match(" foo(a, b) ", "foo(a, b)")
    assert not metrics.exact_match("foo(a,b)", "foo(a, b)")
    assert metrics.identifiers("if x and foo(y, 3): return None") == ["x", "foo", "y"]  # None is a keyword
    assert metrics.identifier_match("foo(a,b)", "foo(a, b)")
    assert not metrics.identifier_match("foo(a)", "foo(b)")
    # as CrossCodeEval counts them: words in string literals and comments are not identifiers,
    # True and False are
    assert metrics.identifier_match('app.route("/key", methods=["GET"])', "app.route('/other', methods=['POST'])")
    assert metrics.identifiers("f('it\\'s', True)  # a note") == ["f", "True"]
    assert metrics.identifiers('route("/ke') == ["route", "ke"]  # a literal cut short is still code
    assert metrics.first_name("  compute_total(rows)") == "compute_total"
    assert metrics.first_name("(x)") == ""
    assert metrics.reciprocal_rank("b", ["a", "b", "c"]) == 0.5
    assert metrics.reciprocal_rank("z", ["a"]) == 0.0
    assert metrics.percentile([1, 2, 3, 4, 100], 50) == 3
    assert metrics.percentile([], 50) is None
    assert metrics.mean([True, False, True, True]) == 0.75


# ---------------------------------------------------------------- baselines


def test_bm25_ranks_the_chunk_with_the_rare_terms_first_and_leaves_out_the_file(tmp_path):
    texts = {
        "a.py": "def reconcile_ledger(book):\n    return book.balance\n",
        "b.py": "def render_page(request):\n    return request.path\n",
        "c.py": "x = reconcile_ledger(book)\n",
    }
    index = BM25(texts)
    ranked = index.scores("total = reconcile_ledger(my_book)", exclude="c.py")
    assert [index.snippets[i].path for _, i in ranked] == ["a.py"]
    assert "ledger" in terms("ReconcileLedger") and "reconcile" in terms("reconcile_ledger")


def test_bm25_preamble_fits_the_budget_best_last(tmp_path, tok):
    texts = {f"m{i}.py": f"def helper_{i}(value):\n    return value * {i}\n" * 3 for i in range(6)}
    texts["m3.py"] = "def parse_config(path):\n    return open(path).read()\n" * 3
    index = BM25(texts)
    pre = index.preamble(tok, "cfg = parse_config(path)", exclude="x.py", budget=40)
    assert 0 < len(pre) <= 40
    full = index.preamble(tok, "cfg = parse_config(path) helper_1 value", exclude="x.py", budget=2000)
    text = tok.decode(full)
    assert text.rstrip().endswith("open(path).read()")  # the best match is nearest the cursor
    assert index.preamble(tok, "parse_config", exclude="x.py", budget=0) == []


def test_query_is_the_lines_before_the_cursor():
    text = "a\nb\nc\nd = f"
    assert query_before(text, len(text), lines=2) == "c\nd = f"
    assert query_before(text, len(text), lines=10) == text


def test_prompt_preamble_goes_before_the_file_outside_its_budget(tok):
    text = "def f(x):\n    return x\n" * 40
    plain = prompt.build(tok, "m.py", text, len(text), prefix_tokens=32)
    stuffed = prompt.build(tok, "m.py", text, len(text), prefix_tokens=32, preamble=[7, 8, 9])
    assert stuffed.ids == [7, 8, 9, *plain.ids] and stuffed.required == plain.required


def test_jedi_lists_the_cross_file_name(tmp_path):
    root = write_repo(tmp_path / "repo")
    site = find_sites(sources(root))[0]
    text, _ = cut((root / site.path).read_text(), site, 1)
    names, ms, error = Jedi(root).complete(site.path, text, site.line, site.column + 1)
    assert error is None and ms > 0
    assert "Ledger" in names


# ---------------------------------------------------------------- new functions


def test_fresh_names_modules_and_caller(tmp_path):
    corpus = "reconcile_quarterly_ledgers is taken"
    rng = random.Random(0)
    names = {fresh_name(rng, corpus) for _ in range(50)}
    assert all(n not in corpus and n.count("_") == 2 for n in names)
    assert module_name("src/flask/app.py") == "flask.app"
    assert module_name("pkg/__init__.py") == "pkg"
    assert module_name("pkg/sub-dir/x.py") is None and module_name("README.md") is None
    assert module_name("pkg/class.py") is None  # a keyword cannot be imported
    text = caller_text("x = 1\n", "pkg.ledger", "ledger", "re")
    assert text.endswith("import pkg.ledger as ledger\n\n\ndef _check_new_helper():\n    return ledger.re")
    root = write_repo(tmp_path / "repo")
    texts = sources(root)
    plans = plan_trials(texts, set(texts), 4, seed=1)
    assert plans == plan_trials(texts, set(texts), 4, seed=1) and len(plans) == 4
    for module, caller, name, body in plans:
        assert module != caller and name not in "".join(texts.values()) and "{name}" in body


# ---------------------------------------------------------------- the store


HEADS, DIM = 3, 8


def _entries(rng, n):
    keys = rng.standard_normal((n, HEADS, DIM))
    keys *= (1.0 + np.arange(HEADS))[:, None] / np.linalg.norm(keys, axis=2, keepdims=True)  # a norm per head
    return Entries.from_float(keys, rng.standard_normal((n, HEADS, DIM)), rng.integers(0, 1000, n), np.arange(n) * 3)


@pytest.mark.parametrize("ann", [False, True])
def test_search_can_hide_a_file_for_one_query(tmp_path, ann):
    rng = np.random.default_rng(0)
    opts = StoreOptions(ann_threshold=8192 if ann else 10**9, ann_background=False, refresh_interval=0.0,
                        ann_rebuild_fraction=0.9)  # no rebuild below: a removed file's keys stay in the lists
    store = MemoryStore(tmp_path / "s", fingerprint="fp", heads=HEADS, dim=DIM, options=opts)
    a, b = _entries(rng, 4500), _entries(rng, 4500)
    store.update([FileUpdate("a.py", "ha", [NewChunk(0, 13500, "ca", a)]),
                  FileUpdate("b.py", "hb", [NewChunk(0, 13500, "cb", b)])])
    assert store.stats()["backend"] == ("faiss-cpu ivf" if ann else "cpu exact")
    q = np.ascontiguousarray(a.float_keys()[:5].transpose(1, 0, 2))  # each head's keys of a.py
    seen = store.search(q, 4)
    assert {seen.path_table[f] for f in seen.file_ids[..., 0].ravel()} == {"a.py"}  # each key finds itself
    hidden = store.search(q, 4, hide=("a.py",))
    assert hidden.mask.any()
    assert {hidden.path_table[f] for f in hidden.file_ids[hidden.mask]} == {"b.py"}
    again = store.search(q, 4)  # hiding lasts for that search only
    assert (again.slots == seen.slots).all()
    other = store.search(q, 4, hide=("b.py",))  # another file hidden: nothing of the last hiding kept
    assert {other.path_table[f] for f in other.file_ids[other.mask]} == {"a.py"}
    assert (store.search(q, 4, hide=("a.py",)).slots == hidden.slots).all()
    store.update([FileUpdate("c.py", "hc", [NewChunk(0, 13500, "cc", _entries(rng, 4500))])], removes=["b.py"])
    assert store.stats()["backend"] == ("faiss-cpu ivf" if ann else "cpu exact")  # b.py's keys are tombstones
    after = store.search(q, 4, hide=("a.py",))  # the same file hidden after a removal: only live keys found
    assert after.mask.all() and {after.path_table[f] for f in after.file_ids.ravel()} == {"c.py"}


def test_copy_files_moves_entries_without_encoding(tmp_path):
    rng = np.random.default_rng(1)
    src = MemoryStore(tmp_path / "src", fingerprint="fp", heads=HEADS, dim=DIM, options=StoreOptions(refresh_interval=0.0))
    e1, e2 = _entries(rng, 5), _entries(rng, 7)
    src.update([FileUpdate("a.py", "ha", [NewChunk(0, 15, "c1", e1, ("f",)), NewChunk(15, 40, "c2", e2, ("G", "h"))]),
                FileUpdate("b.py", "hb", [NewChunk(0, 15, "c3", _entries(rng, 5))])])
    dst = MemoryStore(tmp_path / "dst", fingerprint="fp", heads=HEADS, dim=DIM, options=StoreOptions(refresh_interval=0.0))
    assert copy_files(src, dst, ["a.py", "missing.py"]) == 12
    assert set(dst.files()) == {"a.py"}
    assert dst.file_info("a.py").chunks == src.file_info("a.py").chunks  # names included
    got, want = dst.entries_of("a.py"), src.entries_of("a.py")
    assert all((x == y).all() for x, y in zip(got.arrays(), want.arrays()))


# ---------------------------------------------------------------- the command, end to end


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtlsp", "eval", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_cli_end_to_end_with_the_tiny_model(tmp_path, tiny_weights):
    repos = [write_repo(tmp_path / "ledgers"), write_repo(tmp_path / "books")]
    (repos[1] / "pkg" / "extra.py").write_text(textwrap.dedent('''\
        from pkg.ledger import compute_total


        def grand_total(groups):
            return compute_total([compute_total(g) for g in groups])
        '''))
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"documents": [{"name": "numpy"}]}))
    out = tmp_path / "report"
    args = [str(r) for r in repos] + [
        "--weights", str(tiny_weights), "--manifest", str(manifest), "--out", str(out),
        "--limit", "3", "--files", "2", "--curve-files", "1", "--fresh", "2", "--jobs", "2",
        "--cache-dir", str(tmp_path / "cache"), "--quiet",
    ]
    done = _run(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((out / "eval.json").read_text())
    assert [r["repository"] for r in data["repositories"]] == ["ledgers", "books"]
    summary = json.loads((out / "summary.json").read_text())["repositories"]
    assert [s["summary"] for s in summary] == [r["summary"] for r in data["repositories"]]
    assert all("rows" not in s["sites"] and "per_file" not in s["bits"] for s in summary)
    for r in data["repositories"]:
        assert r["sites"]["evaluated"] == 3 and len(r["sites"]["rows"]) == 3
        conditions = {a["condition"] for row in r["sites"]["rows"] for a in row["attempts"]}
        assert conditions == {"memory", "memory_only", "none", "bm25"}
        assert all(len(row["jedi"]) == 3 for row in r["sites"]["rows"])
        assert r["bits"]["files"] == 2 and r["bits"]["tokens"] > 0 and r["bits"]["cross_tokens"] > 0
        assert r["memory_curve"][0]["memory_tokens"] == 0 and r["memory_curve"][-1]["whole_repository"]
        assert len(r["fresh"]) == 2 and r["memory"]["tokens"] > 0
        assert all({"first_correct_ms", "first_correct_warm_ms"} <= t.keys() for t in r["fresh"])
        assert {t["target"].split(" ")[0] for t in r["summary"]["targets"]} >= {"identifier", "popup", "new-function",
                                                                                  "bits"}
    md = (out / "eval.md").read_text()
    assert "## ledgers" in md and "## books" in md and "CrossCodeEval" in md
    for png in ("bits_vs_memory.png", "hit_rate_vs_typed.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ledgers:" in done.stdout
    # the new functions were put back: the memory holds the files as they are on disk
    again = _run(args[:-1] + ["--limit", "1", "--fresh", "0", "--jobs", "1", "--quiet"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads((out / "eval.json").read_text())["repositories"][0]
    assert rerun["memory"]["tokens_encoded"] == 0


def test_cli_refuses_a_repository_the_model_was_trained_on(tmp_path, tiny_weights):
    repo = write_repo(tmp_path / "ledgers")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"documents": [{"name": "pkg"}]}))
    done = _run([str(repo), "--weights", str(tiny_weights), "--manifest", str(manifest), "--out",
                 str(tmp_path / "out")], tmp_path)
    assert done.returncode != 0
    assert "refusing to evaluate" in done.stderr and "pkg" in done.stderr
    assert not (tmp_path / "out").exists()


def test_cli_needs_a_manifest_and_a_directory(tmp_path, tiny_weights):
    repo = write_repo(tmp_path / "ledgers")
    done = _run([str(repo), "--weights", str(tiny_weights)], tmp_path)
    assert done.returncode != 0 and "manifest" in done.stderr
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    done = _run([str(tmp_path / "nope"), "--manifest", str(manifest)], tmp_path)
    assert done.returncode != 0 and "is not a directory" in done.stderr


def test_cli_reports_a_repository_it_cannot_evaluate_and_goes_on(tmp_path, tiny_weights):
    docs = tmp_path / "docsonly"
    docs.mkdir()
    (docs / "README.md").write_text("# Only prose here\n")
    repo = write_repo(tmp_path / "ledgers")
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    out = tmp_path / "out"
    done = _run([str(docs), str(repo), "--weights", str(tiny_weights), "--manifest", str(manifest), "--out",
                 str(out), "--limit", "1", "--files", "1", "--curve-files", "1", "--fresh", "0", "--quiet",
                 "--no-jedi", "--cache-dir", str(tmp_path / "cache")], tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "docsonly:\n  not evaluated: ValueError" in done.stdout and "holds no Python files" in done.stdout
    data = json.loads((out / "eval.json").read_text())["repositories"]
    assert "error" in data[0] and data[1]["sites"]["evaluated"] == 1
    assert "Not evaluated" in (out / "eval.md").read_text()
