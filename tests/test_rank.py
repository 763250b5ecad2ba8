"""Candidate names (what exists) and their ranking by the model (trie-constrained beam search)."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import random_model, tiny_config
from mtlsp_model.memory import TensorMemory

from mtlsp.complete import candidates, prompt
from mtlsp.complete.decode import Decoder, Tree
from mtlsp.complete.rank import Prior, Ranker

SRC = "from app import pricing\n\n\ndef report(lines):\n    total = pricing.su"


def test_identifier_position():
    assert candidates.identifier_position("    total = pricing.", "")
    assert candidates.identifier_position("    total = pricing.su", "su")
    assert candidates.identifier_position("    x = su", "su")
    assert not candidates.identifier_position("    total = ", "")
    assert not candidates.identifier_position("def summ", "summ")  # a name being defined
    assert not candidates.identifier_position("class Led", "Led")


def test_pool_merges_sources_in_order_and_filters_by_the_typed_word():
    sources = candidates.Sources(names=lambda: ["summarize_quarterly_ledger", "subtotal", "apply"],
                                 static=lambda path, text, cursor: ["sum_from_jedi", "subtotal"])
    got = candidates.pool("app/report.py", SRC, len(SRC), "su", sources)
    assert got[:3] == ["sum_from_jedi", "subtotal", "summarize_quarterly_ledger"]
    assert got.bound == {"sum_from_jedi", "subtotal"}  # what static analysis sees at the cursor
    assert not candidates.pool("app/report.py", SRC, len(SRC), "su", candidates.Sources(names=sources.names)).bound
    assert "su" not in got and "apply" not in got
    # the popup lists a name typed out in full too (ghost text has nothing to add to it)
    whole = SRC + "btotal"
    assert "subtotal" not in candidates.pool("app/report.py", whole, len(whole), "subtotal", sources)
    assert candidates.pool("app/report.py", whole, len(whole), "subtotal", sources, exact=True) == ["subtotal"]
    assert "sum" not in got  # after "pricing." builtins are no attributes
    text = "from x import y\nz = FieldInfo.fr"
    assert candidates.pool("a.py", text, len(text), "fr", None) == []  # nor keywords, whatever the file holds
    assert candidates.pool("a.py", "x = fr", 6, "fr", candidates.Sources(names=lambda: ["frozen"]))[:2] == [
        "frozen", "from"]
    plain = "x = su"
    assert "sum" in candidates.pool("a.py", plain, len(plain), "su", None)  # elsewhere they are
    assert "sum" not in candidates.pool("a.js", plain, len(plain), "su", None)  # Python's only


def test_after_a_workspace_module_only_its_names_count_as_its_buffer_defines_them():
    files = {"app/pricing.py": "import math\nVAT = 1\n\ndef subtotal(x):\n    def inner(): pass\n",
             "app/__init__.py": "", "src/lib/util.py": "def sum_up(xs): pass\n"}
    modules = candidates.ModuleNames(files.get)
    sources = candidates.Sources(names=lambda: ["summarize_quarterly_ledger", "subtotal", "supplier"],
                                 modules=modules)
    assert candidates.pool("app/report.py", SRC, len(SRC), "su", sources) == ["subtotal"]
    assert candidates.pool("app/report.py", SRC, len(SRC), "su", sources).closed  # all there can be
    with_static = candidates.Sources(names=sources.names, static=lambda path, text, cursor: ["subtotal"],
                                     modules=modules)
    assert not candidates.pool("app/report.py", SRC, len(SRC), "su", with_static).bound  # the module's list rules
    assert not candidates.pool("a.py", "x = su", 6, "su", sources).closed
    # the unsaved buffer gains a function: it is an attribute at once; nested names never are
    files["app/pricing.py"] += "\ndef summarize_quarterly_ledger(lines):\n    return 0\n"
    assert candidates.pool("app/report.py", SRC, len(SRC), "su", sources) == ["subtotal",
                                                                               "summarize_quarterly_ledger"]
    at = SRC[: -len("su")]
    assert candidates.pool("app/report.py", at, len(at), "", sources) == [
        "VAT", "subtotal", "summarize_quarterly_ledger", "math"]
    # aliases, relative imports and the src layout resolve; anything else falls back to every name
    for text in ("import app.pricing as p\nx = p.su", "from . import pricing\nx = pricing.su",
                 "import app.pricing\nx = app.pricing.su"):
        assert "supplier" not in candidates.pool("app/report.py", text, len(text), "su", sources), text
    text = "from lib import util\nutil.su"
    assert candidates.pool("tests/t.py", text, len(text), "su", sources) == ["sum_up"]
    for text in ("import os\nos.su", "self.su", "from app import pricing\nx = pricing.su"):
        assert "supplier" in candidates.pool("app/report.js" if "pricing" in text else "a.py", text,
                                             len(text), "su", sources), text


def test_names_a_module_gained_a_moment_ago_are_marked_first_where_they_match():
    files = {"app/pricing.py": "VAT = 1\n\ndef subtotal(x):\n    pass\n\ndef summarize_quarterly_ledger(x):\n    pass\n",
             "app/__init__.py": ""}
    gained = {"app/pricing.py": {"summarize_quarterly_ledger", "VAT"}}
    sources = candidates.Sources(names=lambda: ["summarize_quarterly_ledger"],
                                 modules=candidates.ModuleNames(files.get, lambda rel: gained.get(rel, ())))
    got = candidates.pool("app/report.py", SRC, len(SRC), "su", sources)
    assert got == ["subtotal", "summarize_quarterly_ledger"] and got.first == {"summarize_quarterly_ledger"}
    plain = "from app import pricing\nx = su"  # not after ``module.``: nothing leads
    assert not candidates.pool("app/report.py", plain, len(plain), "su", sources).first


def test_pool_takes_names_of_the_current_file_but_not_the_word_being_typed():
    text = "subtotal = 1\nsupplier = 2\nx = sup"
    got = candidates.pool("a.js", text, len(text), "sup", None)
    assert got == ["supplier"]


@pytest.fixture()
def setup(tok):
    model = random_model(tiny_config(tok.vocab_size), seed=4)
    decoder = Decoder(model, tok, window=512)
    ids = torch.tensor([tok.file_header("app/pricing.py") + tok.encode("def summarize_ledger(x):\n    return x\n")])
    e = model.encode(ids)
    memory = TensorMemory(e.keys[0], e.values[0], ids[0])
    return model, decoder, memory


def direct_score(model, tok, ranker, prompt_ids, head, name, memory) -> float:
    """log P(head + name, then an identifier end | prompt), by one plain forward pass in which
    the memory is read where the decoder reads it: the prompt's last ``memory_tail`` tokens on."""
    ids = tok.encode_bytes(head + name.encode())
    x = torch.tensor([prompt_ids + ids])
    n = len(prompt_ids)
    with torch.no_grad():
        logp = model(x, memory=memory, memory_from=max(0, n - ranker.decoder.memory_tail)).logits[0]
    total = sum(float(logp[n - 1 + i, t]) for i, t in enumerate(ids))
    return total + ranker.boundary(logp[-1])


