"""Batches of segments in which every batch slot reads its own document in order.

This is what gives the memory something to remember: slot b's segment at step t+1 continues the
document of its segment at step t, so keys memorised at step t are the document's own past.  When
a slot's document ends, the slot takes the next document from a shuffled queue and its ``reset``
flag tells the trainer to clear that slot's memory and XL cache.

A document's last segment is padded instead of being filled from the next document: a segment
never mixes two documents, so resets only ever happen at segment starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .fim import FIM_OVERHEAD, FimTokens, to_psm


@dataclass
class Batch:
    inputs: np.ndarray  # (B, T) int64, padded with the pad id
    targets: np.ndarray  # (B, T) int64, -1 where there is nothing to predict
    reset: np.ndarray  # (B,) bool: the slot starts a new document in this segment


class SegmentStream:
    def __init__(
        self,
        tokens: np.ndarray,
        docs: list[tuple[int, int]],
        batch: int,
        seq_len: int,
        *,
        pad_id: int,
        fim: FimTokens | None = None,
        fim_rate: float = 0.0,
        seed: int = 0,
        shuffle: bool = True,
        loop: bool = True,
    ) -> None:
        docs = [d for d in docs if d[1] - d[0] >= 2]  # a document needs a token to predict
        if not docs:
            raise ValueError("no document long enough to train on")
        self.tokens, self.docs = tokens, docs
        self.batch, self.seq_len = batch, seq_len
        self.pad_id, self.fim, self.fim_rate = pad_id, fim, fim_rate
        self.shuffle, self.loop = shuffle, loop
        self.seed = seed
        self.epoch = 0
        self.queue_pos = 0
        self.order = self._order()
        self.rng = np.random.default_rng(seed)
        self.current = [-1] * batch  # document index per slot, -1 = none yet
        self.pos = [0] * batch  # next token position per slot
        self.tokens_read = 0

    def _order(self) -> list[int]:
        order = np.arange(len(self.docs))
        if self.shuffle:
            np.random.default_rng((self.seed, self.epoch)).shuffle(order)
        return order.tolist()

    def _next_doc(self) -> int | None:
        if self.queue_pos >= len(self.order):
            if not self.loop:
                return None
            self.epoch += 1
            self.order, self.queue_pos = self._order(), 0
        doc = self.order[self.queue_pos]
        self.queue_pos += 1
        return doc

    @property
    def exhausted(self) -> bool:
        """True once a non-looping stream has handed out every segment."""
        return all(c == -1 for c in self.current) and self.queue_pos >= len(self.order)

    def next_batch(self) -> Batch:
        B, T = self.batch, self.seq_len
        inputs = np.full((B, T), self.pad_id, dtype=np.int64)
        targets = np.full((B, T), -1, dtype=np.int64)
        reset = np.zeros(B, dtype=bool)
        for b in range(B):
            if self.current[b] == -1 or self.pos[b] >= self.docs[self.current[b]][1] - 1:
                doc = self._next_doc()
                if doc is None:
                    self.current[b] = -1
                    continue
                self.current[b], self.pos[b] = doc, self.docs[doc][0]
                reset[b] = True
            end = self.docs[self.current[b]][1]
            p = self.pos[b]
            use_fim = self.fim is not None and end - p > 8 and self.rng.random() < self.fim_rate
            if use_fim:
                n = min(T + 1 - FIM_OVERHEAD, end - p)
                seq = to_psm(np.asarray(self.tokens[p : p + n], dtype=np.int64), self.rng, self.fim)
                self.pos[b] = p + n
            else:
                seq = np.asarray(self.tokens[p : min(p + T + 1, end)], dtype=np.int64)
                self.pos[b] = p + T if len(seq) == T + 1 else end
            m = len(seq) - 1
            inputs[b, :m] = seq[:-1]
            targets[b, :m] = seq[1:]
            self.tokens_read += m
        return Batch(inputs, targets, reset)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "queue_pos": self.queue_pos,
            "current": list(self.current),
            "pos": list(self.pos),
            "rng": self.rng.bit_generator.state,
            "tokens_read": self.tokens_read,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.queue_pos = state["epoch"], state["queue_pos"]
        self.order = self._order()
        self.current, self.pos = list(state["current"]), list(state["pos"])
        self.rng.bit_generator.state = state["rng"]
        self.tokens_read = state["tokens_read"]
