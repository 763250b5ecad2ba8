"""``Completer``'s per-document caches, with a tiny random model: what a keystroke reuses, what
it recomputes, and that one document's caches are not another's.

The caches are what keep typing cheap: within one word the prompt's ids do not change (token
healing), so its model state is reused outright; a keystroke that matches the ghost text shown,
or that extends a word the popup listed, is answered without the model at all.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_model, tiny_config

from mtlsp.complete import completer as completer_module
from mtlsp.complete.candidates import ModuleNames, Sources
from mtlsp.complete.completer import Completer, Recall, _Word
from mtlsp.complete.decode import Decoder

PATH = "app/pricing.py"
BASE = "def line_total(price, quantity):\n    return price * quantity\n\n\ndef report(rows):\n    total = "
A, B = "file:///ws/app/a.py", "file:///ws/app/b.py"


@pytest.fixture()
def completer(tok) -> Completer:
    return Completer(Decoder(random_model(tiny_config(tok.vocab_size), seed=0), tok, window=512))


def ghost(completer: Completer, uri: str, typed: str):
    text = BASE + typed
    return completer.inline(uri, PATH, text, len(text), None, max_tokens=8)


def other_than(ch: str) -> str:
    """A keystroke that does not match the ghost text shown (which starts with ``ch``)."""
    return "q" if ch != "q" else "z"


def test_a_second_keystroke_in_the_same_word_reuses_the_prompt_state(completer):
    first = ghost(completer, A, "li")
    state = completer._docs[A].inline  # the prompt's model state, kept for the next keystroke
    assert state is not None and not first.cached and first.tokens > 0
    again = ghost(completer, A, "li" + other_than(first.text[:1]))  # not the ghost text: the model runs
    assert not again.cached and again.tokens > 0
    # the healed prompt ends before the word, so its ids are those of the first keystroke and the
    # decoder hands back the very state it read then
    assert completer._docs[A].inline is state


def test_a_keystroke_that_matches_the_ghost_text_is_answered_from_it(completer):
    shown = ghost(completer, A, "li")
    assert len(shown.text) >= 2, "the tiny model wrote too little to type into"
    one = ghost(completer, A, "li" + shown.text[0])
    assert one.cached and one.tokens == 0 and one.text == shown.text[1:]
    two = ghost(completer, A, "li" + shown.text[:2])  # still the same completion, further in
    assert two.cached and two.text == shown.text[2:]
    # a keystroke off the shown text is decoded afresh
    assert not ghost(completer, A, "li" + other_than(shown.text[0])).cached


def test_text_after_the_cursor_must_be_unchanged_for_the_ghost_text_to_stand(completer):
    shown = ghost(completer, A, "li")
    text = BASE + "li" + shown.text[0] + "\n# an edit after the cursor\n"
    got = completer.inline(A, PATH, text, len(BASE) + 3, None, max_tokens=8)
    assert not got.cached


def test_forget_drops_a_document_s_caches(completer):
    shown = ghost(completer, A, "li")
    completer.forget(A)
    assert A not in completer._docs
    again = ghost(completer, A, "li" + shown.text[0])
    assert not again.cached and again.tokens > 0
    completer.forget("file:///never/opened.py")  # forgetting an unknown document is no error


def test_another_document_does_not_share_the_caches(completer):
    shown = ghost(completer, A, "li")
    in_b = ghost(completer, B, "li" + shown.text[0])  # B's text is what A's keystroke would be
    assert not in_b.cached and in_b.tokens > 0
    assert completer._docs[B].inline is not completer._docs[A].inline
    assert ghost(completer, A, "li" + shown.text[0]).cached  # A's ghost text still stands


def test_the_popup_list_answers_a_keystroke_into_a_listed_word(completer):
    typed, listed = completer.popup(A, PATH, BASE + "li", len(BASE) + 2, None)
    assert typed == "li" and listed, "the tiny model listed nothing"
    word = listed[0].word
    state = completer._docs[A].popup
    more = word[: len(typed) + 1]
    typed2, still = completer.popup(A, PATH, BASE + more, len(BASE) + len(more), None)
    assert typed2 == more
    # the same items, filtered to the longer word, not new ones from the model
    assert still and all(any(s is c for c in listed) for s in still)
    assert all(s.word.startswith(more) for s in still)
    assert completer._docs[A].popup is state
    # another document with the same text gets its own items
    _, fresh = completer.popup(B, PATH, BASE + more, len(BASE) + len(more), None)
    assert not any(f is c for f in fresh for c in listed)


def test_a_listed_name_typed_whole_stays_listed_without_ranking_again(completer):
    """The word typed out in full is an item, as in jedi's lists: the popup answers from the
    scores it kept instead of ranking the longer names again (a trie read of 270-370 ms on flask)."""
    _, listed = completer.popup(A, PATH, BASE + "li", len(BASE) + 2, None)
    assert listed, "the tiny model listed nothing"
    word = listed[0].word
    typed, still = completer.popup(A, PATH, BASE + word, len(BASE) + len(word), None)
    assert typed == word and still[0] is listed[0]


def test_only_the_most_recently_used_documents_keep_their_model_state(tok):
    completer = Completer(Decoder(random_model(tiny_config(tok.vocab_size), seed=0), tok, window=512), max_docs=2)
    uris = [f"file:///ws/app/m{i}.py" for i in range(3)]
    shown = ghost(completer, uris[0], "li")
    ghost(completer, uris[1], "li")
    ghost(completer, uris[0], "li" + shown.text[0])  # uris[0] used again: uris[1] is now the oldest
    ghost(completer, uris[2], "li")
    assert list(completer._docs) == [uris[0], uris[2]]
    assert ghost(completer, uris[0], "li" + shown.text[:2]).cached  # still kept


def test_ghost_text_and_popup_at_one_place_read_the_prompt_once(completer):
    ghost(completer, A, "")
    state = completer._docs[A].inline
    completer.popup(A, PATH, BASE, len(BASE), None)
    assert completer._docs[A].popup is state


def test_a_name_that_appears_while_typing_is_ranked_into_the_popup(completer):
    names = ["line_total", "listing", "report"]
    recall = Recall(None, lambda path, offset: 0, Sources(lambda: list(names)))
    text = BASE + "l"
    _, listed = completer.popup(A, PATH, text, len(text), recall)
    assert listed
    before = completer._docs[A].listed
    completer.popup(A, PATH, text, len(text), recall)
    assert completer._docs[A].listed is before  # nothing new: answered from the list
    names.append("lint_everything")  # typed a moment ago in another buffer
    completer.popup(A, PATH, text, len(text), recall)
    assert completer._docs[A].listed is not before  # ranked again, with the new name
    assert "lint_everything" in completer._docs[A].listed.pool


def test_a_keystroke_is_answered_from_every_name_scored_not_only_those_listed(completer):
    """A name below the first list's cut is still the best one for a longer word: the list for
    ``lq`` comes from the scores kept, without ranking again, and it is that name."""
    names = [f"l{c}_{c}{c}" for c in "abcdefghijkmnopq"]  # one name per second letter
    recall = Recall(None, lambda path, offset: 0, Sources(lambda: list(names)))
    text = BASE + "l"
    _, listed = completer.popup(A, PATH, text, len(text), recall)
    kept = completer._docs[A].listed
    assert all(n in kept.scored for n in names)  # a small trie: every name scored
    below = [n for n in names if n not in {c.word for c in listed}]
    assert below, "every name was listed: nothing to type into"
    name = below[0]
    more = text + name[1]
    _, answer = completer.popup(A, PATH, more, len(more), recall)
    assert completer._docs[A].listed is kept  # answered from the scores, not ranked again
    assert [c.word for c in answer] == [name] and answer[0].logprob == kept.scored[name][0]


def test_a_called_name_that_exists_nowhere_is_respelled_as_the_existing_one(completer, tok, monkeypatch):
    """Ghost text that calls ``_collect_errors()`` where the file imports ``_CollectErrors``
    writes the existing name instead, continuing from the model's own reading of it."""
    monkeypatch.setattr(completer_module, "_NAME_FLOOR", float("-inf"))  # a random model finds every name unlikely
    text = "from .helpers import _CollectErrors\n\n\ndef teardown():\n    errors ="
    recall = Recall(None, lambda path, offset: 0, Sources(lambda: ["teardown"]))
    ctx = completer.decoder.prefill(tok.encode(text), None)
    written = b" _collect_errors"
    word = _Word(ctx, 0, 1, 1)  # the token that began it starts the output; the name, one byte in
    got = completer._respell(word, written, text.encode(), PATH, text, recall, None)
    assert got is not None
    after, out, trail = got
    assert out == b" _CollectErrors"
    name_ids = tok.encode_bytes(out)
    assert after.ids == ctx.ids + name_ids
    plain = completer.decoder.prefill(ctx.ids + name_ids, None)
    assert torch.allclose(after.logits.float(), plain.logits.float(), atol=2e-2)
    assert len(trail) == 1 + len(name_ids)  # the prompt's evidence, then one per token of the name
    # a name that exists, an attribute, a name being defined or imported: left as written
    for before, name in [("errors =", b" _CollectErrors"), ("errors = self.", b"_collect_errors"),
                         ("def", b" _collect_errors"), ("from .helpers import", b" _collect_errors")]:
        t = text[: text.rindex("\n") + 5] + before
        c = completer.decoder.prefill(tok.encode(t), None)
        start = 1 if name.startswith(b" ") else 0
        assert completer._respell(_Word(c, 0, start, 1), name, t.encode(), PATH, t, recall, None) is None


