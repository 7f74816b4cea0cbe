"""What users' tools expect of ``lmforge serve`` (issue 15): logprobs read by the official ``openai`` client and
equal to a direct forward pass; ``echo`` + ``logprobs`` with ``max_tokens: 0`` (lm-evaluation-harness's
log-likelihood requests) equal to the prompt's teacher-forced logprobs; ``/v1/embeddings`` equal to
``lmforge embed``; several LoRA adapters on one base, each equal to that adapter loaded alone and merged;
``/metrics`` in Prometheus' text format."""

import base64
import json
import re
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import openai
import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.cli.serve import load_embedder, load_lora_models
from lmforge.deploy.batching import Engine
from lmforge.deploy.serve_config import ServeConfig
from lmforge.deploy.server import BackgroundServer, create_app, token_piece
from lmforge.errors import LmforgeError
from lmforge.peft.adapters import save_adapter
from lmforge.peft.lora import LoraSpec, add_lora, lora_layers, merge_lora
from test_reward import tiny_encoder  # noqa: F401 (a fixture)

KEY = "eco-key"
MODEL = "tiny-chat"
TOL = 1e-5


def _lora_adapter(base_dir, out, seed: int):
    """A LoRA adapter on the tiny model with random (non-zero) B matrices, saved as a PEFT folder."""
    lm = lmforge.load(base_dir)
    add_lora(lm.model, LoraSpec(r=4, alpha=8, targets="all-linear"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(lm.model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.3)
    return save_adapter(lm.model, out)


@pytest.fixture(scope="module")
def eco(tiny_lm_dirs, tiny_encoder, tmp_path_factory):  # noqa: F811
    base = tiny_lm_dirs["chat"]
    tmp = tmp_path_factory.mktemp("eco")
    paths = {"fox": _lora_adapter(base, tmp / "fox", 1), "dog": _lora_adapter(base, tmp / "dog", 2)}
    lm = lmforge.load(base)
    engine = Engine(lm.model, lm.tokenizer, lm.eos_ids, max_batch=8, max_queue=16)
    adapters = {n: (m, Engine(m.model, m.tokenizer, m.eos_ids, max_batch=8, max_queue=16))
                for n, m in load_lora_models(lm, paths).items()}
    embedder = load_embedder(str(tiny_encoder))
    app = create_app(lm, engine, model_id=MODEL, api_key=KEY, adapters=adapters, embedder=embedder,
                     embedding_id="tiny-bert")
    with BackgroundServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        yield SimpleNamespace(url=srv.url, lm=lm, client=client, base=base, adapters=paths, encoder=tiny_encoder)


def _post(eco, path, body, key=KEY):
    return httpx.post(eco.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _greedy_reference(lm, ids: list[int], steps: int, k: int):
    """Greedy decoding by full forward passes: [(token, logprob, [(id, lp)] top k)], stopping at EOS (excluded)."""
    out, ids = [], list(ids)
    with torch.no_grad():
        for _ in range(steps):
            lp = torch.log_softmax(lm.model(torch.tensor([ids]))[0, -1].float(), -1)
            tok = int(lp.argmax())
            if tok in lm.eos_ids:
                break
            values, top = lp.topk(k)
            out.append((tok, float(lp[tok]), list(zip(top.tolist(), values.tolist()))))
            ids.append(tok)
    return out


def _text(lm, token: int) -> str:
    return token_piece(lm.tokenizer, token)[0]


def _chat(text):
    return [{"role": "user", "content": text}]


def test_openai_client_reads_chat_logprobs_equal_to_a_forward_pass(eco):
    messages = _chat("What is the capital of France?")
    r = eco.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=3)
    ref = _greedy_reference(eco.lm, eco.lm.encode(messages), 8, 3)
    content = r.choices[0].logprobs.content
    assert ref and len(content) == len(ref)
    for got, (tok, lp, top) in zip(content, ref):
        assert got.token == _text(eco.lm, tok) and abs(got.logprob - lp) < TOL
        assert bytes(got.bytes) == token_piece(eco.lm.tokenizer, tok)[1]
        assert [t.token for t in got.top_logprobs] == [_text(eco.lm, i) for i, _ in top]
        assert max(abs(t.logprob - v) for t, (_, v) in zip(got.top_logprobs, top)) < TOL
    assert "".join(bytes(c.bytes).decode("utf-8", "replace") for c in content) == r.choices[0].message.content

    chunks = list(eco.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                     logprobs=True, top_logprobs=3, stream=True))
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]

    plain = eco.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None


