"""Prompt + memory → completions: ghost text (greedy, to a syntactic stop) and popup items (beam).

The server calls ``Completer`` from one worker thread.  Per document it keeps the model state of
the last prompts (``decode.Context``), the last ghost text shown and the last popup list, so that:

- a keystroke that matches the ghost text is answered from it, and one that extends the word
  of the popup list from the items it still matches, without the model;
- otherwise only the tokens after the prompt's unchanged prefix are computed.

Every completion carries its **support**: the memory entries its tokens attended to, as the
share of memory attention each file and line received (the memory heads' own softmax weights,
returned by the decoder with the scores they produced).  That is the provenance the editor shows.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from . import candidates, prompt, stops
from .decode import Context, Decoder, Evidence, check, common_prefix, guess
from .rank import Prior, Ranked, Ranker
from .retrieval import StoreMemory

LineOf = Callable[[str, int], int]  # (path, byte offset) -> 1-based line
# name -> (log-probability, the memory evidence along it, computed on demand): what a ranking scored
Scored = dict[str, tuple[float, Callable[[], Sequence[Evidence | None]]]]
_PLAUSIBLE = 6.0  # popup items within this many nats of the best
UNBOUND = 4.0  # see ``Completer``; measured in docs/benchmarks.md (benchmarks/popup_prior.py)
_NAME_FLOOR = -12.0  # elsewhere ghost text starts with an existing name only if the model finds it this likely
_IMPORTING = re.compile(r"\s*(import|from)\s")  # names an import binds need not exist yet


@dataclass(frozen=True)
class Support:
    path: str
    line: int
    weight: float  # share of the completion's memory attention


@dataclass
class Inline:
    text: str  # inserted at the cursor
    support: list[Support]
    tokens: int  # generated tokens (0 when answered from the cache)
    ms: float
    cached: bool = False


@dataclass
class Candidate:
    word: str  # the whole identifier, the typed part included
    logprob: float
    support: list[Support]


@dataclass
class _Shown:
    before: str
    after: str
    text: str
    support: list[Support]


@dataclass
class Recall:
    """A workspace folder's memory as completions use it."""

    memory: StoreMemory | None  # None: the names below, but no kNN memory (evaluation)
    line_of: LineOf  # for provenance
    sources: candidates.Sources | None = None  # names that exist (popup candidates)


@dataclass(frozen=True)
class _Listed:
    """A popup list's prompt, typed word and candidates, and every name its ranking scored
    (name -> log-probability and memory evidence).  While the user types on into the word, the
    answer comes from those scores, without the model:

    - where every candidate that still matches was scored (a trie read whole scores them all),
      it is the best of them: exactly what ranking again would give;
    - where some were not (a beam finishes only the names it followed), it is the best of the
      scored names that still match, as long as no candidate appeared since.  Ranking again at
      the first typed letter made the popup's p50 over all requests 262-342 ms instead of 6 ms
      in ``mtlsp eval`` on flask and evaluate, for the same popup top-1 with the memory at 1
      and 2 typed;
    - a candidate that appeared since (a function typed a moment ago) was never scored: the
      names are ranked again.

    The word typed out in full is listed too, as jedi lists it: leaving it out left no scored
    name that matched, and ranking the longer names again at that keystroke (a trie read of
    270-370 ms on flask) was the popup's slowest keystroke, for names the model finds far less
    likely than the word itself (``get_cookie`` at -7.5 nats beside ``get`` at -0.5).

    A changed memory alone does not rank them again: the user's own buffer is written into the
    memory while they type, and re-ranking at each such write cost keystrokes 0.3-1.2 s on
    flask, for scores that barely move."""

    ids: list[int]
    typed: str
    pool: frozenset[str]  # the candidates ranked
    scored: Scored
    shown: dict[str, Candidate] = field(default_factory=dict)  # items already made (support computed)

    def answer(self, typed: str, pool: candidates.Names, items: int, recall: Recall | None) -> list[Candidate] | None:
        """The list for ``typed``, or None where the scores kept cannot tell (see above).
        ``pool``: the candidates now (empty where the list is the model's own beam)."""
        if not typed.startswith(self.typed):
            return None
        if pool and all(name in self.scored for name in pool):
            names: Sequence[str] = pool
        elif self.pool.issuperset(pool):
            names = [n for n in self.scored if n.startswith(typed)]
        else:
            return None
        return _best({n: self.scored[n] for n in names}, items, recall, self.shown, pool.first) or None


