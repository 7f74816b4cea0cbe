"""The continuous-batching engine without HTTP: batched == alone, compaction, sampling, stops, bounds."""

import random

import pytest

import lmforge
from lmforge.deploy.batching import Engine, EngineBusy, Sequence
from lmforge.errors import LmforgeError
from lmforge.generation.sampling import SamplingParams

WORDS = ["one", "two", "fox", "dog", "the", "capital", "of", "France", "quick", "brown"]


@pytest.fixture(scope="module")
def plain_lm(tiny_lm_dirs):
    return lmforge.load(tiny_lm_dirs["plain"])


def _prompts(n, seed=0):
    rng = random.Random(seed)
    return [(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 25))), rng.randint(3, 50)) for _ in range(n)]


def _run_all(engine, seqs, timeout=60):
    engine.submit(seqs)
    engine.start()
    for s in seqs:
        assert s.done.wait(timeout), "a sequence never finished"
    engine.stop()
    assert not engine.thread.is_alive()


def test_batched_greedy_equals_each_request_alone_with_compaction(plain_lm):
    lm = plain_lm
    prompts = _prompts(24)
    alone = [lm.generate(p, max_new_tokens=n, chat=False) for p, n in prompts]
    # 6 slots for 24 requests: later requests join a running batch mid-timeline; a 128-token cache
    # forces the timeline to be compacted several times.
    engine = Engine(lm.model, lm.tokenizer, lm.eos_ids, max_batch=6, max_queue=64)
    seqs = [Sequence(lm.encode(p, chat=False), n) for p, n in prompts]
    _run_all(engine, seqs)
    assert [s.text for s in seqs] == alone
    stats = engine.stats()
    assert stats["compactions"] >= 1
    assert stats["decode_steps"] < stats["tokens"] / 2  # rows really shared forward passes
    for s, (_, n) in zip(seqs, prompts):
        assert s.finish_reason in ("stop", "length")
        assert len(s.token_ids) == n or s.finish_reason == "stop"


def test_seeded_sampling_is_the_same_batched_or_alone(plain_lm):
    lm = plain_lm
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.2)
    ids = [lm.encode(p, chat=False) for p, _ in _prompts(6, seed=1)]

    def run(batch, seeds):
        engine = Engine(lm.model, lm.tokenizer, lm.eos_ids, max_batch=8)
        seqs = [Sequence(i, 20, params, seed=seed) for i, seed in zip(batch, seeds)]
        _run_all(engine, seqs)
        return [s.text for s in seqs]

    seeds = [7 + k for k in range(len(ids))]
    together = run(ids, seeds)
    assert together == [run([i], [seed])[0] for i, seed in zip(ids, seeds)]
    assert len(set(together)) > 1


def test_stop_string_ends_a_row_and_is_not_in_the_text(plain_lm):
    lm = plain_lm
    ids = lm.encode("the quick brown", chat=False)
    engine = Engine(lm.model, lm.tokenizer, lm.eos_ids)
    full = Sequence(ids, 30)
    _run_all(engine, [full])
    assert full.finish_reason == "length" and len(full.text) > 6
    stop = full.text[3:6]
    engine = Engine(lm.model, lm.tokenizer, lm.eos_ids)
    cut = Sequence(ids, 30, stop=[stop])
    _run_all(engine, [cut])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


def test_queue_bound_cancel_and_context_checks(plain_lm):
    lm = plain_lm
    engine = Engine(lm.model, lm.tokenizer, lm.eos_ids, max_batch=2, max_queue=1)  # not started: nothing runs
    ids = lm.encode("one two", chat=False)
    first = [Sequence(ids, 5) for _ in range(3)]
    engine.submit(first)  # 2 free slots + 1 queue place
    with pytest.raises(EngineBusy, match="busy"):
        engine.submit([Sequence(ids, 5)])
    engine.cancel(first[:1])
    engine.start()
    for s in first:
        assert s.done.wait(30)
    engine.stop()
    assert [s.finish_reason for s in first] == ["cancelled", "length", "length"]
    with pytest.raises(LmforgeError, match="maximum context length is 128"):
        engine.check(100, 29)
    with pytest.raises(LmforgeError, match="the prompt is 200 tokens"):
        engine.check(200, 1)
    with pytest.raises(LmforgeError, match="empty"):
        engine.check(0, 1)
    with pytest.raises(LmforgeError, match="max_batch"):
        Engine(lm.model, lm.tokenizer, lm.eos_ids, max_batch=0)


def test_stop_fails_waiting_sequences(plain_lm):
    lm = plain_lm
    engine = Engine(lm.model, lm.tokenizer, lm.eos_ids)
    seq = Sequence(lm.encode("one", chat=False), 5)
    engine.submit([seq])
    events = []
    seq.on_event = lambda s, kind, value: events.append(kind)
    engine.start()
    engine.stop()
    assert seq.done.wait(5)
    with pytest.raises(EngineBusy, match="shutting down"):
        engine.submit([Sequence([1, 2], 3)])
    assert events[-1] in ("done", "error")