@pytest.mark.parametrize("tree_nodes", [96, 0], ids=["trie read whole", "beam"])
def test_ranking_scores_are_the_model_s_own_log_probabilities(setup, tok, tree_nodes):
    model, decoder, memory = setup
    p = prompt.build(tok, "app/report.py", SRC, len(SRC), prefix_tokens=200)
    head = p.required[: len(p.required) - len(p.typed)]
    names = ["summarize_ledger", "subtotal", "sum", "summary", "super"]
    ctx = decoder.prefill(p.ids, memory)
    ranker = Ranker(decoder, tree_nodes=tree_nodes)
    ranked = ranker.rank(ctx, head, names, memory, width=16, top=10)
    assert sorted(r.name for r in ranked) == sorted(names)
    assert [r.logprob for r in ranked] == sorted((r.logprob for r in ranked), reverse=True)
    for r in ranked:
        want = direct_score(model, tok, ranker, p.ids, head, r.name, memory)
        assert r.logprob == pytest.approx(want, abs=1e-3), r.name
        assert tok.decode(r.read().ids[len(p.ids):]).encode() == head + r.name.encode()
        assert r.trail() and all(e is not None for e in r.trail())  # memory reads along the name


def test_the_scores_a_popup_keeps_do_not_hold_the_trie_they_came_from(setup, tok):
    """A popup list keeps every scored name's log-probability and evidence for later keystrokes;
    the trie read whole (its (N, V) log-probabilities, its copy of the prompt's keys and values)
    must not stay alive with them, one per open document."""
    _, decoder, memory = setup
    p = prompt.build(tok, "app/report.py", SRC, len(SRC), prefix_tokens=200)
    ctx = decoder.prefill(p.ids, memory)
    ranker = Ranker(decoder, tree_nodes=96)
    kept = {r.name: (r.logprob, r.trail) for r in ranker.score(ctx, p.head, ["summarize_ledger", "subtotal"], memory)}
    ranker.score(ctx, p.head, ["summary", "super"], memory)  # the ranker keeps only this last trie
    gc.collect()
    assert sum(type(o) is Tree for o in gc.get_objects()) == 1
    assert all(trail() and all(e is not None for e in trail()) for _, trail in kept.values())