def test_the_identifier_being_written_is_tracked_token_by_token():
    ctx = object()  # only carried along
    word = _Word.after(None, ctx, b" =", b" _", 3)
    assert (word.token, word.start, word.evidence) == (2, 3, 3)
    assert _Word.after(word, ctx, b" = _", b"collect", 4) is word  # lengthens it
    assert _Word.after(word, ctx, b" = _collect", b"()", 5) is None  # ends it
    inner = _Word.after(None, ctx, b"f", b"(x", 2)
    assert (inner.token, inner.start) == (1, 2)  # begins inside the token
    assert _Word.after(None, ctx, b"", b"\xc3\xa9", 1) is None  # not an ASCII name


def test_ghost_text_and_popup_at_one_keystroke_rank_the_names_once(completer):
    """An editor asks for both at every keystroke; the popup takes the ghost text's ranking."""
    names = ["line_total", "listing", "lint_everything"]
    recall = Recall(None, lambda path, offset: 0, Sources(lambda: list(names)))
    text = BASE + "li"
    reads = []
    read_trie = completer.decoder.tree
    completer.decoder.tree = lambda *a, **k: reads.append(1) or read_trie(*a, **k)
    completer.inline(A, PATH, text, len(text), recall, max_tokens=4)
    assert len(reads) == 1
    _, listed = completer.popup(A, PATH, text, len(text), recall)
    assert len(reads) == 1 and listed
    _, alone = completer.popup(B, PATH, text, len(text), recall)  # another document ranks for itself
    assert len(reads) == 2
    assert [(c.word, c.logprob) for c in listed] == [(c.word, c.logprob) for c in alone]