@dataclass
class _Doc:
    inline: Context | None = None
    popup: Context | None = None
    shown: _Shown | None = None
    listed: _Listed | None = None


def support(evidence: Sequence[Evidence | None], recall: Recall, top: int = 5) -> list[Support]:
    """Files and lines by the share of memory attention their entries received, summed over
    the memory heads and the completion's positions."""
    got: dict[int, float] = defaultdict(float)
    for ev in evidence:
        if ev is None:
            continue
        ok = ev.sources >= 0
        for src, w in zip(ev.sources[ok].tolist(), ev.weights[ok].tolist()):
            got[src] += w
    total = sum(got.values())
    if total <= 0:
        return []
    lines: dict[tuple[str, int], float] = defaultdict(float)
    for src, weight in got.items():
        path, offset = recall.memory.where(src)
        lines[(path, recall.line_of(path, offset))] += weight
    ranked = sorted(lines.items(), key=lambda kv: -kv[1])[:top]
    return [Support(path, line, weight / total) for (path, line), weight in ranked]


class Completer:
    def __init__(self, decoder: Decoder, *, prefix_tokens: int = 384, max_docs: int = 8, guess_tokens: int = 3,
                 unbound: float = UNBOUND, closings: int = 2) -> None:
        """``guess_tokens``: tokens guessed ahead while writing ghost text (``_advance``; 0: none).
        ``closings``: how many earlier closings of a call ghost text may weigh against the line
        it wrote (``_closed_early``; 0: plain greedy decoding).
        ``unbound``: nats a candidate name loses where static analysis lists others but not it
        (``rank.Prior``; 0: the model alone ranks them).
        ``max_docs``: documents whose model state is kept.  A prompt's keys and values take
        about 20 MB (384 tokens and room for 64, 30 layers, float32), one or two per document
        (ghost text and popup share one where their prompts agree); an editor with many files
        open would otherwise hold them all, while only the ones being typed in pay off."""
        self.decoder = decoder
        self.tok = decoder.tok
        self.ranker = Ranker(decoder)
        self.prefix_tokens = prefix_tokens
        self.max_docs = max_docs
        self.guess_tokens = guess_tokens
        self.unbound = unbound
        self.closings = closings
        self._docs: OrderedDict[str, _Doc] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self._aside = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtlsp-names")  # see ``_read``

    def forget(self, uri: str) -> None:
        with self._lock:
            self._docs.pop(uri, None)

    def _doc(self, uri: str) -> _Doc:
        with self._lock:
            doc = self._docs.pop(uri, None) or _Doc()
            self._docs[uri] = doc
            while len(self._docs) > self.max_docs:
                self._docs.popitem(last=False)
            return doc

    # ------------------------------------------------------------------ ghost text

    def inline(
        self,
        uri: str,
        path: str,
        text: str,
        cursor: int,
        recall: Recall | None,
        *,
        max_tokens: int,
        cancel: threading.Event | None = None,
        preamble: Sequence[int] = (),
        names: bool = True,
    ) -> Inline:
        """Ghost text at ``cursor``.  ``names``: start an identifier with an existing name when
        the model finds one likely (the candidate ranking; off to measure the model alone)."""
        t0 = time.perf_counter()
        doc = self._doc(uri)
        memory = recall.memory if recall else None
        before, after = text[:cursor], text[cursor:]
        shown = doc.shown
        if shown is not None and after == shown.after and before.startswith(shown.before):
            typed = before[len(shown.before):]
            if len(shown.text) > len(typed) and shown.text.startswith(typed):
                return Inline(shown.text[len(typed):], shown.support, 0, _ms(t0), cached=True)
        scope = stops.scope(path, text, cursor)
        budget = min(self.prefix_tokens, self.decoder.window - len(preamble) - max_tokens - 8)
        p = prompt.build(self.tok, path, text, cursor, prefix_tokens=budget, preamble=preamble)
        line_before = before[before.rfind("\n") + 1 :]
        spell = names and candidates.identifier_position(line_before, p.typed)
        sources = recall.sources if recall else None
        ctx, pool = self._read(doc, "inline", p.ids, memory, cancel,
                               (lambda: candidates.pool(path, text, cursor, p.typed, sources)) if spell else None)
        evidence = [ctx.evidence]
        stopper = stops.Stopper(scope)
        out = b""
        written = ""
        n = 0
        named = False  # ``out`` ends with a whole name chosen among existing ones: it may not grow
        ahead: list[Context] = []  # contexts after guessed tokens (``_advance``)
        if spell:
            # the identifier at the cursor is spelled from a name that exists, if one is likely
            best = self._name_at(ctx, p.head, pool, memory, cancel) if pool else []
            if best:
                ctx, out, named = best[0].read(), p.head + best[0].name.encode("utf-8"), True
                evidence += best[0].trail()
                written = out[len(p.required):].decode("utf-8", "ignore")
        word: _Word | None = None  # the name the model is writing (where it began), for ``_respell``
        lead = before[-200:].encode("utf-8")[: -len(p.required) or None]  # what precedes the output
        logp = 0.0  # the log-probability of the tokens written since the prompt or the chosen name
        forks: list[_Fork] = []  # where the call could have been closed instead (``_closed_early``)
        ended = False
        for n in range(1, max_tokens + 1):
            check(cancel)
            if len(ctx.ids) >= self.decoder.window:
                break
            scores = ctx.logits
            if len(out) < len(p.required):
                scores = scores + self.decoder.constraints.mask(p.required[len(out):], scores.device)
            elif named:  # the chosen name is whole: the next token may not lengthen it
                scores = scores + self.ranker.end_mask(scores.device)
            t = int(scores.argmax())
            if self.tok.is_special[t] or not torch.isfinite(scores[t]):
                break  # <|endoftext|> or another control token: the model says the file ends
            piece = self.tok.token_bytes[t]
            if word is not None and names and piece[:1] in (b"(", b"."):
                fixed = self._respell(word, out, lead, path, text, recall, cancel)
                if fixed is not None:  # the name the model wrote exists nowhere: an existing one instead
                    ctx, out, trail = fixed
                    evidence[word.evidence - 1 :] = trail
                    written = out[len(p.required):].decode("utf-8", "ignore")
                    ahead.clear()
                    forks.clear()  # ``logp`` counted the misspelling: the forks before it cannot be weighed
                    word, named = None, True
                    continue
            word = _Word.after(word, ctx, out, piece, len(evidence)) if len(out) + len(piece) > len(p.required) else None
            if self.closings and not scope.multiline and len(out) >= len(p.required) and b"," in piece:
                fork = _Fork.at(ctx, scores, piece, out, len(evidence), logp, self.tok.token_bytes)
                forks += [fork] if fork else []
            logp += float(ctx.logits[t])
            named = False
            out += piece
            if len(out) >= len(p.required):
                written = out[len(p.required):].decode("utf-8", "ignore")
                line = _finished(written, stopper)
                if line is not None:
                    written, ended = line, True
                    break
            ctx = self._advance(ctx, t, ahead, memory)
            evidence.append(ctx.evidence)
        if ended and forks:
            closed = self._closed_early(forks, logp, p.required, stopper, memory, cancel)
            if closed is not None:
                written, fork, trail = closed
                evidence[fork.evidence:] = trail
        result = stops.finish(written, scope)
        ranked_support = support(evidence, recall) if recall else []
        doc.shown = _Shown(before, after, result, ranked_support) if result else None
        return Inline(result, ranked_support, n, _ms(t0))

    def _respell(self, word: _Word, out: bytes, lead: bytes, path: str, text: str, recall: Recall | None,
                 cancel) -> tuple[Context, bytes, list[Evidence | None]] | None:
        """Where ghost text calls or dereferences a bare name that exists nowhere, the existing
        name it misspells (``candidates.respellings``) that the model finds likeliest at that
        place: the context after it, ``out`` with it, and the memory's evidence along it.  None
        where the name exists, is being defined or imported, or has no likely respelling."""
        name = out[word.start :].decode("utf-8", "ignore")
        before = (lead + out[: word.start]).decode("utf-8", "ignore")
        before = before[before.rfind("\n") + 1 :]
        if before.endswith(".") or candidates.defining(before) or _IMPORTING.match(before):
            return None
        sources = recall.sources if recall else None
        spellings = candidates.respellings(name, path, text, sources)
        if not spellings:
            return None
        head = out[word.token : word.start]
        memory = recall.memory if recall else None
        best = self.ranker.rank(word.ctx, head, spellings, memory, width=4, top=1, floor=_NAME_FLOOR, cancel=cancel)
        if not best:
            return None
        return best[0].read(), out[: word.token] + head + best[0].name.encode("utf-8"), best[0].trail()

    def _closed_early(self, forks: list[_Fork], logp: float, required: bytes, stopper: stops.Stopper,
                      memory: StoreMemory | None, cancel, limit: int = 8
                      ) -> tuple[str, _Fork, list[Evidence | None]] | None:
        """The line ghost text would have written had it closed the call at a fork, where that
        whole line is likelier than the one it wrote (``logp``, from the prompt or the chosen
        name to the line's end): the line, its fork, and the memory's evidence after the fork.
        Greedy decoding is myopic: after ``Flask(__name__`` a comma may be a little likelier
        than ``)``, yet every way of going on (``static_folder="static")``) much less likely
        than stopping.  Only the ``closings`` most promising forks are read, and only those that
        could win: a line's log-probability only falls as it grows.  None: keep the line."""
        best: tuple[float, str, _Fork, list[Evidence | None]] | None = None
        promising = sorted((f for f in forks if f.bound > logp), key=lambda f: f.bound, reverse=True)
        for fork in promising[: self.closings]:
            ctx, t, out, lp, trail, ahead = fork.ctx, fork.closer, fork.out, fork.logp, [], []
            for _ in range(limit):
                check(cancel)
                lp += float(ctx.logits[t])
                if lp <= (best[0] if best else logp):
                    break  # already less likely than the best line so far
                out += self.tok.token_bytes[t]
                line = _finished(out[len(required):].decode("utf-8", "ignore"), stopper)
                if line is not None:
                    best = (lp, line, fork, trail)
                    break
                if len(ctx.ids) + 1 >= self.decoder.window:
                    break
                ctx = self._advance(ctx, t, ahead, memory)  # guesses checked as in the written line
                trail.append(ctx.evidence)
                t = int(ctx.logits.argmax())
                if self.tok.is_special[t]:
                    break
        return best[1:] if best else None

    def _advance(self, ctx: Context, t: int, ahead: list[Context], memory: StoreMemory | None) -> Context:
        """``ctx`` followed by the chosen token ``t``.  Where the previous call guessed ``t``, its
        context is already read; otherwise ``t`` is read together with a guess of the next
        tokens (``decode.guess``), whose contexts go to ``ahead``.  Greedy decoding stays what it
        is (up to the rounding of a pass over several tokens), in fewer passes where the code
        repeats itself."""
        if ahead and ahead[0].ids[-1] == t:
            return ahead.pop(0)
        ahead.clear()
        room = self.decoder.window - len(ctx.ids) - 1
        got = self.decoder.extend(ctx, [t] + guess(ctx.ids + [t], min(self.guess_tokens, room)), memory)
        ahead.extend(got[1:])
        return got[0]

    # ------------------------------------------------------------------ popup

    def popup(
        self,
        uri: str,
        path: str,
        text: str,
        cursor: int,
        recall: Recall | None,
        *,
        width: int = 4,
        max_steps: int = 6,
        items: int = 6,
        cancel: threading.Event | None = None,
        preamble: Sequence[int] = (),
        names: bool = True,
    ) -> tuple[str, list[Candidate]]:
        """The typed part of the word at the cursor, and the best identifiers it may become:
        names that exist, ranked by the model (``names``), else the model's own beam."""
        doc = self._doc(uri)
        memory = recall.memory if recall else None
        budget = min(self.prefix_tokens, self.decoder.window - len(preamble) - max_steps - 8)
        p = prompt.build(self.tok, path, text, cursor, prefix_tokens=budget, preamble=preamble)
        sources = recall.sources if recall else None
        find = (lambda: candidates.pool(path, text, cursor, p.typed, sources, exact=True)) if names else None
        last = doc.listed
        if last is not None and last.ids == p.ids and p.typed.startswith(last.typed):
            pool = find() if find else candidates.Names()
            # typing on into a word already listed: answered from its scores where they tell
            known = last.answer(p.typed, pool, items, recall)
            if known is not None:
                return p.typed, known
            ctx = self._prefill(doc, "popup", p.ids, memory, cancel)
        else:
            ctx, pool = self._read(doc, "popup", p.ids, memory, cancel, find)
        if pool:  # the model ranks names that exist
            prior = self._prior(pool)
            scored = {r.name: (r.logprob, r.trail) for r in self.ranker.score(
                ctx, p.head, pool, memory, width=width, top=items, margin=_PLAUSIBLE, prior=prior, cancel=cancel)}
            unscored = sorted(pool.first - scored.keys())  # a beam may not have reached them
            if unscored:
                scored.update((r.name, (r.logprob, r.trail)) for r in self.ranker.score(
                    ctx, p.head, unscored, memory, width=width, top=len(unscored), prior=prior, cancel=cancel))
        else:  # nothing known to rank: the model's own beam
            scored = self._beam(ctx, p, memory, width=width, max_steps=max_steps, items=items, cancel=cancel)
        doc.listed = _Listed(p.ids, p.typed, frozenset(pool), scored)
        return p.typed, _best(scored, items, recall, doc.listed.shown, pool.first)

    def _name_at(self, ctx: Context, head: bytes, pool: candidates.Names, memory, cancel) -> list[Ranked]:
        """The existing name ghost text starts with, if one is likely enough: elsewhere above
        ``_NAME_FLOOR``; after ``module.`` (a closed pool) the best one however unlikely, and
        the best of those an edit added a moment ago (``pool.first``) before any other.

        Those lead whatever the module's other names score, so they are ranked alone: a trie of
        a few names, one pass, or no pass where the popup at this keystroke has just read the
        module's trie (``Ranker.score`` answers from it).  An editor that asks for the popup
        first pays one trie read for both; one that asks for ghost text first or alone gets it
        without waiting for the module's trie (or for a beam search over it, where the module
        is large)."""
        prior = self._prior(pool)
        if pool.first:
            return self.ranker.rank(ctx, head, sorted(pool.first), memory, width=4, top=1, prior=prior, cancel=cancel)
        floor = None if pool.closed else _NAME_FLOOR
        return self.ranker.rank(ctx, head, pool, memory, width=4, top=1, floor=floor, prior=prior, cancel=cancel)

    def _prior(self, pool: candidates.Names) -> Prior:
        return Prior(pool.bound, self.unbound)

    def _beam(self, ctx: Context, p: prompt.Prompt, memory, *, width: int, max_steps: int, items: int,
              cancel) -> Scored:
        """Identifiers the model writes itself: a small beam up to the end of the word."""
        beams: list[tuple[Context, bytes, float, tuple]] = [(ctx, b"", 0.0, (ctx.evidence,))]
        done: Scored = {}
        for _ in range(max_steps):
            check(cancel)
            grown: list[tuple[float, Context, bytes, int, tuple]] = []
            for c, out, lp, ev in beams:
                scores = c.logits
                if len(out) < len(p.required):
                    scores = scores + self.decoder.constraints.mask(p.required[len(out):], scores.device)
                top = torch.topk(scores, width)
                for score, t in zip(top.values.tolist(), top.indices.tolist()):
                    if score == float("-inf"):
                        continue
                    total = lp + score
                    special = self.tok.is_special[t]
                    grown_out = out if special else out + self.tok.token_bytes[t]
                    word = _word(grown_out, p, ended=special)
                    if word is None:
                        grown.append((total, c, grown_out, t, ev))
                    elif word and word != p.typed and (word not in done or done[word][0] < total):
                        done[word] = (total, lambda ev=ev: ev)
            grown.sort(key=lambda g: -g[0])
            grown = grown[:width]
            ranks = sorted((v[0] for v in done.values()), reverse=True)
            # stop once no open beam can enter the list (scores only fall as a beam grows)
            if not grown or (len(ranks) >= items and grown[0][0] < ranks[items - 1]) or (
                ranks and grown[0][0] < ranks[0] - _PLAUSIBLE
            ):
                break
            ctxs = self.decoder.step([g[1] for g in grown], [g[3] for g in grown], memory)
            beams = [(ctxs[b], g[2], g[0], g[4] + (ctxs[b].evidence,)) for b, g in enumerate(grown)]
        return done

    # ------------------------------------------------------------------ shared

    def _read(self, doc: _Doc, kind: str, ids: list[int], memory: StoreMemory | None, cancel,
              names: Callable[[], candidates.Names] | None) -> tuple[Context, candidates.Names]:
        """The prompt's model state, and the candidate names (``names()``) found meanwhile on
        another thread: jedi is pure Python and takes up to a second at a new place, while the
        model's products run without the interpreter lock.  The names are always waited for,
        even when reading the prompt is cancelled, so jedi never runs on two threads."""
        pending = self._aside.submit(names) if names is not None else None
        try:
            ctx = self._prefill(doc, kind, ids, memory, cancel)
        finally:
            pool = pending.result() if pending is not None else candidates.Names()
        return ctx, pool

    def _prefill(self, doc: _Doc, kind: str, ids: list[int], memory: StoreMemory | None, cancel) -> Context:
        """The prompt's model state, reusing whichever of the document's two (ghost text's and
        the popup's) shares more of it: an editor asks for both at the same place at once."""
        known = [c for c in (doc.inline, doc.popup) if c is not None]
        reuse = max(known, key=lambda c: common_prefix(c.ids, ids), default=None)
        ctx = self.decoder.prefill(ids, memory, reuse=reuse, cancel=cancel)
        setattr(doc, kind, ctx)
        return ctx


