"""data/tokens.py: IGNORE_INDEX, padding rows into batches, and log-probs of labelled tokens (against a naive
full-logits computation: padding, rows without a label, float32 and bf16 autocast, gradients)."""

import pytest
import torch
from torch import nn

from lmforge.data.tokens import (
    IGNORE_INDEX,
    labelled_logprobs,
    pad_left,
    pad_right,
    pad_rows,
    select_labelled,
    token_logprobs,
)
from lmforge.errors import LmforgeError

V, C = 11, 8


def naive(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Full log-softmax over every position, picked at the labels, zeroed where there is no label."""
    logp = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(labels != IGNORE_INDEX, logp, torch.zeros_like(logp))


def batch(seed: int = 0):
    """Hidden states (3, 6, C) and labels with a right-padded row, a row with no label and a prompt-masked row."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 6, C, generator=g)
    labels = torch.randint(0, V, (3, 6), generator=g)
    labels[0, 4:] = IGNORE_INDEX  # padding after a short row
    labels[1] = IGNORE_INDEX  # nothing labelled
    labels[2, :3] = IGNORE_INDEX  # a prompt
    return hidden, labels


def test_ignore_index_is_the_one_torch_and_the_data_use():
    from lmforge.data import sft
    from lmforge.training import objectives

    assert IGNORE_INDEX == -100 == nn.CrossEntropyLoss().ignore_index
    assert sft.IGNORE_INDEX is IGNORE_INDEX and objectives.IGNORE_INDEX is IGNORE_INDEX


def test_pad_rows_right_and_left():
    rows = [[5, 6, 7], [8], []]
    assert pad_rows(rows, 0).tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert pad_rows(rows, IGNORE_INDEX, "left").tolist() == [[5, 6, 7], [-100, -100, 8], [-100, -100, -100]]
    ids, mask = pad_right(rows, 9)
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9], [9, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    ids, mask = pad_left(rows, 9)
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8], [9, 9, 9]] and mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_pad_rows_refuses_a_bad_side_and_no_rows():
    with pytest.raises(LmforgeError, match="padding side must be one of right, left, got 'middle'"):
        pad_rows([[1]], 0, "middle")
    with pytest.raises(LmforgeError, match="empty list of rows"):
        pad_right([], 0)


def test_select_labelled_keeps_row_major_order():
    x = torch.arange(12.0).reshape(2, 3, 2)
    labels = torch.tensor([[IGNORE_INDEX, 4, 5], [6, IGNORE_INDEX, IGNORE_INDEX]])
    h, y = select_labelled(x, labels)
    assert h.tolist() == [[2.0, 3.0], [4.0, 5.0], [6.0, 7.0]] and y.tolist() == [4, 5, 6]


def test_token_logprobs_match_the_full_log_softmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, V, generator=g)
    labels = batch()[1]
    got = token_logprobs(logits, labels)
    assert got.dtype == torch.float32 and got.shape == labels.shape
    torch.testing.assert_close(got, naive(logits, labels))
    assert (got[1] == 0).all() and (got[0, 4:] == 0).all() and (got[2, 3:] < 0).all()
    # sequence log-probs: sums of the labelled positions only
    torch.testing.assert_close(got.sum(-1)[2], logits[2, 3:].log_softmax(-1).gather(-1, labels[2, 3:, None]).sum())


def test_sequence_logprobs_sum_only_labelled_tokens():
    logits = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[3, -100, 5, 1], [-100, -100, 2, 6]])
    logp = logits.log_softmax(-1)
    expected = torch.stack([logp[0, 0, 3] + logp[0, 2, 5] + logp[0, 3, 1], logp[1, 2, 2] + logp[1, 3, 6]])
    torch.testing.assert_close(token_logprobs(logits, labels).sum(-1), expected)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_labelled_logprobs_equal_the_naive_full_logits_computation(autocast):
    torch.manual_seed(0)
    head = nn.Linear(C, V, bias=False)
    hidden, labels = batch()
    h1, h2 = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = labelled_logprobs(h1, head, labels)
        expected = naive(head(h2), labels)
    assert got.dtype == torch.float32 and got.shape == labels.shape
    tol = {"atol": 2e-2, "rtol": 1e-2} if autocast else {}  # bf16 matmuls of different shapes round differently
    torch.testing.assert_close(got, expected, **tol)
    assert (got[1] == 0).all() and (got[0, 4:] == 0).all() and (got[:, :3][2] == 0).all()

    (g_got,) = torch.autograd.grad(got.sum(), [h1], retain_graph=True)
    w_got = torch.autograd.grad(got.sum(), [head.weight])[0]
    (g_exp,) = torch.autograd.grad(expected.sum(), [h2], retain_graph=True)
    w_exp = torch.autograd.grad(expected.sum(), [head.weight])[0]
    torch.testing.assert_close(g_got, g_exp, **tol)
    torch.testing.assert_close(w_got, w_exp, **tol)
    assert (g_got[1] == 0).all()  # a row without a label gets no gradient


def test_the_head_runs_on_labelled_positions_only():
    seen = []
    head = nn.Linear(C, V, bias=False)
    hidden, labels = batch()

    def spy(h: torch.Tensor) -> torch.Tensor:
        seen.append(h.shape)
        return head(h)

    labelled_logprobs(hidden, spy, labels)
    assert seen == [torch.Size([int((labels != IGNORE_INDEX).sum()), C])]


def test_nothing_labelled_gives_zeros_and_zero_gradients():
    head = nn.Linear(C, V, bias=False)
    hidden = torch.randn(2, 4, C, requires_grad=True)
    labels = torch.full((2, 4), IGNORE_INDEX)
    got = labelled_logprobs(hidden, head, labels)
    assert got.tolist() == [[0.0] * 4] * 2
    got.sum().backward()
    assert (hidden.grad == 0).all() and (head.weight.grad == 0).all()
    assert token_logprobs(torch.randn(2, 4, V), labels).abs().sum() == 0


def test_a_padded_row_scores_as_it_does_alone():
    """A causal LM's right-padded batch: each row's sequence log-prob equals the row scored on its own."""
    from lmforge.models import ModelConfig
    from lmforge.models.decoder import DecoderLM

    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=V, n_embd=16, n_layer=1, n_head=2, max_seq_len=16)).eval()
    rows = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    ids, _ = pad_right(rows, 0)
    labels = pad_rows(rows, IGNORE_INDEX)
    labels[:, 0] = IGNORE_INDEX  # the first token is never predicted
    with torch.no_grad():
        together = labelled_logprobs(model.hidden_states(ids)[:, :-1], model.lm_head, labels[:, 1:]).sum(-1)
        for i, r in enumerate(rows):
            alone = torch.tensor([r])
            expected = naive(model(alone)[:, :-1], alone[:, 1:]).sum()
            torch.testing.assert_close(together[i], expected, atol=1e-5, rtol=1e-5)
