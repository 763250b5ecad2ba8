"""The parts of a completion: the prompt (token healing, window, file header), where a completion
stops (scope, Stopper, finish), incremental decoding with evidence (Decoder, token constraints),
and provenance from that evidence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import random_model, tiny_config
from mtlsp_model.memory import TensorMemory
from mtlsp_model.model import ROOM

from mtlsp.complete import prompt
from mtlsp.complete.decode import Decoder, Evidence, common_prefix, guess
from mtlsp.complete.stops import Stopper, finish, scope

REPO = Path(__file__).resolve().parent.parent
LONG_TEXT = (REPO / "mtlsp" / "lsp" / "server.py").read_text()  # a long real source file (500+ lines)

SMALL = "import os\n\n\ndef total(order):\n    return order.pricing.com"


# --------------------------------------------------------------------------- helpers


def body(tok, path: str, p: prompt.Prompt) -> list[int]:
    """The prompt's ids after its file header (which always leads)."""
    header = tok.file_header(path)
    assert p.ids[: len(header)] == header
    return p.ids[len(header):]


def check_healed(tok, path: str, text: str, cursor: int, p: prompt.Prompt) -> None:
    """The text part of the prompt, then the healed bytes, end exactly at the cursor."""
    kept = tok.decode_bytes(body(tok, path, p)) + p.required
    assert text[:cursor].encode().endswith(kept)
    assert p.required.endswith(p.typed.encode())


# --------------------------------------------------------------------------- prompt


@pytest.mark.parametrize(
    ("line", "word"),
    [("    return order.pricing.com", "com"), ("x = ", ""), ("foo(", ""), ("a_1", "a_1"),
     ("print(café", "café"), ("x.y2", "y2"), ("", ""), ("s = '😀", "")],
)
def test_word_before(line, word):
    assert prompt.word_before(line) == word


def test_healing_drops_word_and_token_before(tok):
    path = "src/shop.py"
    cursor = len(SMALL)
    p = prompt.build(tok, path, SMALL, cursor, prefix_tokens=200)
    assert p.typed == "com"
    text = tok.encode(SMALL[: cursor - len("com")])
    # the prompt is the header and the text before the word, less its last token ...
    assert p.ids == tok.file_header(path) + text[:-1]
    # ... whose bytes, with the typed word, must be written first
    assert p.required == tok.token_bytes[text[-1]] + b"com"
    check_healed(tok, path, SMALL, cursor, p)


@pytest.mark.parametrize("cut", [0, 1, 5, 12, 20, len(SMALL) - 3, len(SMALL)])
def test_healing_round_trips_at_any_cursor(tok, cut):
    text = SMALL + "\n"
    p = prompt.build(tok, "a.py", text, cut, prefix_tokens=200)
    check_healed(tok, "a.py", text, cut, p)
    assert tok.decode_bytes(body(tok, "a.py", p)) + p.required == text[:cut].encode()  # from the start


def test_ids_stable_while_typing_one_word(tok):
    base = SMALL[: -len("com")]
    prompts = [prompt.build(tok, "a.py", base + w, len(base + w), prefix_tokens=200)
               for w in ("", "c", "co", "com", "compute")]
    assert [p.typed for p in prompts] == ["", "c", "co", "com", "compute"]
    assert all(p.ids == prompts[0].ids for p in prompts)
    assert [p.required for p in prompts] == [prompts[0].required + w.encode()
                                            for w in ("", "c", "co", "com", "compute")]


def test_text_after_the_cursor_is_not_in_the_prompt(tok):
    """The base has no fill-in-the-middle tokens: what follows the cursor is for the stop rules."""
    head = "def f(x):\n    return x."
    p = prompt.build(tok, "a.py", head + "\n\ny = f(3)\n", len(head), prefix_tokens=200)
    q = prompt.build(tok, "a.py", head, len(head), prefix_tokens=200)
    assert p.ids == q.ids and p.required == q.required


@pytest.mark.parametrize("budget", [64, 100, 300])
def test_prefix_budget_honoured(tok, budget):
    cursor = LONG_TEXT.rindex("\n", 0, len(LONG_TEXT) - 500) + 9  # well into the file
    p = prompt.build(tok, "server.py", LONG_TEXT, cursor, prefix_tokens=budget)
    text = body(tok, "server.py", p)
    assert len(text) <= budget
    # dropped in blocks of 64 tokens, one more healed: the budget is used, not wasted
    assert len(text) >= budget - 64 - 1
    check_healed(tok, "server.py", LONG_TEXT, cursor, p)