def test_a_narrow_beam_finds_at_best_what_reading_the_whole_trie_finds(setup, tok):
    _, decoder, memory = setup
    p = prompt.build(tok, "app/report.py", SRC, len(SRC), prefix_tokens=200)
    head = p.required[: len(p.required) - len(p.typed)]
    names = [f"su{w}" for w in ("m", "per", "btotal", "mmary", "mmarize_ledger", "pplier", "rface", "ffix")]
    ctx = decoder.prefill(p.ids, memory)
    ranker = Ranker(decoder)
    wide = ranker.rank(ctx, head, names, memory, width=32, top=1)
    narrow = Ranker(decoder, tree_nodes=0).rank(ctx, head, names, memory, width=2, top=1)
    assert narrow[0].logprob <= wide[0].logprob + 1e-6
    assert ranker.rank(ctx, head, [], memory) == []


@pytest.mark.parametrize("tree_nodes", [96, 0], ids=["trie read whole", "beam"])
def test_names_static_analysis_does_not_list_lose_the_prior_s_nats(setup, tok, tree_nodes):
    """A name outside the static list scores its log-probability less ``outside``; the best
    bound name then wins unless the model prefers another by more than that.  The beam,
    scoring partial names with the best prior below them, finds what the whole trie finds."""
    _, decoder, memory = setup
    p = prompt.build(tok, "app/report.py", SRC, len(SRC), prefix_tokens=200)
    head = p.required[: len(p.required) - len(p.typed)]
    names = [f"su{w}" for w in ("m", "per", "btotal", "mmary", "mmarize_ledger", "pplier", "rface", "ffix")]
    ctx = decoder.prefill(p.ids, memory)
    plain = {r.name: r.logprob for r in Ranker(decoder).rank(ctx, head, names, memory, width=32, top=len(names))}
    worst = min(plain, key=plain.get)
    bound = frozenset({worst, "not_a_candidate"})
    gap = max(plain.values()) - plain[worst]
    ranker = Ranker(decoder, tree_nodes=tree_nodes)
    got = ranker.rank(ctx, head, names, memory, width=32, top=len(names), prior=Prior(bound, gap + 1.0))
    assert got[0].name == worst and got[0].logprob == pytest.approx(plain[worst], abs=1e-3)
    for r in got[1:]:
        assert r.logprob == pytest.approx(plain[r.name] - gap - 1.0, abs=1e-3)
    assert ranker.rank(ctx, head, names, memory, width=2, top=1, prior=Prior(bound, gap + 1.0))[0].name == worst
    unbound = Ranker(decoder, tree_nodes=tree_nodes).rank(ctx, head, names, memory, width=32, top=1,
                                                          prior=Prior(frozenset(), 50.0))
    assert unbound[0].logprob == pytest.approx(max(plain.values()), abs=1e-3)  # no list, no prior


