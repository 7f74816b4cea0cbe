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


def _recorded(seq):
    seq.events = []
    seq.on_event = lambda s, kind, value: s.events.append((kind, value))
    return seq


def test_a_row_whose_sampling_raises_ends_alone_and_the_others_finish(plain_lm, monkeypatch):
    import lmforge.deploy.batching as batching

    lm = plain_lm
    prompts = _prompts(3, seed=5)
    sampled = SamplingParams(temperature=0.8, top_k=20)
    alone = [lm.generate(p, max_new_tokens=n, chat=False) for p, n in prompts[:2]]
    solo = Sequence(lm.encode(prompts[2][0], chat=False), prompts[2][1], sampled, seed=3)
    _run_all(Engine(lm.model, lm.tokenizer, lm.eos_ids), [solo])

    real, calls = batching.sample_next, []

    def poisoned(logits, params, seen=None, generator=None):
        if params.top_p == 0.5:  # the poison row: its third draw raises, as a NaN distribution did
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(logits, params, seen, generator)

    monkeypatch.setattr(batching, "sample_next", poisoned)
    victims = [_recorded(Sequence(lm.encode(p, chat=False), n)) for p, n in prompts[:2]]
    victims.append(_recorded(Sequence(solo.prompt_ids, solo.max_new_tokens, sampled, seed=3)))
    poison = _recorded(Sequence(lm.encode("one two", chat=False), 40, SamplingParams(temperature=1.0, top_p=0.5)))
    engine = Engine(lm.model, lm.tokenizer, lm.eos_ids, max_batch=4)
    _run_all(engine, [victims[0], poison, victims[1], victims[2]])
    assert poison.events[-1][0] == "error" and "probability tensor" in poison.events[-1][1]
    assert len(poison.token_ids) == 2  # it ran, then failed at its third token
    assert [v.events[-1][0] for v in victims] == ["done"] * 3
    assert [v.text for v in victims] == alone + [solo.text]
    assert engine.stats()["running"] == 0


def test_a_request_that_fails_to_start_gets_its_error_and_shutdown_waits_on_nothing(plain_lm):
    lm = plain_lm
    ids = lm.encode("the quick brown", chat=False)
    victims = [_recorded(Sequence(ids, 6)) for _ in range(3)]
    poison = _recorded(Sequence(ids, 6, SamplingParams(temperature=1.0), seed=1))
    poison.seed = 2**64  # past the validation: torch's manual_seed overflows while the row is set up
    engine = Engine(lm.model, lm.tokenizer, lm.eos_ids, max_batch=2)
    engine.submit([victims[0], poison, victims[1], victims[2]])  # the poison is admitted next to a running row
    engine.start()
    for s in [poison, *victims]:
        assert s.done.wait(30), "a request never got an answer"
    engine.stop(timeout=5)
    assert not engine.thread.is_alive()
    assert poison.events == [("error", "generation failed: ValueError: Overflow when unpacking long long")]
    assert [v.finish_reason for v in victims] == ["length"] * 3 and len({v.text for v in victims}) == 1


def test_the_engine_keeps_its_preallocated_cache_in_the_model_dtype(tiny_lm_dirs):
    """A bfloat16 model generates over float32 caches (attention_dtype), but the engine's cache, sized for every
    slot and the whole context up front, stays bfloat16 (half the memory), and its answers are still served."""
    import torch

    lm = lmforge.load(tiny_lm_dirs["plain"], dtype="bfloat16")
    assert lm.model.make_caches(1, 8)[0].k.dtype == torch.float32
    engine = Engine(lm.model, lm.tokenizer, lm.eos_ids, max_batch=2, context=128)
    assert {c.k.dtype for c in engine.caches} == {torch.bfloat16}
    seqs = [Sequence(lm.encode(p, chat=False), n) for p, n in _prompts(3)]
    _run_all(engine, seqs)
    assert all(s.finish_reason in ("stop", "length") and s.token_ids for s in seqs)