def test_after_a_module_the_names_an_edit_added_a_moment_ago_lead(completer):
    """After ``pricing.``, a name the module gained a moment ago (``Indexer.gained``) tops the
    popup and starts the ghost text, even where the model ranks it last; the other names follow
    in the model's order."""
    module = "VAT = 1\nRATE = 2\n\ndef subtotal(x):\n    return x\n\n\ndef settle_orphaned_ribbons(x):\n    return x\n"
    text = "from app import pricing\n\n\ndef report(lines):\n    total = pricing."
    gained: set[str] = set()
    modules = ModuleNames({"app/pricing.py": module, "app/__init__.py": ""}.get, lambda rel: gained)
    recall = Recall(None, lambda path, offset: 0, Sources(lambda: [], modules=modules))
    _, plain = completer.popup(A, "app/report.py", text, len(text), recall, items=8)
    scores = completer._docs[A].listed.scored
    last = min(scores, key=lambda n: scores[n][0])  # the name the model likes least
    assert [c.word for c in plain][0] != last
    gained.add(last)
    reads = []
    read_trie = completer.decoder.tree
    completer.decoder.tree = lambda *a, **k: reads.append(1) or read_trie(*a, **k)
    inline = completer.inline(B, "app/report.py", text, len(text), recall, max_tokens=8)
    assert (inline.text + " ").startswith(last) and not inline.text[len(last):len(last) + 1].isidentifier()
    _, listed = completer.popup(B, "app/report.py", text, len(text), recall, items=8)
    assert len(reads) == 2  # the ghost text ranked the new name alone, the popup every name
    words = [c.word for c in listed]
    assert words[0] == last
    rest = sorted((n for n in scores if n != last), key=lambda n: -scores[n][0])
    assert words[1:] == [n for n in rest if n in words[1:]] and words[1] == rest[0]