def test_preamble_comes_before_the_header(tok):
    pre = tok.file_header("other.py") + tok.encode("def helper():\n    pass\n")
    p = prompt.build(tok, "a.py", SMALL, len(SMALL), prefix_tokens=200, preamble=pre)
    plain = prompt.build(tok, "a.py", SMALL, len(SMALL), prefix_tokens=200)
    assert p.ids == pre + plain.ids and p.required == plain.required


def test_small_prefix_budget_keeps_text_before_cursor(tok):
    text = "total = price * count\n" * 3 + "print(tot"
    p = prompt.build(tok, "a.py", text, len(text), prefix_tokens=10)
    assert len(body(tok, "a.py", p)) <= 10
    assert (tok.decode_bytes(body(tok, "a.py", p)) + p.required).endswith(b"print(tot")


def test_window_starts_at_a_block_of_lines():
    for end in (500, 3000, 8000, len(LONG_TEXT)):
        for chars in (400, 1600):
            start = prompt._window_start(LONG_TEXT, end, chars)
            assert start <= max(0, end - chars)
            assert start == 0 or LONG_TEXT[start - 1] == "\n"
            assert LONG_TEXT.count("\n", 0, start) % 32 == 0
    assert prompt._window_start(LONG_TEXT, 300, 400) == 0