def _best(scored: Scored, items: int, recall: Recall | None, made: dict[str, Candidate],
          first: Collection[str] = ()) -> list[Candidate]:
    """The ``items`` best-scored names, without the tail the model itself finds implausible next
    to the best, as popup items with their support (``made``: items already built, reused).
    Names in ``first`` (added to the module a moment ago) lead, best first, whatever their score."""
    ranked = sorted(scored.items(), key=lambda kv: -kv[1][0])
    rest = [(w, v) for w, v in ranked if w not in first]
    rest = [(w, v) for w, v in rest if v[0] > rest[0][1][0] - _PLAUSIBLE]
    best = ([(w, v) for w, v in ranked if w in first] + rest)[:items]
    out = []
    for w, (lp, trail) in best:
        if w not in made:
            made[w] = Candidate(w, lp, support(trail(), recall, top=3) if recall else [])
        out.append(made[w])
    return out


@dataclass(frozen=True)
class _Word:
    """An identifier ghost text is writing: the context before the token it began in (kept to
    rank its respellings there), where that token and the identifier begin in the output, and
    how many evidence entries the completion had then."""

    ctx: Context
    token: int
    start: int
    evidence: int

    @staticmethod
    def after(word: _Word | None, ctx: Context, out: bytes, piece: bytes, evidence: int) -> _Word | None:
        """The identifier open once ``piece`` (read at ``ctx``) follows ``out``: None if it ends
        the line's text with something else; ``word`` if it lengthens it."""
        if not piece or not candidates.word_byte(piece[-1]):
            return None
        i = len(piece)
        while i > 0 and candidates.word_byte(piece[i - 1]):
            i -= 1
        if i == 0 and out and candidates.word_byte(out[-1]):
            return word
        return _Word(ctx, len(out), len(out) + i, evidence)


