"""A document and a cursor → the tokens the model reads, and the bytes it must write first.

Three choices, each for a reason:

- **Token healing.**  The prompt stops before the word being typed *and* the token before it;
  those bytes become ``required``, which decoding must reproduce first (``Decoder.constraints``).
  A prompt cut mid-token (``self.pri|``) is a tokenization the model never saw in training;
  healed, the model chooses the tokenization itself.  A side benefit: while the user types
  inside one word the prompt's ids do not change, so the cached model state is reused whole.
- **A window with stable edges.**  The prefix starts at a line boundary rounded to a block of
  lines, and tokens beyond the budget are dropped in blocks, so successive keystrokes keep the
  same start and share their prompt with the previous request.
- **Left to right, behind the file header.**  The base was pretrained on files behind a
  ``<filename>path`` header and has no fill-in-the-middle tokens, so the prompt is the header
  and the text before the cursor; the text after the cursor is used by the stop rules
  (``stops.py``): a completion ends where it reaches that text, and never repeats it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from mtlsp_model.tokenizer import Tokenizer

_WORD_TAIL = re.compile(r"\w*\Z")
_LINE_BLOCK = 32  # the prefix starts at a multiple of this many lines
_TOKEN_BLOCK = 64  # and drops tokens beyond its budget this many at a time


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    required: bytes  # the healed bytes the completion must start with
    typed: str  # the part of the current word left of the cursor

    @property
    def head(self) -> bytes:
        """The healed bytes before the typed word: what every candidate name follows."""
        return self.required[: len(self.required) - len(self.typed.encode("utf-8"))]


def word_before(line_prefix: str) -> str:
    """The identifier characters immediately left of the cursor."""
    return _WORD_TAIL.search(line_prefix).group(0)  # type: ignore[union-attr]


def build(
    tok: Tokenizer,
    path: str,
    text: str,
    cursor: int,
    *,
    prefix_tokens: int,
    preamble: Sequence[int] = (),
) -> Prompt:
    """The prompt for a completion at character ``cursor`` of ``text`` (the file at ``path``).

    ``preamble``: tokens read before the file, outside its budget; retrieval by prompt stuffing
    puts other files' snippets there (with their file headers, as files follow one another in
    the base's pretraining documents).
    """
    before = text[:cursor]
    line_start = before.rfind("\n") + 1
    typed = word_before(before[line_start:])
    head_end = cursor - len(typed)
    start = _window_start(text, head_end, chars=prefix_tokens * 8)
    ids = tok.encode(text[start:head_end])
    if len(ids) > prefix_tokens:
        block = min(_TOKEN_BLOCK, max(1, prefix_tokens // 4))  # a small budget keeps most of it
        drop = -(-(len(ids) - prefix_tokens) // block) * block
        ids = ids[drop:]
    required = typed.encode("utf-8")
    if ids and not tok.is_special[ids[-1]]:  # heal: let the model retokenize the last token and the word
        required = tok.token_bytes[ids[-1]] + required
        ids = ids[:-1]
    # The header always leads: it says which file this is, and its first token is the
    # attention sink the base expects at position 0.
    ids = [*preamble, *tok.file_header(path), *ids]
    return Prompt(ids, required, typed)


def _window_start(text: str, end: int, chars: int) -> int:
    """A line start about ``chars`` before ``end``, rounded down to a block of lines."""
    if end <= chars:
        return 0
    line = text.count("\n", 0, end - chars)
    line -= line % _LINE_BLOCK
    if line == 0:
        return 0
    pos = -1
    for _ in range(line):
        pos = text.index("\n", pos + 1)
    return pos + 1
