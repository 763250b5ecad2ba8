"""Byte-level BPE tokenizer for code, lossless on any bytes, with a few special tokens.

Why the special tokens are not "added tokens" of the ``tokenizers`` library: those are matched
inside ordinary text, so a source file that happens to contain ``<|fim_middle|>`` would be
tokenized into a control token.  Here the BPE vocabulary covers ids ``0..base-1`` and the
special ids come after it; they can only be produced by code that asks for them.

Why decoding goes through a byte table rather than ``Tokenizer.decode``: every BPE token is a
string over the 256-character byte-level alphabet, so mapping it back to bytes is exact, even
for byte sequences that are not valid UTF-8 (which ``decode`` would replace with U+FFFD).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = (
    "<|pad|>",  # fills the tail of a document's last segment; never a target
    "<|file|>",  # starts a file header: <|file|>relative/path.py\n then the file's text
    "<|fim_prefix|>",
    "<|fim_suffix|>",
    "<|fim_middle|>",
    "<|eot|>",  # ends a fill-in-the-middle middle: the model's "stop here"
)
DEFAULT_VOCAB_SIZE = 16384


def _byte_alphabet() -> dict[str, int]:
    """The GPT-2 byte-to-printable-character map, inverted: character -> byte value."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


class CodeTokenizer:
    """The project's tokenizer: BPE ids followed by special ids, decoding to exact bytes."""

    def __init__(self, hf: HFTokenizer) -> None:
        self.hf = hf
        self.base = hf.get_vocab_size()
        self.special = {name: self.base + i for i, name in enumerate(SPECIAL_TOKENS)}
        # special ids by name, in the order of SPECIAL_TOKENS, for readable call sites
        self.pad, self.file, self.fim_prefix, self.fim_suffix, self.fim_middle, self.eot = self.special.values()
        self.vocab_size = self.base + len(SPECIAL_TOKENS)
        self._special_bytes = {i: name.encode() for name, i in self.special.items()}
        char_to_byte = _byte_alphabet()
        table: list[bytes] = [b""] * self.base
        for token, idx in hf.get_vocab().items():
            table[idx] = bytes(char_to_byte[c] for c in token)
        self.token_bytes = table
        self._byte_ids = [hf.token_to_id(c) for c in sorted(char_to_byte, key=char_to_byte.get)]
        if any(i is None for i in self._byte_ids):
            raise ValueError("tokenizer vocabulary lacks single-byte tokens; it cannot be lossless")

    def encode(self, text: str) -> list[int]:
        """Tokens of ``text``; strings with lone surrogates go through the byte path."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return self.encode_bytes(text.encode("utf-8", "surrogatepass"))
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts in parallel (the Rust library uses every core)."""
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def encode_bytes(self, data: bytes) -> list[int]:
        """Tokens of arbitrary bytes: valid UTF-8 runs through BPE, other bytes one token each."""
        ids: list[int] = []
        text = data.decode("utf-8", "surrogateescape")
        run_start = 0
        for i, ch in enumerate(text):
            if "\udc80" <= ch <= "\udcff":  # an undecodable byte, escaped by surrogateescape
                if run_start < i:
                    ids += self.hf.encode(text[run_start:i], add_special_tokens=False).ids
                ids.append(self._byte_ids[ord(ch) - 0xDC00])
                run_start = i + 1
        if run_start < len(text):
            ids += self.hf.encode(text[run_start:], add_special_tokens=False).ids
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Exact bytes of BPE ids; special tokens are rendered as their names."""
        return b"".join(self.token_bytes[i] if i < self.base else self._special_bytes[i] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids; round-trips ``encode`` for any ``str``, lone surrogates included."""
        return self.decode_bytes(ids).decode("utf-8", "surrogatepass")

    def file_header(self, path: str) -> list[int]:
        """``<|file|>path\\n``: tells the model which file the following text belongs to."""
        clean = path.replace("\\", "/").replace("\n", " ")
        return [self.file] + self.encode(clean + "\n")

    def save(self, path: Path) -> None:
        self.hf.save(str(path))

    @classmethod
    def load(cls, path: Path) -> "CodeTokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} is missing")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on bad JSON
            raise ValueError(f"tokenizer file {path} is corrupted or not a tokenizer: {e}") from e
        return cls(hf)


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> CodeTokenizer:
    """Train byte-level BPE so that, with the special tokens, the vocabulary is ``vocab_size``."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return CodeTokenizer(hf)

