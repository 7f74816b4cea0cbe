"""What the compiled decode step may assume (issue 17): generation runs without autograd, and a step compiled
without dynamo's guards on the model (generation/fast.py: compile_step) never runs a graph traced for another model
or for this model before it changed."""

import copy

import pytest
import torch

from lmforge.checkpoints.hf import read_hf_dir
from lmforge.checkpoints.resolve import build_model
from lmforge.config import preset
from lmforge.generation import fast
from lmforge.generation.generate import generate_tokens
from lmforge.models.decoder import DecoderLM
from lmforge.models.quantized import quantize_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]


def _run(model, prompts, n, **kw):
    rows = [[] for _ in prompts]
    for step in generate_tokens(model, prompts, n, **kw):
        for r, t in zip(rows, step):
            if t is not None:
                r.append(t)
    return rows


@pytest.fixture
def llama(hf_tiny):
    config, state, _ = read_hf_dir(hf_tiny["llama"][1])
    return build_model(config, state)


@pytest.fixture
def fresh_states(monkeypatch):
    monkeypatch.setattr(fast, "_STATES", type(fast._STATES)())


@pytest.mark.parametrize("compile", [False, True])
def test_generation_steps_run_without_autograd(llama, compile, monkeypatch):
    """Parameters that require grad (a freshly loaded model) must not make each step record its autograd graph
    (nor make torch.compile build the step as a training graph); the caller's grad mode is left as it was."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setattr(fast, "_STATES", type(fast._STATES)())
    assert all(p.requires_grad for p in llama.parameters())
    inside = []
    llama.model.register_forward_pre_hook(lambda module, args: inside.append(torch.is_grad_enabled()))
    between = []
    for _ in generate_tokens(llama, PROMPTS, 6, compile=compile):
        between.append(torch.is_grad_enabled())
    assert inside and not any(inside)
    assert between and all(between)


def test_a_model_changed_after_its_step_was_built_gets_new_steps(llama, fresh_states, monkeypatch, capsys):
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    model = copy.deepcopy(llama)
    assert _run(model, PROMPTS, 8, compile=True) == _run(model, PROMPTS, 8)
    assert "compiled the decode step" in capsys.readouterr().err
    quantize_model(model, "int8")  # layers replaced in place: the old step's graph would not fit
    eager = _run(model, PROMPTS, 8)
    assert _run(model, PROMPTS, 8, compile=True) == eager
    assert "compiled the decode step (batch 2" in capsys.readouterr().err
    assert _run(model, PROMPTS, 8, compile=True) == eager  # unchanged since: the step is reused, not rebuilt
    assert "compiled the decode step" not in capsys.readouterr().err


@pytest.mark.real
def test_models_of_one_shape_but_different_depth_each_run_their_own_compiled_step(llama, fresh_states, capsys):
    """The steps are compiled without guards on the model, so nothing checked at call time tells a one-layer model
    from a two-layer one of the same widths: each must still run the graph traced for itself (each step has its
    own code copy, and dynamo ties a graph to the torch.compile call that made it)."""
    config = preset("tiny-llama", vocab_size=llama.config.vocab_size, n_layer=1, max_seq_len=llama.config.max_seq_len)
    shallow = DecoderLM(config).init_weights(seed=1, std=0.2).eval()
    runs = {name: _run(m, PROMPTS, 12) for name, m in (("deep", llama), ("shallow", shallow))}
    assert runs["deep"] != runs["shallow"]
    for _ in range(2):  # interleaved: each finds its own step again
        assert _run(llama, PROMPTS, 12, compile=True) == runs["deep"]
        assert _run(shallow, PROMPTS, 12, compile=True) == runs["shallow"]
    assert "failed" not in capsys.readouterr().err


@pytest.mark.real
def test_a_compiled_step_follows_the_model_changed_in_place(llama, fresh_states, hf_tiny, capsys):
    model = copy.deepcopy(llama)
    assert _run(model, PROMPTS, 12, compile=True) == _run(model, PROMPTS, 12)
    other = DecoderLM(model.config).init_weights(seed=7, std=0.2)
    model.load_state_dict(other.state_dict())  # new values, same tensors: the step reads them at each call
    eager = _run(model, PROMPTS, 12)
    assert _run(model, PROMPTS, 12, compile=True) == eager
    quantize_model(model, "int8")  # new layers: a new step is compiled
    assert _run(model, PROMPTS, 12, compile=True) == _run(model, PROMPTS, 12)
    assert "failed" not in capsys.readouterr().err


@pytest.mark.real
def test_more_step_shapes_than_dynamos_recompile_limit_all_compile(llama, fresh_states, capsys):
    """dynamo keeps at most ``recompile_limit`` (8) graphs per code object. Every step shape used to compile
    ``StaticDecoder.forward`` itself, so a process's 9th shape (a server's batch and timeline buckets reach it)
    failed and the model decoded eagerly from then on. Each step now compiles its own copy of the code."""
    limit = torch._dynamo.config.recompile_limit
    for batch in range(1, limit + 2):
        prompts = [PROMPTS[0]] * batch
        assert _run(llama, prompts, 3, compile=True) == _run(llama, prompts, 3)
    err = capsys.readouterr().err
    assert err.count("compiled the decode step") == limit + 1 and "failed" not in err
    assert fast.compile_failed(llama) is None


@pytest.mark.real
def test_the_compiled_step_keeps_no_guard_on_the_model(llama, fresh_states, monkeypatch):
    """dynamo names a guard by its source in the frame (``self._modules['model']...``, ``tokens``, ``G[...]``); the
    filter must drop every guard under ``self`` (8,531 of 8,533 for SmolLM2-135M, ~2 ms a call) and keep those on
    the step's inputs. (It once matched ``L['self']``, a spelling dynamo does not use, and dropped none.)"""
    seen = []
    keep = fast._keep_guards_off_the_step

    def spy(guards):
        kept = keep(guards)
        seen.append([g.name for g, k in zip(guards, kept) if k])
        return kept
    monkeypatch.setattr(fast, "_keep_guards_off_the_step", spy)
    assert _run(llama, PROMPTS, 4, compile=True) == _run(llama, PROMPTS, 4)
    kept, = seen
    assert {"tokens", "positions", "column", "key_mask"} <= set(kept)
    assert not [n for n in kept if n.startswith("self")]


def test_a_changed_plain_attribute_gets_new_steps(llama, fresh_states, monkeypatch, capsys):
    """Without guards on the model, a flag or constant the graph baked in (``eps``, ``training``, an adapter's
    switch) is part of ``model_signature``: changing one builds new steps."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    model = copy.deepcopy(llama)
    _run(model, PROMPTS, 3, compile=True)
    assert "compiled the decode step" in capsys.readouterr().err
    _run(model, PROMPTS, 3, compile=True)
    assert "compiled the decode step" not in capsys.readouterr().err
    model.model.norm.eps = 0.5
    _run(model, PROMPTS, 3, compile=True)
    assert "compiled the decode step" in capsys.readouterr().err


@pytest.mark.real
def test_a_compiled_step_follows_a_changed_constant(llama, fresh_states):
    model = copy.deepcopy(llama).eval()
    assert _run(model, PROMPTS, 12, compile=True) == _run(model, PROMPTS, 12)
    for layer in model.model.layers:
        layer.input_layernorm.eps = 4.0  # a constant the compiled graph has baked in
    eager = _run(model, PROMPTS, 12)
    assert _run(model, PROMPTS, 12, compile=True) == eager
