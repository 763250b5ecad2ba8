"""Text ↔ token ids for the base model: byte-level BPE, lossless on any bytes.

The vocabulary and merges come with the base model (converted from its GGUF file or copied from
its Hugging Face ``tokenizer.json``); the tests train a small one with the same special tokens.

Two choices, each for a reason:

- **Special tokens are never matched inside text.**  ``tokenizers`` "added tokens" are found in
  ordinary input, so a source file that spells ``<filename>`` would be read as a control token.
  Here the BPE model holds the whole vocabulary and no added tokens; special ids (``specials``,
  recorded next to the model) can only be produced by code that asks for them.
- **Decoding goes through a byte table**, not ``Tokenizer.decode``: every BPE token is a string
  over the 256-character byte-level alphabet, so mapping it back to bytes is exact, even for
  byte sequences that are not valid UTF-8 (which ``decode`` would replace with U+FFFD).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

# The special tokens of the SmolLM2 / StarCoder family, in their id order.  A base that lacks
# one simply has no such id; mtlsp needs only ``<|endoftext|>`` and ``<filename>``.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
    "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>",
    "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<jupyter_script>",
    "<empty_output>",
)


def byte_alphabet() -> dict[str, int]:
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


def byte_level_bpe(vocab: Mapping[str, int], merges: Sequence[tuple[str, str]]) -> HFTokenizer:
    """A GPT-2-style byte-level BPE with digits split one by one (the StarCoder/SmolLM rule)."""
    return _byte_level(models.BPE(vocab=dict(vocab), merges=list(merges)))


def _byte_level(bpe: models.BPE) -> HFTokenizer:
    hf = HFTokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    hf.decoder = decoders.ByteLevel()
    return hf


class Tokenizer:
    """BPE ids, some of them special, decoding to exact bytes."""

    def __init__(self, hf: HFTokenizer, specials: Mapping[str, int]) -> None:
        if hf.get_added_tokens_decoder():
            raise ValueError("the tokenizer has added tokens, which would be matched inside source text")
        self.hf = hf
        self.vocab_size = hf.get_vocab_size()
        self.specials = dict(specials)
        if any(not 0 <= i < self.vocab_size for i in self.specials.values()):
            raise ValueError("a special token id lies outside the vocabulary")
        if "<|endoftext|>" not in self.specials or "<filename>" not in self.specials:
            raise ValueError("the vocabulary needs <|endoftext|> and <filename> special tokens")
        self.eot = self.specials["<|endoftext|>"]
        self.filename = self.specials["<filename>"]
        self.is_special = [False] * self.vocab_size
        for i in self.specials.values():
            self.is_special[i] = True
        char_to_byte = byte_alphabet()
        table: list[bytes] = [b""] * self.vocab_size
        for token, idx in hf.get_vocab().items():
            if not self.is_special[idx]:
                table[idx] = bytes(char_to_byte[c] for c in token)
        self.token_bytes = table  # special ids stand for no bytes of the text
        self._names = {i: name.encode() for name, i in self.specials.items()}
        # Single-byte tokens; a base's vocabulary may lack a few bytes that never occur in
        # UTF-8 text it was trained on (0xC0, 0xF5..0xFF, some control characters).  BPE would
        # silently drop those; they become "?" instead, one token per byte, so token offsets
        # still add up to the text's length.
        fallback = hf.token_to_id("?")
        self._byte_ids = [hf.token_to_id(c) for c in sorted(char_to_byte, key=char_to_byte.get)]
        missing = [b for b, i in enumerate(self._byte_ids) if i is None]
        if missing and fallback is None:
            raise ValueError("tokenizer vocabulary lacks single-byte tokens and '?'; it cannot encode every text")
        self._byte_ids = [fallback if i is None else i for i in self._byte_ids]
        bad = [re.escape(chr(b)) for b in missing if b < 0x80]  # ASCII bytes that are characters
        bad += [r"\U00040000-\U0010ffff"] if any(b >= 0xF1 for b in missing) else []
        self._unencodable = re.compile(f"[{''.join(bad)}]") if bad else None

    def encode(self, text: str) -> list[int]:
        """Tokens of ``text``; strings with lone surrogates or bytes the vocabulary lacks go
        through the byte path."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return self.encode_bytes(text.encode("utf-8", "surrogatepass"))
        if self._unencodable is not None and self._unencodable.search(text):
            return self.encode_bytes(text.encode("utf-8"))
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts in parallel (the Rust library uses every core)."""
        if any(self._unencodable is not None and self._unencodable.search(t) for t in texts):
            return [self.encode(t) for t in texts]
        try:
            return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]
        except TypeError:  # a lone surrogate somewhere: one by one, through the byte path
            return [self.encode(t) for t in texts]

    def encode_bytes(self, data: bytes) -> list[int]:
        """Tokens of arbitrary bytes: UTF-8 runs through BPE; undecodable bytes, and characters
        holding bytes the vocabulary lacks, one token per byte (``?`` where it has none)."""
        ids: list[int] = []
        text = data.decode("utf-8", "surrogateescape")
        run_start = 0
        for i, ch in enumerate(text):
            escaped = "\udc80" <= ch <= "\udcff"  # an undecodable byte, escaped by surrogateescape
            if escaped or (self._unencodable is not None and self._unencodable.match(ch)):
                if run_start < i:
                    ids += self.hf.encode(text[run_start:i], add_special_tokens=False).ids
                if escaped:
                    ids.append(self._byte_ids[ord(ch) - 0xDC00])
                else:  # "?" for each of its bytes: valid text of the same length
                    ids += [self._byte_ids[ord("?")]] * len(ch.encode("utf-8"))
                run_start = i + 1
        if run_start < len(text):
            ids += self.hf.encode(text[run_start:], add_special_tokens=False).ids
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Exact bytes of ids; special tokens are rendered as their names."""
        return b"".join(self._names[i] if self.is_special[i] else self.token_bytes[i] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids; round-trips ``encode`` for any ``str``, lone surrogates included."""
        return self.decode_bytes(ids).decode("utf-8", "surrogatepass")

    def file_header(self, path: str) -> list[int]:
        """``<filename>path\\n``: the header the base read before each file in pretraining."""
        clean = path.replace("\\", "/").replace("\n", " ")
        return [self.filename] + self.encode(clean + "\n")

    def save(self, path: Path) -> None:
        """``tokenizer.json`` plus the special ids inside it, under a key ``tokenizers`` ignores."""
        data = json.loads(self.hf.to_str())
        data["mtlsp_specials"] = self.specials
        Path(path).write_text(json.dumps(data, ensure_ascii=False))

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} is missing")
        try:
            data = json.loads(path.read_text())
            specials = data.pop("mtlsp_specials")
            hf = HFTokenizer.from_str(json.dumps(data))
        except Exception as e:  # the library raises a bare Exception on bad JSON
            raise ValueError(f"tokenizer file {path} is corrupted or not an mtlsp tokenizer: {e}") from e
        return cls(hf, specials)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A small byte-level BPE with the base's special tokens first (tests, tiny models)."""
    hf = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(SPECIAL_TOKENS), show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    # Re-make it without added tokens: the specials stay in the vocabulary, unmatched in text.
    data = json.loads(hf.to_str())
    vocab = data["model"]["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    return Tokenizer(byte_level_bpe(vocab, merges), {t: vocab[t] for t in SPECIAL_TOKENS})