def test_ghost_text_ranks_the_names_an_edit_added_alone(completer):
    """After ``module.``, ghost text ranks only the names an edit added (they lead whatever the
    rest score): one pass over their trie, no search of the module's other names
    (``Decoder.step``), even where the module's trie is too large to read whole.  Where the
    popup has just ranked the whole module at the same place, ghost text reads nothing more."""
    module = "VAT = 1\nRATE = 2\n\ndef subtotal(x):\n    return x\n\n\ndef fresh_total(x):\n    return x\n"
    text = "from app import pricing\n\n\ndef report(lines):\n    total = pricing."
    modules = ModuleNames({"app/pricing.py": module, "app/__init__.py": ""}.get, lambda rel: {"fresh_total"})
    recall = Recall(None, lambda path, offset: 0, Sources(lambda: [], modules=modules))
    new_name = len(completer.tok.encode(".fresh_total"))
    completer.ranker.tree_nodes = new_name + 1  # the new name's trie is read whole, the module's is not
    steps, tries = [], []
    step, tree = completer.decoder.step, completer.decoder.tree
    completer.decoder.step = lambda *a, **k: steps.append(1) or step(*a, **k)
    completer.decoder.tree = lambda ctx, tokens, *a, **k: tries.append(len(tokens)) or tree(ctx, tokens, *a, **k)
    inline = completer.inline(A, "app/report.py", text, len(text), recall, max_tokens=8)
    assert inline.text.startswith("fresh_total") and not steps and len(tries) == 1 and tries[0] <= new_name
    _, listed = completer.popup(B, "app/report.py", text, len(text), recall, items=8)
    assert steps and listed[0].word == "fresh_total"  # the popup searches the whole module
    completer.ranker.tree_nodes = 96  # a module read whole: the popup first, then ghost text reuses it
    tries.clear()
    completer.forget(B)
    completer.popup(B, "app/report.py", text, len(text), recall, items=8)
    inline = completer.inline(B, "app/report.py", text, len(text), recall, max_tokens=8)
    assert inline.text.startswith("fresh_total") and len(tries) == 1 and tries[0] > new_name