def _finished(written: str, stopper: stops.Stopper) -> str | None:
    """The completion ``written`` ends as, once a stop rule ends it; None while it goes on."""
    cut = stopper.cut(written)
    return None if cut is None else written[:cut]


def _fork(chosen: bytes, other: bytes) -> bool:
    """Whether two tokens differ in going on to another argument (``chosen``: a comma) against
    closing the bracket (``other``), after the same characters: ``__,`` and ``__)``, ``",`` and
    ``")``."""
    n = len(os.path.commonprefix([chosen, other]))
    return chosen[n : n + 1] == b"," and other[n : n + 1] in (b")", b"]", b"}") \
        and not any(b in b"()[]{}," for b in chosen[:n])


@dataclass(frozen=True)
class _Fork:
    """A place where ghost text went on to another argument while closing the call was nearly
    as likely: the context there, the output before it, how many evidence entries the
    completion had, the log-probability written until then, and the closing token."""

    ctx: Context
    out: bytes
    evidence: int
    logp: float
    closer: int

    @property
    def closer_logp(self) -> float:
        return float(self.ctx.logits[self.closer])

    @property
    def bound(self) -> float:
        """The most the closed line's log-probability can be: the tokens after the closer only
        lower it."""
        return self.logp + self.closer_logp

    @staticmethod
    def at(ctx: Context, scores: torch.Tensor, piece: bytes, out: bytes, evidence: int, logp: float,
           pieces: list[bytes], rivals: int = 4) -> _Fork | None:
        """The fork at ``ctx``, where ``piece`` was chosen: the likeliest of the next ``rivals``
        tokens that closes the bracket where ``piece`` goes on to another argument, if any."""
        for t in scores.topk(rivals + 1).indices.tolist()[1:]:
            if _fork(piece, pieces[t]):
                return _Fork(ctx, out, evidence, logp, t)
        return None


def _word(out: bytes, p: prompt.Prompt, ended: bool) -> str | None:
    """The finished identifier once ``out`` runs past its end (or ``ended``), else None."""
    if len(out) < len(p.required):
        return "" if ended else None
    full = p.typed + out[len(p.required):].decode("utf-8", "ignore")
    i = 0
    while i < len(full) and (full[i].isalnum() or full[i] == "_"):
        i += 1
    return full[:i] if i < len(full) or ended else None


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000