def test_margin_and_floor_drop_only_names_that_are_not_wanted(setup, tok):
    _, decoder, memory = setup
    p = prompt.build(tok, "app/report.py", SRC, len(SRC), prefix_tokens=200)
    head = p.required[: len(p.required) - len(p.typed)]
    names = [f"su{w}" for w in ("m", "per", "btotal", "mmary", "mmarize_ledger", "pplier", "rface", "ffix",
                                "bprocess_every_quarterly_ledger_line")]
    ctx = decoder.prefill(p.ids, memory)
    ranker = Ranker(decoder)
    full = ranker.rank(ctx, head, names, memory, width=32, top=len(names))
    best = full[0].logprob
    margin = (best - full[-1].logprob) / 2
    kept = ranker.rank(ctx, head, names, memory, width=32, top=len(names), margin=margin)
    want = [r.name for r in full if r.logprob > best - margin]
    assert [r.name for r in kept if r.logprob > best - margin] == want and len(want) < len(names)
    floor = full[1].logprob
    assert [r.name for r in ranker.rank(ctx, head, names, memory, width=32, top=1, floor=floor)] == [full[0].name]
    assert ranker.rank(ctx, head, names, memory, width=32, top=1, floor=best + 1) == []


def test_end_mask_blocks_exactly_the_identifier_continuations(tok):
    decoder = Decoder(random_model(tiny_config(tok.vocab_size)), tok)
    mask = Ranker(decoder).end_mask(torch.device("cpu"))
    for t, b in enumerate(tok.token_bytes):
        continues = bool(b) and (chr(b[0]).isalnum() or b[:1] == b"_" or b[0] >= 0x80)
        assert (mask[t] == float("-inf")) == continues, b


def test_a_name_that_exists_nowhere_is_respelled_only_as_a_near_existing_one():
    text = "from .helpers import _CollectErrors\nrecords = []\nrecordsets = {}\n"
    sources = candidates.Sources(names=lambda: ["compute_invoice_total"])
    got = lambda word: candidates.respellings(word, "app/x.py", text, sources)  # noqa: E731
    assert got("_collect_errors") == ["_CollectErrors"]  # case and underscores aside, the same
    assert got("_CollectErrors") == []  # it exists
    assert got("compute_invoice_totl") == ["compute_invoice_total"]  # one letter off a long name
    assert got("recordset") == ["recordsets"]
    assert got("record") == []  # a short name: likely a variable the line is binding
    assert got("calculate_total") == []  # another name altogether
    assert got("print") == []  # a builtin
    assert candidates.respellings("_collect_errors", "app/x.js", text, sources) == []  # Python only


def test_the_last_trie_read_answers_the_same_question_again(setup, tok):
    """Ghost text and the popup of one keystroke rank the same names after the same prompt
    state: the second asks no model.  Other names, another prompt state or memory are read
    again; a beam (whose answer depends on how far it searched) always searches."""
    _, decoder, memory = setup
    p = prompt.build(tok, "app/report.py", SRC, len(SRC), prefix_tokens=200)
    head = p.required[: len(p.required) - len(p.typed)]
    names = ["summarize_ledger", "subtotal", "sum", "summary", "super"]
    ctx = decoder.prefill(p.ids, memory)
    passes = []
    for name in ("tree", "step"):
        real = getattr(decoder, name)
        setattr(decoder, name, lambda *a, real=real, **k: passes.append(1) or real(*a, **k))
    whole, beam = Ranker(decoder), Ranker(decoder, tree_nodes=0)
    first = whole.score(ctx, head, names, memory, width=4, top=1, floor=-12.0)
    assert len(passes) == 1
    again = whole.score(ctx, head, names, memory, width=8, top=6)
    assert len(passes) == 1  # a trie read whole answers any search of the same names
    assert [(r.name, r.logprob) for r in again] == [(r.name, r.logprob) for r in first]
    whole.score(ctx, head, names[:-1], memory)
    assert len(passes) == 2  # other names: read again
    whole.score(decoder.prefill(p.ids, None), head, names[:-1], None)
    assert len(passes) == 3  # another prompt state (no memory): read again
    beam.score(ctx, head, names, memory, width=4, top=1)
    n = len(passes)
    beam.score(ctx, head, names, memory, width=4, top=1)
    assert len(passes) > n