def test_a_name_static_analysis_lists_outranks_one_it_does_not_by_the_prior(tok):
    """Where jedi lists names at the cursor, the others lose ``unbound`` nats in the popup's
    ranking; without the prior the model's order stands."""
    names = ["line_total", "lines_sorted", "linear", "lineage"]
    text = BASE + "rows.li"  # after "x." no builtins: a small trie, every name scored exactly
    model = random_model(tiny_config(tok.vocab_size), seed=0)
    plain = Completer(Decoder(model, tok, window=512), unbound=0.0)
    recall = Recall(None, lambda path, offset: 0, Sources(lambda: list(names)))
    _, items = plain.popup(A, PATH, text, len(text), recall)
    last = next(n for n in names if n != items[0].word)  # a name the model finds less likely
    static = Recall(None, lambda path, offset: 0, Sources(lambda: list(names), static=lambda p, t, c: [last]))
    weighted = Completer(Decoder(model, tok, window=512), unbound=1e4)
    _, items = weighted.popup(A, PATH, text, len(text), static)
    assert items[0].word == last and all(c.logprob < -1e3 for c in items[1:])
    _, items = Completer(Decoder(model, tok, window=512), unbound=0.0).popup(A, PATH, text, len(text), static)
    assert items[0].word != last  # without the prior the model's order stands


def test_tokens_fork_where_one_goes_on_to_another_argument_and_the_other_closes():
    assert completer_module._fork(b",", b")") and completer_module._fork(b",", b"]")
    assert completer_module._fork(b"__,", b"__)")  # after the same characters
    assert completer_module._fork(b'",', b'")')  # closing the same string
    assert not completer_module._fork(b")", b",")  # the chosen token must be the one going on
    assert not completer_module._fork(b"),", b"))")  # they differ after closing a bracket already
    assert not completer_module._fork(b",", b" static")
    assert not completer_module._fork(b'",', b"')")


def test_a_fork_is_the_likeliest_closing_rival_of_the_chosen_comma(completer, tok):
    ctx = completer.decoder.prefill(tok.encode(BASE), None)
    comma, close, other = tok.encode(","), tok.encode(")"), tok.encode("x")
    assert len(comma) == len(close) == len(other) == 1
    scores = torch.full((tok.vocab_size,), -20.0)
    scores[comma[0]], scores[other[0]], scores[close[0]] = -0.5, -1.0, -2.0
    fork = completer_module._Fork.at(ctx, scores, b",", b"a", 3, -1.5, tok.token_bytes)
    assert [(f.closer, f.out, f.evidence, f.logp) for f in [fork]] == [(close[0], b"a", 3, -1.5)]
    assert fork.closer_logp == float(ctx.logits[close[0]])  # the model's own, not the masked score
    scores[close[0]] = -30.0  # not among the rivals: no fork
    assert completer_module._Fork.at(ctx, scores, b",", b"a", 3, -1.5, tok.token_bytes) is None


def test_ghost_text_closes_the_call_early_where_that_whole_line_is_likelier(completer, tok):
    """Greedy decoding chose a comma after ``a``; closing the call there instead ends the line at
    once (the text after the cursor closes it), so that line's log-probability is the closing
    token's.  It replaces the written line only where it is likelier, and a fork that cannot win
    is not read at all."""
    text = "def f(a, b):\n    return a\n\n\nx = f()\n"
    cursor = text.index(")\n")
    scope = completer_module.stops.scope(PATH, text, cursor)
    stopper = completer_module.stops.Stopper(scope)
    ctx = completer.decoder.prefill(tok.encode(text[:cursor] + "a"), None)
    close = tok.encode(")")[0]
    fork = completer_module._Fork(ctx, b"a", 2, -1.0, close)
    closing = fork.logp + fork.closer_logp  # the whole line: "a", then the closer ends it
    assert completer._closed_early([fork], closing - 0.5, b"", stopper, None, None) == ("a", fork, [])
    steps = []
    completer.decoder.step = completer.decoder.extend = lambda *a: steps.append(a)
    assert completer._closed_early([fork], closing + 0.5, b"", stopper, None, None) is None
    assert steps == []
    completer.closings = 0
    assert completer._closed_early([fork], closing - 0.5, b"", stopper, None, None) is None
