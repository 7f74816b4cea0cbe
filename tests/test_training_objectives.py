"""Objectives on hand-built cases: the losses equal cross-entropy computed by hand, BERT's masking
ratios, T5's sentinel structure; the MLM head matches transformers' BertForMaskedLM."""

import math

import numpy as np
import pytest
import torch

from lmforge.data.tokens import IGNORE_INDEX
from lmforge.training import objectives as obj


def test_causal_lm_loss_by_hand():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]])  # (1, 2, 3)
    labels = torch.tensor([[0, 2]])
    p0 = math.exp(2) / (math.exp(2) + 1 + math.exp(-1))
    p1 = 1 / (1 + math.e + 1)
    expected = -(math.log(p0) + math.log(p1)) / 2
    assert obj.causal_lm_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    ignored = torch.tensor([[0, IGNORE_INDEX]])  # IGNORE_INDEX positions do not count
    assert obj.causal_lm_loss(logits, ignored).item() == pytest.approx(-math.log(p0), rel=1e-6)


def test_losses_agree_with_functional_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen)
    labels = torch.randint(0, 7, (2, 5), generator=gen)
    labels[0, 1] = IGNORE_INDEX
    manual = -torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    keep = labels != IGNORE_INDEX
    expected = manual[keep].mean()
    for fn in (obj.causal_lm_loss, obj.masked_lm_loss, obj.span_corruption_loss):
        torch.testing.assert_close(fn(logits, labels), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # computed in float32 under autocast
        assert obj.causal_lm_loss(logits.bfloat16(), labels).dtype == torch.float32


def test_linear_cross_entropy_equals_head_then_cross_entropy():
    """The fused LM head + loss gives F.cross_entropy's loss and gradients (fp32: to rounding; bf16 autocast:
    within bf16 rounding), skips IGNORE_INDEX labels, and needs no gradient in evaluation."""
    g = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(2, 7, 16, generator=g), torch.randn(50, 16, generator=g) * 0.3
    labels = torch.randint(0, 50, (2, 7), generator=g)
    labels[0, :3] = IGNORE_INDEX
    for autocast in (False, True):
        results = []
        for fused in (True, False):
            h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = (obj.linear_cross_entropy(h, w, labels) if fused
                        else obj.token_cross_entropy(h @ w.t(), labels))
            loss.backward()
            results.append((loss.detach(), h.grad, w.grad))
        tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
        for fused_t, plain_t in zip(*results):
            torch.testing.assert_close(fused_t, plain_t, **tol)
        assert results[0][1][0, :2].abs().max() == 0  # no gradient flows from unlabelled positions
    with torch.no_grad():
        expected = obj.token_cross_entropy(h0 @ w0.t(), labels)
        torch.testing.assert_close(obj.linear_cross_entropy(h0, w0, labels), expected)


def test_bert_masking_ratios():
    rng = np.random.default_rng(0)
    vocab, mask_id, cls_id = 1000, 999, 998
    ids = rng.integers(0, 900, size=(400, 100))
    ids[:, 0] = cls_id
    inputs, labels = obj.mask_tokens(ids, rng, mask_id, vocab, special_ids=(cls_id,))
    chosen = labels != IGNORE_INDEX
    assert (chosen.sum(1) == round(0.15 * 99)).all()  # 15% of the 99 non-special tokens in every row
    assert not chosen[:, 0].any() and (inputs[:, 0] == cls_id).all()
    assert (labels[chosen] == ids[chosen]).all()
    assert (inputs[~chosen] == ids[~chosen]).all()
    n = chosen.sum()
    masked = (inputs[chosen] == mask_id).sum() / n
    unchanged = (inputs[chosen] == ids[chosen]).sum() / n
    random_ = 1 - masked - unchanged
    assert masked == pytest.approx(0.8, abs=0.02)
    assert unchanged == pytest.approx(0.1, abs=0.02)  # (a random draw equal to the original is rare: 1/1000)
    assert random_ == pytest.approx(0.1, abs=0.02)


def test_span_corruption_structure():
    rng = np.random.default_rng(1)
    ids = np.arange(10, 110)  # 100 distinct tokens
    sentinels = [999 - i for i in range(100)]  # <extra_id_0> is the last id
    eos = 1
    inputs, targets = obj.span_corrupt(ids, rng, sentinels, eos)
    n_noise, n_spans = obj.span_lengths(100)
    assert (n_noise, n_spans) == (15, 5)
    assert len(inputs) == 100 - 15 + 5 + 1 and len(targets) == 15 + 5 + 1
    assert inputs[-1] == eos and targets[-1] == eos
    assert [t for t in inputs if t >= 900] == sentinels[:5]  # sentinels in order, one per span
    assert [t for t in targets if t >= 900] == sentinels[:5]
    assert targets[0] == sentinels[0] and inputs[0] < 900  # the input starts with kept text
    # filling each sentinel of the input with its span from the target gives back the sequence
    spans, cur = {}, None
    for t in targets[:-1]:
        if t >= 900:
            cur = t
            spans[cur] = []
        else:
            spans[cur].append(t)
    assert all(spans[s] for s in sentinels[:5])  # spans are non-empty
    rebuilt = [x for t in inputs[:-1] for x in (spans[t] if t >= 900 else [t])]
    assert rebuilt == ids.tolist()
    assert obj.shift_right(targets[None], 0).tolist() == [[0, *targets[:-1].tolist()]]


def test_span_corruption_mean_span_length():
    rng = np.random.default_rng(2)
    lengths = []
    for _ in range(200):
        _, targets = obj.span_corrupt(np.arange(10, 522), rng, [9999 - i for i in range(100)], None)
        starts = np.flatnonzero(targets >= 9000)  # sentinel positions; a span runs to the next sentinel
        lengths += [e - s - 1 for s, e in zip(starts, [*starts[1:], len(targets)])]
    assert np.mean(lengths) == pytest.approx(3.0, abs=0.1)


def test_mlm_head_matches_transformers(tmp_path):
    import transformers

    from lmforge.checkpoints.hf import read_hf_dir, save_hf_dir
    from lmforge.config import ModelConfig
    from lmforge.models.mlm import MaskedLM

    config = ModelConfig(family="bert", arch="encoder", vocab_size=50, n_layer=2, n_embd=32, n_head=2,
                         intermediate_size=64, max_seq_len=64, norm="layernorm", norm_eps=1e-12, mlp="gelu_exact",
                         positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True, norm_first=False,
                         type_vocab_size=2, pad_token_id=0)
    model = MaskedLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    save_hf_dir(model, tmp_path / "mlm")
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path / "mlm").eval()
    idx = torch.randint(1, 50, (2, 9), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, rtol=1e-4, atol=1e-4)
    assert hf.cls.predictions.decoder.weight.data_ptr() == hf.bert.embeddings.word_embeddings.weight.data_ptr()
    cfg, tensors, _ = read_hf_dir(tmp_path / "mlm")  # lmforge's loader reads it as a plain encoder
    assert cfg.arch == "encoder" and not cfg.pooler and "embed_tokens.weight" in tensors
