from hypothesis import given, settings
from hypothesis import strategies as st

from mtlsp_model.tokenizer import SPECIAL_TOKENS, CodeTokenizer


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trips_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.binary())
def test_round_trips_any_bytes(tok, data):
    ids = tok.encode_bytes(data)
    assert all(0 <= i < tok.base for i in ids)
    assert tok.decode_bytes(ids) == data


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(["\ud800", "\udfff", "\udc80"]), st.text(max_size=3)), min_size=1))
def test_round_trips_lone_surrogates(tok, parts):
    """Python strings may hold lone surrogates (e.g. from os.fsdecode); they survive too."""
    text = "".join(parts)
    assert tok.decode(tok.encode(text)) == text


def test_vocabulary_layout(tok):
    assert tok.vocab_size == tok.base + len(SPECIAL_TOKENS)
    assert sorted(tok.special.values()) == list(range(tok.base, tok.vocab_size))


def test_special_token_text_in_a_file_stays_text(tok):
    """A source file that spells a sentinel must not produce the control token."""
    for name in SPECIAL_TOKENS:
        ids = tok.encode(f"x = '{name}'")
        assert not set(ids) & set(tok.special.values())
        assert tok.decode(ids) == f"x = '{name}'"


def test_file_header(tok):
    ids = tok.file_header("pkg/mod.py")
    assert ids[0] == tok.file
    assert tok.decode(ids[1:]) == "pkg/mod.py\n"


def test_save_load_and_corruption(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    again = CodeTokenizer.load(path)
    assert again.encode("def f(): pass") == tok.encode("def f(): pass")
    path.write_text(path.read_text()[:100])
    try:
        CodeTokenizer.load(path)
    except ValueError as e:
        assert str(path) in str(e)
    else:
        raise AssertionError("a truncated tokenizer file loaded")