def test_completions_logprobs_legacy_shape_plain_and_streamed(eco):
    prompt = "The quick brown"
    r = eco.client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2)
    ref = _greedy_reference(eco.lm, eco.lm.encode(prompt, chat=False), 6, 2)
    lp = r.choices[0].logprobs
    assert lp.tokens == [_text(eco.lm, t) for t, _, _ in ref]
    assert max(abs(a - b) for a, (_, b, _) in zip(lp.token_logprobs, ref)) < TOL
    assert [list(d) for d in lp.top_logprobs] == [[_text(eco.lm, i) for i, _ in top] for _, _, top in ref]
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)

    chunks = list(eco.client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2,
                                                stream=True))
    tokens = [t for ch in chunks if ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    offsets = [t for ch in chunks if ch.choices[0].logprobs for t in ch.choices[0].logprobs.text_offset]
    values = [t for ch in chunks if ch.choices[0].logprobs for t in ch.choices[0].logprobs.token_logprobs]
    assert tokens == lp.tokens and offsets == lp.text_offset and values == lp.token_logprobs


def test_echo_with_max_tokens_0_scores_the_prompt_teacher_forced(eco):
    """What lm-evaluation-harness's local-completions sends for log-likelihood: token ids, echo, logprobs, no
    new tokens; the first token has no logprob, the others equal log_softmax of one forward pass."""
    ids = eco.lm.tokenizer.encode("one two three four five", add_special_tokens=False)
    r = _post(eco, "/v1/completions", {"model": MODEL, "prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 1,
                                       "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    with torch.no_grad():
        lp = torch.log_softmax(eco.lm.model(torch.tensor([ids]))[0].float(), -1)
    expected = [float(lp[t - 1, ids[t]]) for t in range(1, len(ids))]
    got = choice["logprobs"]["token_logprobs"]
    assert got[0] is None and choice["logprobs"]["top_logprobs"][0] is None
    assert len(got) == len(ids) and max(abs(a - b) for a, b in zip(got[1:], expected)) < TOL
    assert choice["logprobs"]["tokens"] == [_text(eco.lm, t) for t in ids]
    assert choice["text"] == eco.lm.tokenizer.decode(ids) and r.json()["usage"]["completion_tokens"] == 0
    greedy = [max(d.values()) for d in choice["logprobs"]["top_logprobs"][1:]]  # lm-eval's is_greedy check
    assert all(g >= v - TOL for g, v in zip(greedy, got[1:]))

    # with one new token (older lm-eval): the prompt's entries, then the generated one
    r1 = eco.client.completions.create(model=MODEL, prompt=ids, echo=True, max_tokens=1, logprobs=1, temperature=0)
    lp1 = r1.choices[0].logprobs
    assert len(lp1.token_logprobs) == len(ids) + 1 and lp1.token_logprobs[:-1] == got
    stream = list(eco.client.completions.create(model=MODEL, prompt=ids, echo=True, max_tokens=0, logprobs=1,
                                                stream=True))
    assert [v for ch in stream if ch.choices[0].logprobs for v in ch.choices[0].logprobs.token_logprobs] == got


@pytest.mark.parametrize("path, body, expected", [
    ("/v1/chat/completions", {"messages": _chat("hi"), "top_logprobs": 2}, "top_logprobs needs logprobs"),
    ("/v1/chat/completions", {"messages": _chat("hi"), "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ("/v1/embeddings", {"model": "tiny-bert", "input": []}, "input is empty"),
    ("/v1/embeddings", {"model": "tiny-bert", "input": [1, 2]}, "token ids"),
    ("/v1/embeddings", {"model": "tiny-bert", "input": "x", "encoding_format": "int8"}, "encoding_format"),
])
def test_bad_logprob_and_embedding_requests_are_400(eco, path, body, expected):
    r = _post(eco, path, {"model": MODEL, **body})
    assert r.status_code == 400 and expected in r.json()["error"]["message"], r.text


def test_embeddings_equal_lmforge_embed(eco, tmp_path):
    texts = ["A man is eating food.", "the cat sat", "über café naïve"]
    out = tmp_path / "vecs.jsonl"
    assert main(["embed", "-m", str(eco.encoder), *texts, "-o", str(out)]) == 0
    expected = np.array([json.loads(line)["embedding"] for line in out.read_text().splitlines()])

    r = eco.client.embeddings.create(model="tiny-bert", input=texts)  # the client asks for base64 and decodes it
    got = np.array([d.embedding for d in r.data])
    assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-6
    assert [d.index for d in r.data] == [0, 1, 2] and r.usage.prompt_tokens > 0

    body = _post(eco, "/v1/embeddings", {"model": "tiny-bert", "input": texts[1], "encoding_format": "float"}).json()
    assert np.abs(np.array(body["data"][0]["embedding"]) - expected[1]).max() < 1e-6
    raw = _post(eco, "/v1/embeddings", {"model": "tiny-bert", "input": texts[1], "encoding_format": "base64"}).json()
    assert np.abs(np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4") - expected[1]).max() < 1e-6

    r = _post(eco, "/v1/embeddings", {"model": MODEL, "input": "x"})
    assert r.status_code == 404 and "tiny-bert" in r.json()["error"]["message"]
    r = _post(eco, "/v1/chat/completions", {"model": "tiny-bert", "messages": _chat("hi")})
    assert r.status_code == 404 and "/v1/embeddings" in r.json()["error"]["message"]
    assert httpx.post(eco.url + "/v1/embeddings", json={"model": "tiny-bert", "input": "x"}).status_code == 401


def test_each_lora_adapter_equals_that_adapter_loaded_alone_and_merged(eco):
    c = eco.client
    cards = {m.id: m for m in c.models.list().data}
    assert set(cards) == {MODEL, "fox", "dog", "tiny-bert"}
    assert c.models.retrieve("fox").model_extra["parent"] == MODEL
    prompt = "The quick brown"
    outputs = {}
    for name in (MODEL, "fox", "dog"):
        r = c.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0)
        assert r.model == name
        outputs[name] = r.choices[0].text
    assert outputs[MODEL] == eco.lm.generate(prompt, chat=False, max_new_tokens=10)
    for name, path in eco.adapters.items():
        alone = lmforge.load(eco.base, adapter=path)
        assert outputs[name] == alone.generate(prompt, chat=False, max_new_tokens=10)
        merge_lora(alone.model)
        assert outputs[name] == alone.generate(prompt, chat=False, max_new_tokens=10)
    assert len(set(outputs.values())) == 3, "the adapters change the output"
    # the base is not changed by serving adapters beside it (weights are shared, not merged into)
    assert c.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0).choices[0].text == \
        outputs[MODEL]
    chat = c.chat.completions.create(model="dog", messages=_chat("hi"), max_tokens=5, temperature=0)
    assert chat.model == "dog"

    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="cat", prompt=prompt, max_tokens=2)
    message = e.value.body["message"]
    assert "'cat' does not exist" in message and all(f"'{n}'" in message for n in (MODEL, "fox", "dog"))


def test_lora_modules_option():
    cfg = ServeConfig(model="m", lora_modules=("a=/x/a", "b=/y/b"))
    assert cfg.adapters() == {"a": Path("/x/a"), "b": Path("/y/b")}
    for bad, expected in ((("nopath",), "NAME=PATH"), (("a=/x", "a=/y"), "twice"), (("=/x",), "NAME=PATH")):
        with pytest.raises(LmforgeError, match=expected):
            ServeConfig(model="m", lora_modules=bad)
    with pytest.raises(LmforgeError, match="--adapter"):
        ServeConfig(model="m", lora_modules=("a=/x",), adapter="/z")


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_in_prometheus_text_format(eco):
    before = _samples(httpx.get(eco.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text)
    r = eco.client.completions.create(model=MODEL, prompt="one two", max_tokens=4, temperature=0)
    eco.client.chat.completions.create(model=MODEL, messages=_chat("hi"), max_tokens=3, temperature=0, stream=True)
    _post(eco, "/v1/completions", {"model": "nope", "prompt": "x"})
    response = httpx.get(eco.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    for line in text.splitlines():  # every line is a comment or `name{labels} number`
        assert line.startswith("# ") or re.fullmatch(r'[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? \S+', line)
    after = _samples(text)

    def delta(name):
        return after.get(name, 0) - before.get(name, 0)

    assert delta('lmforge_requests_total{route="/v1/completions",status="200"}') == 1
    assert delta('lmforge_requests_total{route="/v1/completions",status="404"}') == 1
    assert delta('lmforge_requests_total{route="/v1/chat/completions",status="200"}') == 1
    assert delta("lmforge_prompt_tokens_total") >= r.usage.prompt_tokens
    assert delta("lmforge_completion_tokens_total") >= r.usage.completion_tokens
    assert delta('lmforge_request_latency_seconds_count{route="/v1/completions"}') == 2
    assert delta("lmforge_time_to_first_token_seconds_count") == 2
    # each request's first token comes from its prefill, each later one from a decode step
    assert r.usage.completion_tokens - 1 <= delta("lmforge_decode_steps_total") <= (4 - 1) + (3 - 1)
    assert after['lmforge_time_to_first_token_seconds_bucket{le="+Inf"}'] == \
        after["lmforge_time_to_first_token_seconds_count"]
    assert after["lmforge_queue_depth"] == 0 and "lmforge_running_sequences" in after
    assert httpx.get(eco.url + "/metrics").status_code == 401  # behind the API key, like the API


def test_cli_serve_loads_lora_modules_and_the_embedding_model(eco, monkeypatch, capsys):
    import lmforge.deploy.server as server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda lm, cfg, **kw: seen.update(kw, lm=lm))
    fox, dog = eco.adapters["fox"], eco.adapters["dog"]
    assert main(["serve", str(eco.base), "--lora-modules", f"fox={fox}", f"dog={dog}",
                 "--embedding-model", str(eco.encoder), "--served-model-name", MODEL]) == 0
    assert set(seen["adapters"]) == {"fox", "dog"} and seen["embedding_id"] == eco.encoder.name
    assert seen["model_id"] == MODEL and seen["embedder"].config.arch == "encoder"
    shared = {p.data_ptr() for p in seen["lm"].model.parameters()}
    assert {p.data_ptr() for p in seen["adapters"]["fox"].model.parameters()} & shared, "base weights are shared"

    capsys.readouterr()
    for argv, expected in (
        (["--lora-modules", "fox"], "NAME=PATH"),
        (["--lora-modules", f"{MODEL}={fox}", "--served-model-name", MODEL], "share a name"),
        (["--embedding-model", str(eco.base), "--served-model-name", MODEL], "not an encoder-only model"),
        (["--lora-modules", f"fox={fox}", "--quantize", "int8"], "--quantize"),
    ):
        assert main(["serve", str(eco.base), *argv]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err
