"""Fill-in-the-middle in prefix-suffix-middle (PSM) order.

A span ``prefix + middle + suffix`` becomes
``<|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle <|eot|>``: the model reads
the text on both sides of the gap, then writes the gap and says where it ends.  Trained on about
half the segments, this lets a completion use the code after the cursor.  The split points are
token boundaries; at inference the cursor is moved back to a token boundary accordingly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FIM_OVERHEAD = 4  # sentinel tokens added by the transform


@dataclass(frozen=True)
class FimTokens:
    prefix: int
    suffix: int
    middle: int
    eot: int


def to_psm(tokens: np.ndarray, rng: np.random.Generator, ids: FimTokens) -> np.ndarray:
    """Cut ``tokens`` at two random points and reorder them as PSM with sentinels."""
    n = len(tokens)
    a, b = np.sort(rng.integers(0, n + 1, size=2))
    return np.concatenate(
        (
            [ids.prefix],
            tokens[:a],
            [ids.suffix],
            tokens[b:],
            [ids.middle],
            tokens[a:b],
            [ids.eot],
        )
    ).astype(tokens.dtype)


def from_psm(seq: np.ndarray, ids: FimTokens) -> np.ndarray:
    """Undo ``to_psm``: recover the original token order (used by tests and diagnostics)."""
    seq = np.asarray(seq)
    if len(seq) < FIM_OVERHEAD or seq[0] != ids.prefix or seq[-1] != ids.eot:
        raise ValueError("not a PSM sequence")
    suf = int(np.flatnonzero(seq == ids.suffix)[0])
    mid = int(np.flatnonzero(seq == ids.middle)[0])
    return np.concatenate((seq[1:suf], seq[mid + 1 : -1], seq[suf + 1 : mid]))
