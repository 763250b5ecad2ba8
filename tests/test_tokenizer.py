import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlsp_model.tokenizer import SPECIAL_TOKENS, Tokenizer, byte_level_bpe


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trips_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.binary())
def test_round_trips_any_bytes(tok, data):
    ids = tok.encode_bytes(data)
    assert not any(tok.is_special[i] for i in ids)
    assert tok.decode_bytes(ids) == data


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(["\ud800", "\udfff", "\udc80"]), st.text(max_size=3)), min_size=1))
def test_round_trips_lone_surrogates(tok, parts):
    """Python strings may hold lone surrogates (e.g. from os.fsdecode); they survive too."""
    text = "".join(parts)
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_lead_the_vocabulary(tok):
    assert [tok.specials[n] for n in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.token_bytes[tok.filename] == b""  # a header token stands for no bytes of the file


def test_special_token_text_in_a_file_stays_text(tok):
    """A source file that spells a control token must not produce it."""
    for name in SPECIAL_TOKENS:
        ids = tok.encode(f"x = '{name}'")
        assert not any(tok.is_special[i] for i in ids)
        assert tok.decode(ids) == f"x = '{name}'"


def test_digits_are_split_one_by_one(tok):
    assert [tok.decode([i]) for i in tok.encode("12345")] == list("12345")


def test_file_header(tok):
    ids = tok.file_header("pkg/mod.py")
    assert ids[0] == tok.filename
    assert tok.decode(ids[1:]) == "pkg/mod.py\n"


def test_bytes_missing_from_a_vocabulary_become_question_marks_of_the_same_length(tok):
    """A base's vocabulary may lack a byte (SmolLM2 lacks 0x04 and 0xF1, among others): such
    characters become '?' per byte instead of vanishing, so token offsets still add up."""
    import json

    data = json.loads(tok.hf.to_str())
    vocab = dict(data["model"]["vocab"])
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    dropped = {"Ą"}  # the byte-level character of 0x04
    merges = [m for m in merges if not set("".join(m)) & dropped]
    for t in [t for t in vocab if set(t) & dropped]:
        del vocab[t]
    lacking = Tokenizer(byte_level_bpe({t: i for i, t in enumerate(sorted(vocab, key=vocab.get))}, merges),
                        {n: i for i, n in enumerate(SPECIAL_TOKENS)})
    ids = lacking.encode("a\x04b")
    assert lacking.decode(ids) == "a?b"
    assert sum(len(lacking.token_bytes[i]) for i in ids) == 3


def test_save_load_and_corruption(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    again = Tokenizer.load(path)
    assert again.encode("def f(): pass") == tok.encode("def f(): pass")
    assert again.specials == tok.specials
    path.write_text(path.read_text()[:100])
    with pytest.raises(ValueError, match=str(path)):
        Tokenizer.load(path)
