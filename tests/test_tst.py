"""The method, stated as properties of tst.py (METHOD.md, phase 1 steps 1-6)."""

import math

import pytest
import torch
import torch.nn.functional as F

import tst
from tst import IGNORE_INDEX


def slow_bag_targets(labels, s):
    """By the definition: latent j targets tokens (j+1)*s + i, i.e. labels[(j+1)*s + i - 1], when in the row."""
    B, L = labels.shape
    out = torch.full((B, L // s, s), IGNORE_INDEX, dtype=labels.dtype)
    for j in range(L // s):
        for i in range(s):
            k = (j + 1) * s + i - 1
            if k < L:
                out[:, j, i] = labels[:, k]
    return out


def paper_mce(logits, targets, weights):
    """The paper's loop: one cross-entropy per target column, weighted; empty columns drop out."""
    total, norm = 0.0, 0.0
    for i in range(targets.size(-1)):
        column = targets[..., i].reshape(-1)
        if (column != IGNORE_INDEX).any():
            total = total + weights[i] * F.cross_entropy(logits.reshape(-1, logits.size(-1)), column)
            norm = norm + weights[i]
    return total / norm


def test_fold_makes_contiguous_bags():
    tokens = torch.arange(12).view(1, 12)
    assert tst.fold(tokens, 4).tolist() == [[[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]]


def test_fold_rejects_a_length_that_is_not_a_multiple_of_s():
    with pytest.raises(ValueError, match="not a multiple of 4"):
        tst.fold(torch.zeros(2, 10, dtype=torch.long), 4)


def test_bag_targets_is_the_next_bag_by_hand():
    # a row of data tokens 0..12 (s*T + 1 = 13 with s = 4, T = 3): labels are tokens 1..12
    labels = torch.arange(1, 13).view(1, 12)
    targets = tst.bag_targets(labels, 4)
    # bag 0 reads tokens 0-3 and targets 4-7; bag 1 reads 4-7, targets 8-11; the last bag only token 12 exists
    assert targets.tolist() == [[[4, 5, 6, 7], [8, 9, 10, 11], [12, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]]


@pytest.mark.parametrize("s", [1, 2, 3, 6, 16])
def test_bag_targets_matches_the_definition(s):
    labels = torch.randint(0, 1000, (3, 5 * s))
    assert torch.equal(tst.bag_targets(labels, s), slow_bag_targets(labels, s))


def test_bag_targets_with_s_1_is_the_identity():
    labels = torch.randint(0, 50, (2, 7))
    assert torch.equal(tst.bag_targets(labels, 1).squeeze(-1), labels)


def test_bag_embed_is_the_mean_of_the_bag():
    emb = torch.nn.Embedding(10, 3)
    bags = torch.tensor([[[1, 2], [3, 3]]])
    expected = torch.stack([(emb.weight[1] + emb.weight[2]) / 2, emb.weight[3]])
    torch.testing.assert_close(tst.bag_embed(emb, bags)[0], expected)


def test_bag_embed_accumulates_bf16_in_float32():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 64).to(torch.bfloat16)
    bags = torch.randint(0, 50, (2, 5, 16))
    out = tst.bag_embed(emb, bags)
    assert out.dtype == torch.bfloat16
    exact = emb.weight.double()[bags].mean(dim=2)
    vectors = emb(bags)
    naive = vectors[..., 0, :]
    for i in range(1, 16):  # a running sum in bf16, as the paper's loop would be without .float()
        naive = naive + vectors[..., i, :]
    naive = naive / 16
    # fp32 accumulation rounds once at the end: within half a bf16 ulp of the exact mean
    assert torch.equal(out, exact.to(torch.bfloat16))
    assert (naive.double() - exact).abs().max() > (out.double() - exact).abs().max()


def test_bag_embed_gradient_counts_repeated_tokens():
    emb = torch.nn.Embedding(10, 4)
    bags = torch.tensor([[[7, 7, 2, 5]]])  # token 7 twice in one bag of 4
    tst.bag_embed(emb, bags).sum().backward()
    grad = emb.weight.grad
    torch.testing.assert_close(grad[7], torch.full((4,), 2 / 4))
    torch.testing.assert_close(grad[2], torch.full((4,), 1 / 4))
    assert grad[[0, 1, 3, 4, 6, 8, 9]].abs().sum() == 0


def test_bag_weights_hand_computed():
    torch.testing.assert_close(tst.bag_weights(4, "uniform"), torch.full((4,), 0.25))
    h = 1 + 1 / 2 + 1 / 3
    torch.testing.assert_close(tst.bag_weights(3, "power"), torch.tensor([1 / h, 0.5 / h, (1 / 3) / h]))
    k = torch.tensor([1.0, 2.0, 3.0]) ** -1.25
    torch.testing.assert_close(tst.bag_weights(3, "power:-1.25"), k / k.sum())
    e = torch.exp(-torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(tst.bag_weights(2, "exp"), e / e.sum())
    torch.testing.assert_close(tst.bag_weights(3, "first"), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(tst.bag_weights(2, [3, 1]), torch.tensor([0.75, 0.25]))


@pytest.mark.parametrize("bad", ["square", [1, 2], [-1, 2, 3], [0, 0, 0]])
def test_bag_weights_rejects_bad_kinds(bad):
    with pytest.raises(ValueError):
        tst.bag_weights(3, bad)


@pytest.mark.parametrize("s", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["uniform", "power", "power:-1.25", "first"])
def test_mce_equals_the_papers_loop_of_cross_entropies(s, kind):
    torch.manual_seed(s)
    T, V = 6, 37
    rows = torch.randint(0, V, (3, s * T + 1))
    _, targets = tst.batch(rows, s, phase=1)
    logits = torch.randn(3, T, V, requires_grad=True)
    weights = tst.bag_weights(s, kind)
    ours = tst.mce_loss(logits, targets, weights)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    ref = paper_mce(logits, targets, weights)
    (grad_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(grad_ours, grad_ref)


def test_mce_with_one_column_is_cross_entropy():
    logits = torch.randn(4, 9, 11)
    labels = torch.randint(0, 11, (4, 9))
    labels[0, :3] = IGNORE_INDEX
    expected = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1))
    torch.testing.assert_close(tst.mce_loss(logits, labels.unsqueeze(-1), tst.bag_weights(1)), expected)


def test_mce_is_cross_entropy_against_the_multi_hot_distribution():
    # MCE = CE against a target putting w_i on bag token i, minus that target's (constant) entropy: here
    # with distinct bag tokens and every column valid, sum_i w_i * (lse - z[y_i]) row by row.
    torch.manual_seed(1)
    logits = torch.randn(5, 20)
    bags = torch.stack([torch.randperm(20)[:4] for _ in range(5)])
    w = tst.bag_weights(4, "power")
    soft = torch.zeros(5, 20).scatter_(1, bags, w.expand(5, 4))
    expected = -(soft * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(tst.mce_loss(logits, bags, w), expected)


def test_mce_drops_a_column_with_no_valid_entry():
    logits = torch.randn(2, 10)
    targets = torch.tensor([[3, IGNORE_INDEX], [4, IGNORE_INDEX]])
    expected = F.cross_entropy(logits, targets[:, 0])
    torch.testing.assert_close(tst.mce_loss(logits, targets, tst.bag_weights(2)), expected)


def test_mode_targets():
    s, T = 3, 4
    rows = torch.arange(s * T + 1).view(1, -1)  # data tokens 0..12
    x, y = tst.batch(rows, s, phase=1, mode="full")
    assert x.tolist() == [[[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]]
    assert y[0, :, 0].tolist() == [3, 6, 9, 12] and y[0, 0].tolist() == [3, 4, 5]
    x, y = tst.batch(rows, s, phase=1, mode="input")
    assert x.shape == (1, T, s) and y.tolist() == [[[3], [6], [9], [12]]]  # the first token of the next bag
    rows = torch.arange(T + 1).view(1, -1)  # output-only reads no extra data: T + 1 tokens
    x, y = tst.batch(rows, s, phase=1, mode="output")
    assert x.tolist() == [[0, 1, 2, 3]]
    I = IGNORE_INDEX
    assert y.tolist() == [[[1, 2, 3], [2, 3, 4], [3, 4, I], [4, I, I]]]
    x, y = tst.batch(rows, s, phase=2)
    assert x.tolist() == [[0, 1, 2, 3]] and y.tolist() == [[[1], [2], [3], [4]]]


def test_phase_logic():
    assert tst.switch_step(0.3, 20_000, 6) == 6_000  # the paper's 270M run: 6k of 20k steps
    assert tst.switch_step(0.25, 10, 4) == 2  # floor
    assert tst.switch_step(0.3, 100, 1) == 0 and tst.switch_step(0.0, 100, 4) == 0  # baseline
    assert [tst.phase(k, 0.3, 10, 4) for k in range(10)] == [1, 1, 1, 2, 2, 2, 2, 2, 2, 2]
    assert tst.data_tokens_per_row(2048, 6, 1) == 6 * 2048
    assert tst.data_tokens_per_row(2048, 6, 1, "input") == 6 * 2048
    assert tst.data_tokens_per_row(2048, 6, 1, "output") == 2048
    assert tst.data_tokens_per_row(2048, 6, 2) == 2048


def test_s_1_is_exactly_next_token_training():
    rows = torch.randint(0, 50, (2, 9))
    x1, y1 = tst.batch(rows, 1, phase=1)
    x2, y2 = tst.batch(rows, 1, phase=2)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    emb = torch.nn.Embedding(50, 8)
    assert torch.equal(tst.bag_embed(emb, x1.unsqueeze(-1)), emb(x1))
    assert math.isclose(tst.bag_weights(1, "power").item(), 1.0)
