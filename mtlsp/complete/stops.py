"""Where a completion ends: the scope of the cursor (one line or a block) and the cut rules.

Peers (Copilot, Tabby) settle this by syntax rather than by token count, and so do we:

- **Single line** by default: the completion ends at the end of the line.
- **Block** when the cursor opens one: right after a ``:`` ending a Python header or an opening
  bracket at the end of a line, or on an empty line just below one.  tree-sitter confirms the
  opener is code, not a ``:`` or ``{`` inside a string or comment.  A ``:`` block ends where a
  line is indented no deeper than its header; a bracket block ends at its matching closer.
- **Bracket balance**: a completion never closes a bracket that it did not open, unless the
  line before the cursor left it open and the text after the cursor does not already close it.
- **No repetition**: text already after the cursor on the line is not written again, and a
  completion that starts looping (the same piece four times running, a small model's usual
  failure) ends after the first piece instead of filling the line with copies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..languages import extension, parser_for

OPENERS = {"(": ")", "[": "]", "{": "}"}
CLOSERS = {v: k for k, v in OPENERS.items()}
_COLON_BLOCKS = {".py", ".pyi"}
# control characters other than tab and line breaks: no source file is written with them, and an
# editor shows them as ^E; a completion ends before the first one the model writes
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class Scope:
    multiline: bool
    opener: str  # ":" or an opening bracket for a block; "" for a single line
    indent: int  # indentation (columns) of the line that opens the block
    closable: str  # brackets open before the cursor on this line that the completion may close
    line_suffix: str  # the rest of the cursor's line
    after: str  # the text after the cursor (a window), for bracket blocks


def _indent(line: str) -> int:
    return len(line.expandtabs(4)) - len(line.expandtabs(4).lstrip(" "))


def _in_string_or_comment(path: str, text: str, char_index: int) -> bool:
    parser = parser_for(path)
    if parser is None:
        return False
    data = text.encode("utf-8")
    at = len(text[:char_index].encode("utf-8"))
    node = parser.parse(data).root_node.descendant_for_byte_range(at, at + 1)
    while node is not None:
        if "comment" in node.type or "string" in node.type:
            return True
        node = node.parent
    return False


def scope(path: str, text: str, cursor: int) -> Scope:
    """What the completion at ``cursor`` may span."""
    line_start = text.rfind("\n", 0, cursor) + 1
    line_end = text.find("\n", cursor)
    line_end = len(text) if line_end < 0 else line_end
    prefix, suffix = text[line_start:cursor], text[cursor:line_end]
    after = text[cursor : cursor + 4000]
    pending = _open_brackets(prefix)
    closers = suffix.strip()
    for ch in closers:  # brackets the text after the cursor already closes
        if ch in CLOSERS and pending and pending[-1] == CLOSERS[ch]:
            pending = pending[:-1]
        else:
            break
    closable = pending
    single = Scope(False, "", 0, closable, suffix, after)
    if suffix.strip():
        return single
    # the opener: the end of this line, or of the previous non-blank line when this one is empty
    if prefix.strip():
        opener_line, opener_end = prefix, cursor
    else:
        prev_end = line_start - 1
        while prev_end > 0:
            prev_start = text.rfind("\n", 0, prev_end) + 1
            if text[prev_start:prev_end].strip():
                break
            prev_end = prev_start - 1
        if prev_end <= 0:
            return single
        opener_line, opener_end = text[prev_start:prev_end], prev_end
    stripped = opener_line.rstrip()
    if not stripped:
        return single
    last = stripped[-1]
    colon = last == ":" and extension(path) in _COLON_BLOCKS
    if not (colon or last in OPENERS):
        return single
    at = opener_end - (len(opener_line) - len(stripped)) - 1
    if _in_string_or_comment(path, text, at):
        return single
    return Scope(True, last, _indent(opener_line), "", suffix, after)


def _brackets(text: str):
    """(index, bracket) of each bracket in ``text`` outside quotes."""
    quote = ""
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'`":
            quote = ch
        elif ch in OPENERS or ch in CLOSERS:
            yield i, ch


def _open_brackets(s: str) -> str:
    """Brackets opened and not closed in ``s`` (quotes skipped), innermost last."""
    stack: list[str] = []
    for _, ch in _brackets(s):
        if ch in OPENERS:
            stack.append(ch)
        elif stack and stack[-1] == CLOSERS[ch]:
            stack.pop()
    return "".join(stack)


class Stopper:
    """Decides, as text is generated, whether the completion is complete, and where it ends."""

    def __init__(self, scope: Scope, max_lines: int = 24) -> None:
        self.scope = scope
        self.max_lines = max_lines

    def cut(self, text: str) -> int | None:
        """The length of the finished completion if ``text`` already ends it, else None."""
        control = _CONTROL.search(text)
        head = text if control is None else text[: control.start()]
        loop = _loop_start(head)
        if loop is not None:
            return loop
        cut = self._block_cut(head) if self.scope.multiline else self._line_cut(head)
        return cut if cut is not None or control is None else control.start()

    def _line_cut(self, text: str) -> int | None:
        newline = text.find("\n")
        line = text if newline < 0 else text[:newline]
        stack = list(self.scope.closable)
        for i, ch in _brackets(line):
            if ch in OPENERS:
                stack.append(ch)
            elif not stack or stack[-1] != CLOSERS[ch]:
                return i  # would close what the text after the cursor closes, or nothing
            else:
                stack.pop()
        return None if newline < 0 else newline

    def _block_cut(self, text: str) -> int | None:
        if self.scope.opener == ":":
            return self._indent_cut(text)
        return self._bracket_cut(text)

    def _indent_cut(self, text: str) -> int | None:
        lines = text.split("\n")
        pos = 0
        for n, line in enumerate(lines[:-1]):  # complete lines only
            if n > 0 and line.strip() and _indent(line) <= self.scope.indent:
                return pos - 1  # the block is over: end before this line's newline
            if n >= self.max_lines:
                return pos - 1
            pos += len(line) + 1
        return None

    def _closer_follows(self, ch: str) -> bool:
        """Whether the text after the cursor starts with this block's own closer: on the
        cursor's line, or on a later line at the opener line's indentation (a ``}`` further
        out closes an enclosing block)."""
        after = self.scope.after
        rest = after.lstrip()
        if not rest.startswith(ch):
            return False
        skipped = after[: len(after) - len(rest)]
        if "\n" not in skipped:
            return True
        return _indent(skipped.rsplit("\n", 1)[1]) == self.scope.indent

    def _bracket_cut(self, text: str) -> int | None:
        depth = 1
        for i, ch in _brackets(text):
            depth += 1 if ch in OPENERS else -1
            if depth == 0:
                # the editor may already have put the closer after the cursor
                if self._closer_follows(ch):
                    return len(text[:i].rstrip())
                return i + 1
        if text.count("\n") > self.max_lines:
            return text.rfind("\n", 0, len(text) - 1)
        return None


def _loop_start(text: str, times: int = 4, longest: int = 24) -> int | None:
    """Where ``text`` began repeating one piece ``times`` times, just after its first copy."""
    for period in range(1, longest + 1):
        run = period * times
        if len(text) < run or run < 8:
            continue
        unit = text[-period:]
        if text[-run:] != unit * times or len(set(unit.strip())) < 2 or unit.isdigit():
            continue  # rulers ("=====") and long numbers are not loops
        start = len(text) - run
        while start >= period and text[start - period : start] == unit:
            start -= period
        return start + period
    return None


def finish(text: str, scope: Scope) -> str:
    """The completion as inserted: trailing blanks dropped, the line's tail not repeated."""
    text = text.rstrip() if scope.multiline else text.rstrip("\n")
    tail = scope.line_suffix.strip()
    if tail and text.rstrip().endswith(tail):
        text = text.rstrip()[: -len(tail)]
    return text
