import numpy as np
import pytest

from mtlsp_model.fim import FIM_OVERHEAD, FimTokens, from_psm, to_psm
from mtlsp_model.stream import SegmentStream

IDS = FimTokens(prefix=1000, suffix=1001, middle=1002, eot=1003)


@pytest.mark.parametrize("n", [0, 1, 2, 17, 300])
def test_psm_round_trip(n):
    rng = np.random.default_rng(n)
    for _ in range(50):
        tokens = rng.integers(0, 999, size=n)
        seq = to_psm(tokens, rng, IDS)
        assert len(seq) == n + FIM_OVERHEAD
        assert seq[0] == IDS.prefix and seq[-1] == IDS.eot
        np.testing.assert_array_equal(from_psm(seq, IDS), tokens)


def test_psm_layout_on_text(tok):
    ids = np.array(tok.encode("def add(a, b):\n    return a + b\n"))
    fim = FimTokens(tok.fim_prefix, tok.fim_suffix, tok.fim_middle, tok.eot)
    seq = to_psm(ids, np.random.default_rng(3), fim)
    suf, mid = list(seq).index(tok.fim_suffix), list(seq).index(tok.fim_middle)
    prefix, suffix, middle = seq[1:suf], seq[suf + 1 : mid], seq[mid + 1 : -1]
    assert tok.decode(np.concatenate((prefix, middle, suffix))) == tok.decode(ids)


def test_about_half_the_segments_are_fim():
    tokens = np.arange(100_000) % 900
    stream = SegmentStream(tokens, [(0, len(tokens))], 4, 64, pad_id=999, fim=IDS, fim_rate=0.5, seed=1)
    starts = [stream.next_batch().inputs[:, 0] for _ in range(100)]
    share = np.mean(np.concatenate(starts) == IDS.prefix)
    assert 0.4 < share < 0.6