def test_window_start_stable_while_typing(tok):
    # type a few characters in the middle of a long file; the prompts keep a long shared start
    at = LONG_TEXT.index("\n", len(LONG_TEXT) // 2)
    typed = " x + y"
    prompts = []
    for k in range(len(typed) + 1):
        text = LONG_TEXT[:at] + typed[:k] + LONG_TEXT[at:]
        prompts.append(prompt.build(tok, "server.py", text, at + k, prefix_tokens=200))
    # the start moves only when the prompt crosses a block of dropped tokens (50 at this budget):
    # a few typed characters cross at most one
    moved = [common_prefix(a.ids, b.ids) < 150 for a, b in zip(prompts, prompts[1:])]
    assert sum(moved) <= 1


def test_window_start_stable_a_few_chars_apart(tok):
    c = 8000
    ps = [prompt.build(tok, "server.py", LONG_TEXT, c + k, prefix_tokens=200) for k in range(8)]
    header = len(tok.file_header("server.py"))
    # tokens are dropped in blocks of 50 from a 200 budget, one more is healed away: >= 150 kept
    assert min(len(p.ids) for p in ps) >= 150 + header
    # the window's start stays put, but where the prompt crosses a block of dropped tokens
    moved = [common_prefix(a.ids, b.ids) < min(len(a.ids), len(b.ids)) - 20 for a, b in zip(ps, ps[1:])]
    assert sum(moved) <= 1


@pytest.mark.parametrize(
    "text",
    ["s = 'café 😀'\nnom_é", "s = 'café 😀'\nx = '😀", "# 日本語のコメント\nvariable_", "é"],
)
def test_non_ascii_round_trips(tok, text):
    for cursor in range(len(text) + 1):
        p = prompt.build(tok, "ünï.py", text, cursor, prefix_tokens=200)
        check_healed(tok, "ünï.py", text, cursor, p)


def test_healed_bytes_may_split_a_character(tok):
    # a multi-byte character split over tokens: the prompt and the healed bytes still join up
    text = "x = '😀😀😀'"
    p = prompt.build(tok, "a.py", text, len(text) - 1, prefix_tokens=200)
    check_healed(tok, "a.py", text, len(text) - 1, p)
    assert p.typed == "" and p.required


# --------------------------------------------------------------------------- scope


def test_scope_single_line_by_default():
    s = scope("a.py", "x = foo\ny = 2\n", 7)
    assert not s.multiline and s.opener == ""
    s = scope("a.py", "x = foo(a, b)", 8)  # text after the cursor on the line
    assert not s.multiline and s.line_suffix == "a, b)"


def test_scope_block_after_python_header():
    s = scope("a.py", "def f(x):", 9)
    assert s.multiline and s.opener == ":" and s.indent == 0
    t = "class A:\n    def f(self, x):"
    s = scope("a.py", t, len(t))
    assert s.multiline and s.opener == ":" and s.indent == 4


def test_scope_block_on_empty_line_below_header():
    for t in ("def f(x):\n    ", "def f(x):\n\n    ", "def f(x):\n    \n    "):
        s = scope("a.py", t, len(t))
        assert s.multiline and s.opener == ":" and s.indent == 0, t
    t = "def f(x):\n    return x\n    "  # the line above is not a header
    assert not scope("a.py", t, len(t)).multiline


def test_scope_colon_in_comment_or_string_is_not_a_block():
    t = "y = 1  # note:"
    assert not scope("a.py", t, len(t)).multiline
    # a closed docstring ending a line with ':'
    t = 'def f():\n    """Summary:\n    """\n'
    c = t.index("Summary:") + len("Summary:")
    assert not scope("a.py", t, c).multiline
    # the same line in code does open a block
    t = "if y == 1:"
    assert scope("a.py", t, len(t)).multiline


def test_scope_colon_is_python_only():
    t = "switch (x) {\n  case 1:"
    assert not scope("a.js", t, len(t)).multiline


@pytest.mark.parametrize("path", ["a.js", "a.c", "a.ts", "a.go"])
def test_scope_block_after_brace(path):
    t = "int f() {" if path.endswith(".c") else "function f() {"
    s = scope(path, t, len(t))
    assert s.multiline and s.opener == "{"
    t2 = t + "\n    "
    s = scope(path, t2, len(t2))
    assert s.multiline and s.opener == "{"


def test_scope_brace_in_comment_is_not_a_block():
    t = "int a; // {"
    assert not scope("a.c", t, len(t)).multiline
    t = "let a = 1; // {"
    assert not scope("a.js", t, len(t)).multiline


def test_scope_closable_brackets():
    s = scope("a.py", "foo(a, ", 7)
    assert not s.multiline and s.closable == "("
    s = scope("a.py", "foo(a, )", 7)  # the text after the cursor closes it
    assert s.closable == ""
    s = scope("a.py", "foo([a, ", 8)
    assert s.closable == "(["
    s = scope("a.py", "f(x)[0] + g(y, ", 15)  # closed pairs are not pending
    assert s.closable == "("
    s = scope("a.py", "s = '(' + f(", 12)  # a bracket in quotes does not count
    assert s.multiline and s.opener == "("


def test_scope_unknown_extension_does_not_crash():
    s = scope("settings.json", '{', 1)
    assert s.multiline and s.opener == "{"


# --------------------------------------------------------------------------- Stopper / finish


def test_single_line_cut_at_newline():
    st = Stopper(scope("a.py", "x = \n", 4))
    assert st.cut("foo(1)") is None
    assert st.cut("foo(1)\nbar") == len("foo(1)")
    assert st.cut("\n") == 0


def test_a_completion_ends_before_a_control_character():
    """The tiny test model once wrote `ly_discount` and then \x05 forty times: no source holds
    such bytes and an editor shows them as ^E, so the completion ends before the first one."""
    st = Stopper(scope("a.py", "x = \n", 4))
    assert st.cut("ly_discount" + "\x05" * 40) == len("ly_discount")
    assert st.cut("a\x00") == 1 and st.cut("\x1b[0m") == 0
    assert st.cut("f(a)\nb\x05") == len("f(a)")  # an earlier end still wins
    assert st.cut("f(a,\tb)") is None  # a tab is text
    block = Stopper(scope("a.py", "def f():\n", 9))
    assert block.cut("    return 1\x7f") == len("    return 1")


def test_single_line_cut_before_unmatched_closer():
    st = Stopper(scope("a.py", "foo()", 4))  # prefix 'foo(', suffix ')'
    assert st.cut("x)") == 1
    assert st.cut("x]") == 1  # closes nothing at all
    assert st.cut("g(x)") is None  # its own brackets are fine
    assert st.cut("')' + x") is None  # a closer in quotes is fine


def test_single_line_keeps_closer_the_line_left_open():
    st = Stopper(scope("a.py", "foo(a, \n", 7))  # no closer after the cursor
    assert st.cut("x)") is None
    assert st.cut("x)\ny") == 2
    assert st.cut("x))") == 2  # but not one more


def test_bracket_at_line_end_is_a_block_kept_until_its_closer():
    st = Stopper(scope("a.py", "foo(\n", 4))
    assert st.cut("x") is None
    text = "x)\nmore"
    assert text[: st.cut(text)] == "x)"


def test_indent_block_cut():
    st = Stopper(scope("a.py", "def f(x):\n", 9))
    text = "\n    return 1\nprint(2)\n"
    assert text[: st.cut(text)] == "\n    return 1"
    assert st.cut("\n    return 1\n") is None  # not over yet
    text = "\n    if x:\n        y = 1\n\n    return y\n\ndef g():\n"
    assert text[: st.cut(text)] == "\n    if x:\n        y = 1\n\n    return y\n"


def test_indent_block_cut_from_empty_line():
    t = "class A:\n    def f(self):\n        "
    st = Stopper(scope("a.py", t, len(t)))
    text = "return 1\n    def g(self):\n"
    assert text[: st.cut(text)] == "return 1"


def test_indent_block_line_limit():
    st = Stopper(scope("a.py", "def f(x):\n", 9), max_lines=3)
    text = "\n    a = 1\n    b = 2\n    c = 3\n    d = 4\n"
    assert text[: st.cut(text)] == "\n    a = 1\n    b = 2"


def test_bracket_block_cut_at_matching_closer():
    t = "function f() {\n"
    st = Stopper(scope("a.js", t, len(t) - 1))
    text = "\n  if (x) { y(); }\n  return [1, 2];\n}\nfunction g() {}\n"
    assert text[: st.cut(text)] == "\n  if (x) { y(); }\n  return [1, 2];\n}"
    assert st.cut("\n  const s = '}';\n") is None  # a closer in a string does not count


def test_bracket_block_excludes_closer_already_after_cursor():
    t = "function f() {\n    \n}\n"
    c = t.index("    \n") + 4
    st = Stopper(scope("a.js", t, c))
    text = "return 1;\n}\n"
    assert text[: st.cut(text)] == "return 1;"


def test_loop_is_cut_after_first_copy():
    st = Stopper(scope("a.py", "x = \n", 4))
    text = "foo();" * 4
    assert text[: st.cut(text)] == "foo();"
    assert st.cut("=" * 30) is None  # a ruler is not a loop
    assert st.cut("1" * 30) is None  # nor a long number


def test_finish_strips_repeated_line_tail():
    s = scope("a.py", "print(x)", 7)  # suffix ')'
    assert finish(", y)", s) == ", y"
    assert finish(", y", s) == ", y"
    s = scope("a.py", "print(x\n", 7)  # nothing after the cursor
    assert finish(", y)\n", s) == ", y)"


def test_finish_trims_blanks():
    s = scope("a.py", "def f(x):\n", 9)
    assert finish("\n    return 1\n\n  ", s) == "\n    return 1"
    s = scope("a.py", "x = \n", 4)
    assert finish("1  \n", s) == "1  "  # a single line keeps its spaces, loses the newline


# --------------------------------------------------------------------------- decode


@pytest.fixture()
def model(tok):
    return random_model(tiny_config(tok.vocab_size), seed=0)


@pytest.fixture()
def decoder(model, tok):
    return Decoder(model, tok, window=256, chunk=16)


def rand_ids(tok, n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(len(tok.specials), tok.vocab_size, (n,), generator=g).tolist()


def full_logits(model, ids, memory=None):
    with torch.no_grad():
        return model(torch.tensor([ids]), memory=memory).logits[0, -1]


def close(a, b, tol=1e-4):
    return torch.allclose(a, b, atol=tol, rtol=0)


def a_memory(model, tok, seed: int = 3) -> TensorMemory:
    ids = torch.tensor([rand_ids(tok, 40, seed)])
    e = model.encode(ids)
    return TensorMemory(e.keys[0], e.values[0], ids[0], torch.arange(40) // 10)


@pytest.mark.parametrize("n", [1, 2, 7, 16, 40])
def test_prefill_matches_forward(decoder, model, tok, n):
    ids = rand_ids(tok, n)
    ctx = decoder.prefill(ids, None)  # 40 tokens are read in chunks of 16
    assert ctx.ids == ids
    assert ctx.logits.shape == (tok.vocab_size,)
    assert close(ctx.logits, full_logits(model, ids))
    assert all(kv.keys.shape[2] == n and kv.values.shape[2] == n for kv in ctx.kv)
    assert ctx.evidence is None  # no memory, no evidence


def test_a_prompt_s_state_holds_its_own_keys_and_values_only(decoder, tok):
    """A prompt's keys and values are computed as views into each block's fused projections
    (queries included); the context the completer keeps per document must own just its keys and
    values, with room to decode into, so that its size is what it holds."""
    ids = rand_ids(tok, 12)  # one chunk: every layer's keys and values come from one pass
    ctx = decoder.prefill(ids, None)
    for kv in ctx.kv:
        assert kv.buffer is not None and kv.buffer.claimed == 12
        for part, whole in ((kv.keys, kv.buffer.keys), (kv.values, kv.buffer.values)):
            assert part.untyped_storage().nbytes() == whole.numel() * whole.element_size()
            assert whole.shape[2] == 12 + ROOM
    stepped = decoder.step([ctx], [ids[0]], None)[0]  # decoding appends in place, into that room
    assert all(a.buffer is b.buffer for a, b in zip(ctx.kv, stepped.kv))


def test_prefill_with_memory_matches_forward_and_returns_its_evidence(decoder, model, tok):
    mem = a_memory(model, tok)
    ids = rand_ids(tok, 10)
    with_mem = decoder.prefill(ids, mem)
    assert close(with_mem.logits, full_logits(model, ids, mem))
    assert not close(with_mem.logits, full_logits(model, ids))  # the memory made a difference
    ev = with_mem.evidence
    M, k = len(model.cfg.memory_heads), model.cfg.knn_k
    assert ev.weights.shape == ev.sources.shape == (M, k)
    assert ((ev.sources >= 0) & (ev.sources < len(mem))).all()
    assert (ev.weights >= 0).all() and (ev.weights.sum(-1) <= 1 + 1e-5).all()
    # one step with memory matches the forward pass over the longer prompt
    nxt = decoder.step([with_mem], [ids[0]], mem)[0]
    assert close(nxt.logits, full_logits(model, ids + [ids[0]], mem))
    assert nxt.evidence is not None and not torch.equal(nxt.evidence.weights, ev.weights)


def test_decoder_without_the_copy_reads_the_memory_as_the_model_does_without_it(model, tok):
    mem = a_memory(model, tok)
    ids = rand_ids(tok, 10)
    plain = Decoder(model, tok, window=256, chunk=16, copy=False)
    with torch.no_grad():
        uncopied = model(torch.tensor([ids]), memory=mem, copy=False).logits[0, -1]
    got = plain.prefill(ids, mem)
    assert close(got.logits, uncopied)
    assert not close(got.logits, full_logits(model, ids, mem))  # the copy mixes something in
    assert got.evidence is not None  # the memory is still read


def test_contexts_stepped_from_one_parent_each_see_only_their_own_tokens(decoder, tok):
    """Steps append keys and values in place where the parent's buffer has room; a second child
    of the same parent, or the parent read again, must not see the first child's token."""
    ids = rand_ids(tok, 20)
    parent = decoder.prefill(ids[:17], None)
    first = decoder.step([parent], [ids[17]], None)[0]
    assert first.kv[0].buffer is parent.kv[0].buffer  # appended in place
    second = decoder.step([parent], [ids[18]], None)[0]
    assert second.kv[0].buffer is not parent.kv[0].buffer  # the slot was taken: copied
    grandchild = decoder.step([first], [ids[19]], None)[0]
    assert close(first.logits, decoder.prefill(ids[:18], None).logits)
    assert close(second.logits, decoder.prefill(ids[:17] + [ids[18]], None).logits)
    assert close(grandchild.logits, decoder.prefill(ids[:18] + [ids[19]], None).logits)
    again = decoder.prefill(ids[:17] + [ids[19]], None, reuse=parent)
    assert close(again.logits, decoder.prefill(ids[:17] + [ids[19]], None).logits)


def test_prefill_reuses_context(decoder, model, tok):
    ids = rand_ids(tok, 20)
    ctx = decoder.prefill(ids[:17], None)
    kept = ctx.logits.clone()
    longer = decoder.prefill(ids, None, reuse=ctx)
    assert close(longer.logits, decoder.prefill(ids, None).logits)
    assert torch.equal(ctx.logits, kept) and ctx.ids == ids[:17]  # the old context is intact
    assert all(kv.keys.shape[2] == 17 for kv in ctx.kv)
    # only the three new tokens were read: a model whose layers fail on more would still answer
    calls = []
    original = model.forward
    model.forward = lambda idx, **kw: calls.append(idx.shape[1]) or original(idx, **kw)
    decoder.prefill(ids, None, reuse=ctx)
    model.forward = original
    assert calls == [3]


def test_prefill_reuse_after_divergence_and_shortening(decoder, tok):
    ids = rand_ids(tok, 20)
    ctx = decoder.prefill(ids, None)
    other = ids[:12] + rand_ids(tok, 5, seed=7)
    got = decoder.prefill(other, None, reuse=ctx)
    assert close(got.logits, decoder.prefill(other, None).logits)
    shorter = decoder.prefill(ids[:9], None, reuse=ctx)  # a prefix of the cached prompt
    assert close(shorter.logits, decoder.prefill(ids[:9], None).logits)


def test_prefill_identical_ids_returns_same_context(decoder, tok):
    ids = rand_ids(tok, 9)
    ctx = decoder.prefill(ids, None)
    assert decoder.prefill(list(ids), None, reuse=ctx) is ctx


class Versioned:
    """A memory whose entries change under the same object, as the workspace's store does when
    the user saves a new function: it says so through ``version``."""

    def __init__(self, memory: TensorMemory) -> None:
        self.memory, self.version = memory, 0

    def search(self, slot, queries, k):
        return self.memory.search(slot, queries, k)


def test_a_changed_memory_is_read_again_by_the_same_prompt(decoder, model, tok):
    ids = rand_ids(tok, 30)  # longer than the memory tail: its start reads no memory
    memory = Versioned(a_memory(model, tok, seed=3))
    ctx = decoder.prefill(ids, memory)
    assert decoder.prefill(list(ids), memory, reuse=ctx) is ctx  # nothing changed: reused whole
    memory.memory, memory.version = a_memory(model, tok, seed=4), 1
    calls = []
    original = model.forward
    model.forward = lambda idx, **kw: calls.append(idx.shape[1]) or original(idx, **kw)
    again = decoder.prefill(list(ids), memory, reuse=ctx)
    model.forward = original
    assert calls == [decoder.memory_tail]  # only the positions that read the memory
    assert close(again.logits, decoder.prefill(ids, memory).logits)
    assert not close(again.logits, ctx.logits)
    # a context read without memory is reused whole by a prompt that extends it without memory
    plain = decoder.prefill(ids[:20], None)
    assert plain.clean == 20
    assert close(decoder.prefill(ids, memory, reuse=plain).logits, decoder.prefill(ids, memory).logits)


def test_step_batch_matches_single_steps(decoder, model, tok):
    mem = a_memory(model, tok)
    a = decoder.prefill(rand_ids(tok, 8, seed=1), mem)
    b = decoder.prefill(rand_ids(tok, 8, seed=2), mem)
    batched = decoder.step([a, b], [50, 77], mem)
    singles = [decoder.step([a], [50], mem)[0], decoder.step([b], [77], mem)[0]]
    for got, want in zip(batched, singles, strict=True):
        assert got.ids == want.ids
        assert close(got.logits, want.logits)
        assert torch.equal(got.evidence.sources, want.evidence.sources)  # each row keeps its own
        for x, y in zip(got.kv, want.kv, strict=True):
            assert x.keys.shape == y.keys.shape and torch.allclose(x.keys, y.keys, atol=1e-5)
            assert torch.allclose(x.values, y.values, atol=1e-5)
    assert batched[0].ids == a.ids + [50] and a.ids == rand_ids(tok, 8, seed=1)
    # contexts of different lengths go one by one, with the same answers
    c = decoder.prefill(rand_ids(tok, 5, seed=3), mem)
    mixed = decoder.step([a, c], [50, 9], mem)
    assert close(mixed[0].logits, singles[0].logits)
    assert close(mixed[1].logits, decoder.step([c], [9], mem)[0].logits)


def test_a_trie_read_in_one_pass_equals_its_branches_read_one_token_at_a_time(decoder, model, tok):
    """Every node of ``Decoder.tree`` sees the context and its own ancestors only, at its depth's
    position: its scores, evidence and gathered keys/values equal stepping along its branch."""
    mem = a_memory(model, tok)
    ctx = decoder.prefill(rand_ids(tok, 12), mem)
    #        0    1    2    3    4    5: node 2 and 4 are siblings under 1; 5 under the context
    tokens = [50, 77, 91, 12, 63, 77]
    parents = [-1, 0, 1, 2, 1, -1]
    tree = decoder.tree(ctx, tokens, parents, mem)
    assert tree.logits.shape == (len(tokens), tok.vocab_size)
    for node in range(len(tokens)):
        path = tree.path(node)
        assert path[-1] == node and all(tree.parents[b] == a for a, b in zip(path, path[1:]))
        stepped = ctx
        for j in path:
            stepped = decoder.step([stepped], [tokens[j]], mem)[0]
        got = tree.context(node)
        assert got.ids == stepped.ids == ctx.ids + [tokens[j] for j in path]
        assert close(got.logits, stepped.logits) and close(tree.logits[node], stepped.logits)
        assert torch.equal(got.evidence.sources, stepped.evidence.sources)
        assert torch.allclose(got.evidence.weights, stepped.evidence.weights, atol=1e-5)
        for x, y in zip(got.kv, stepped.kv, strict=True):
            assert x.keys.shape == y.keys.shape and torch.allclose(x.keys, y.keys, atol=1e-5)
        # a context gathered from the trie decodes on like any other
        nxt = decoder.step([got], [5], mem)[0]
        assert close(nxt.logits, decoder.step([stepped], [5], mem)[0].logits)
    assert ctx.ids == decoder.prefill(rand_ids(tok, 12), mem).ids  # the context itself is untouched
    with pytest.raises(ValueError, match="before"):
        decoder.tree(ctx, [1, 2], [1, -1], mem)


def test_tokens_read_together_equal_tokens_read_one_at_a_time(decoder, model, tok):
    mem = a_memory(model, tok)
    ctx = decoder.prefill(rand_ids(tok, 12), mem)
    tokens = [50, 77, 91, 12]
    together = decoder.extend(ctx, tokens, mem)
    stepped = ctx
    for t, got in zip(tokens, together, strict=True):
        stepped = decoder.step([stepped], [t], mem)[0]
        assert got.ids == stepped.ids and close(got.logits, stepped.logits)
        assert torch.equal(got.evidence.sources, stepped.evidence.sources)
        assert all(x.keys.shape == y.keys.shape for x, y in zip(got.kv, stepped.kv, strict=True))
    # decoding goes on from any of them (here the second: a guess wrong after one token)
    on = decoder.step([together[1]], [5], mem)[0]
    assert on.ids == ctx.ids + tokens[:2] + [5]
    assert close(on.logits, decoder.step([decoder.step([decoder.step([ctx], [50], mem)[0]], [77], mem)[0]], [5], mem)[0].logits)
    with pytest.raises(ValueError, match="window"):
        decoder.extend(ctx, [1] * (decoder.window - len(ctx.ids) + 1), mem)


def test_a_guess_is_what_followed_the_longest_recent_repeat_of_the_last_tokens():
    #        0  1  2  3  4  5  6  7  8  9
    ids = [7, 1, 2, 3, 9, 1, 2, 4, 5, 1, 2]
    assert guess(ids, 2) == [4, 5]  # "1 2" last occurred at 5-6, followed by 4 5
    assert guess(ids + [3], 3) == [9, 1, 2]  # the 3-gram "1 2 3" occurred at 1-3 (longest first)
    assert guess([1, 2, 3], 2) == []  # nothing repeats
    assert guess([4, 4, 4], 3) == [4]  # a repeat right before the end
    assert guess([3, 8, 6, 3], 2) == []  # one repeated token is not enough
    assert guess([5], 2) == []


def test_window_limits(decoder, tok):
    w = decoder.window
    with pytest.raises(ValueError, match="window"):
        decoder.prefill(rand_ids(tok, w + 1), None)
    with pytest.raises(ValueError):
        decoder.prefill([], None)
    full = decoder.prefill(rand_ids(tok, w), None)
    assert len(full.ids) == w
    with pytest.raises(ValueError):
        decoder.step([full], [20], None)


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([5], [6]) == 0


def _brute_allowed(tok, required: bytes) -> set[int]:
    return {
        i for i, b in enumerate(tok.token_bytes)
        if b and (b.startswith(required) or (len(b) < len(required) and required.startswith(b)))
    }


def test_allowed_matches_brute_force(decoder, tok):
    table = tok.token_bytes
    queries = {b"ab", b"", b"self", b"self.assertEqual(", b"def ", b"\n    ", b"zzzz", b"\xff",
               b"\xff\xff", b"a\xff", b"\xfe\xff", b"\x00", b"\xc3\xa9", b"\xf0\x9f"}
    queries |= {bytes([c]) for c in range(256)}
    queries |= {b[:2] for b in table} | {b for b in table if len(b) > 1}
    queries |= {b + b"\xff" for b in table[:100]} | {b + b"q" for b in table[:100]}
    for req in queries:
        got = decoder.constraints.allowed(req)
        assert len(got) == len(set(got)), req
        assert set(got) == _brute_allowed(tok, req), req
    ab = set(decoder.constraints.allowed(b"ab"))
    assert ab and all(table[i].startswith(b"ab") or b"ab".startswith(table[i]) for i in ab)
    assert tok.encode("a")[0] in ab  # the proper prefix b"a" is allowed
    assert decoder.constraints.allowed(b"\xff") == [tok.encode_bytes(b"\xff")[0]]


def test_mask_matches_allowed(decoder, tok):
    m = decoder.constraints.mask(b"se", torch.device("cpu"))
    assert m.shape == (tok.vocab_size,)
    ok = set(decoder.constraints.allowed(b"se"))
    assert ok == {i for i in range(tok.vocab_size) if m[i] == 0}
    assert all(m[i] == float("-inf") for i in range(tok.vocab_size) if i not in ok)
    assert m[tok.filename] == float("-inf") and m[tok.eot] == float("-inf")


def test_bracket_block_keeps_its_own_closer_when_the_one_after_belongs_to_an_outer_block():
    outer = "function f() {\n  if (x) {\n}"
    cursor = outer.index("if (x) {") + len("if (x) {")
    st = Stopper(scope("a.js", outer, cursor))
    assert st.cut("\n    g();\n  }\n") == len("\n    g();\n  }")
    inner = "function f() {\n  if (x) {\n  }\n}"
    st = Stopper(scope("a.js", inner, cursor))
    assert st.cut("\n    g();\n  }\n") == len("\n    g();")


def test_support_sums_memory_attention_per_line():
    from mtlsp.complete.completer import Recall, support

    class Where:  # sources are (file id << 32 | byte offset), as the store adapter packs them
        @staticmethod
        def where(src: int) -> tuple[str, int]:
            return ("a.py", src & 0xFFFFFFFF) if src >> 32 == 0 else ("b.py", src & 0xFFFFFFFF)

    b = 1 << 32
    first = Evidence(torch.tensor([[0.6, 0.2], [0.1, 0.0]]), torch.tensor([[0, 10], [b + 5, -1]]))
    second = Evidence(torch.tensor([[0.3, 0.1], [0.0, 0.0]]), torch.tensor([[12, 0], [-1, -1]]))
    got = support([first, None, second], Recall(Where(), lambda path, off: 1 + off // 10))
    weights = {(s.path, s.line): s.weight for s in got}
    total = 0.6 + 0.2 + 0.1 + 0.3 + 0.1
    assert weights[("a.py", 1)] == pytest.approx((0.6 + 0.1) / total)  # offset 0 twice
    assert weights[("a.py", 2)] == pytest.approx((0.2 + 0.3) / total)  # offsets 10 and 12
    assert weights[("b.py", 1)] == pytest.approx(0.1 / total)
    assert [s.path for s in got][0] == "a.py" and len(got) == 3


# --------------------------------------------------------------------------- static names


def test_jedi_is_asked_once_per_place_whatever_is_typed_there(tmp_path):
    from mtlsp.complete.static import Jedi

    (tmp_path / "shapes.py").write_text("def area_of_circle(r):\n    return 3.14 * r * r\n")
    jedi = Jedi(tmp_path)
    text = "import shapes\n\nshapes.ar\nprint(1)\n"
    cursor = text.index("ar\n") + 2
    names = jedi.names_at("main.py", text, cursor)
    assert "area_of_circle" in names
    typed_on = text[:cursor] + "e" + text[cursor:]
    assert jedi.names_at("main.py", typed_on, cursor + 1) is names  # the same place: kept
    assert jedi.names_at("main.py", typed_on, cursor + 1, keep_s=0.0) is not names  # for a while
    elsewhere = text.replace("print(1)", "shapes.")
    assert "area_of_circle" in jedi.names_at("main.py", elsewhere, len(elsewhere) - 1)
