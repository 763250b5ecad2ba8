"""``ModelGate``: completions run alone, and a memory write steps aside for them between two
pieces of its work (real threads; the pieces here are short sleeps)."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import torch
from conftest import random_model, tiny_config

from mtlsp.gate import ModelGate
from mtlsp.process import IdleCollector


def test_a_write_pauses_for_a_completion_and_resumes_after_it():
    gate = ModelGate()
    log: list[str] = []
    writing = threading.Event()

    def write() -> None:
        with gate.write() as pause:
            for _ in range(40):
                pause()
                log.append("w")
                writing.set()
                time.sleep(0.005)

    w = threading.Thread(target=write)
    w.start()
    writing.wait()
    with gate.completion():
        log.append("c<")
        time.sleep(0.05)  # ten of the write's pieces would fit here
        log.append(">c")
    w.join()
    start, end = log.index("c<"), log.index(">c")
    assert end == start + 1  # nothing of the write ran during the completion
    assert log.count("w") == 40 and "w" in log[end:]  # and the write finished afterwards


def test_a_write_waits_for_a_running_completion_and_writes_take_turns():
    gate = ModelGate()
    log: list[str] = []
    inside = threading.Event()

    def complete() -> None:
        with gate.completion():
            inside.set()
            time.sleep(0.05)
            log.append("c")

    def write(tag: str) -> None:
        with gate.write():
            log.append(tag + "<")
            time.sleep(0.01)
            log.append(tag + ">")

    c = threading.Thread(target=complete)
    c.start()
    inside.wait()
    ws = [threading.Thread(target=write, args=(t,)) for t in "ab"]
    for w in ws:
        w.start()
    c.join()
    for w in ws:
        w.join()
    assert log[0] == "c"
    first = log[1][0]
    assert log[1:3] == [first + "<", first + ">"]  # one write at a time


def test_a_write_waits_for_completions_to_be_quiet_for_the_grace_period():
    gate = ModelGate(grace=0.1)
    with gate.completion():
        pass
    ended = time.monotonic()
    with gate.write():
        waited = time.monotonic() - ended
    assert waited >= 0.09  # ghost text and popup of one keystroke come together: none in between
    gate.grace = 0.0
    with gate.completion():
        pass
    with gate.write():
        pass  # no grace: at once


def test_a_write_is_not_starved_by_completions_without_a_pause():
    gate = ModelGate(grace=0.2, patience=0.15)
    stop = threading.Event()
    done: list[float] = []

    def typing() -> None:  # a completion every 0.05 s: never 0.2 s of quiet
        while not stop.is_set():
            with gate.completion():
                time.sleep(0.02)
            time.sleep(0.03)

    t = threading.Thread(target=typing)
    t.start()
    try:
        start = time.monotonic()
        with gate.write():
            done.append(time.monotonic() - start)
    finally:
        stop.set()
        t.join()
    assert 0.14 <= done[0] < 1.0  # waited its patience, then took a gap


def test_encoding_offers_to_pause_before_every_block(tok):
    model = random_model(tiny_config(tok.vocab_size), seed=0)
    calls = []
    ids = torch.randint(len(tok.specials), tok.vocab_size, (2, 12))
    plain = model.encode(ids)
    paused = model.encode(ids, pause=lambda: calls.append(1))
    assert len(calls) == model.cfg.encode_layers
    assert torch.equal(plain.keys, paused.keys) and torch.equal(plain.values, paused.values)


class _Cycle:
    def __init__(self) -> None:
        self.me = self  # only a full collection frees it once it is old


def test_full_garbage_collections_wait_until_completions_are_quiet():
    gate = ModelGate()
    old = _Cycle()
    gc.collect(1)  # it survives two young collections: it is in the oldest generation now
    alive = weakref.ref(old)
    del old
    collector = IdleCollector(lambda: gate, quiet=0.3, patience=30.0, check_s=0.02)
    try:
        with gate.completion():
            for _ in range(gc.get_threshold()[1] + 10):
                gc.collect(1)  # as many young collections as make a full one due
            assert gc.get_threshold()[2] > 1_000_000  # the interpreter would not start it itself
            time.sleep(0.3)
            assert alive() is not None and collector.collections == 0  # not during a completion
            ended = time.monotonic()
        while collector.collections == 0 and time.monotonic() - ended < 5:
            time.sleep(0.01)
        assert alive() is None and collector.collections == 1
        assert time.monotonic() - ended >= 0.3  # after completions were quiet for ``quiet``
    finally:
        collector.stop()
    assert gc.get_threshold()[2] < 1_000_000
