"""The method, stated as properties of tst.py (docs/METHOD.md, phase 1 steps 1-6)."""

import functools
import math
import re

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


def combine(vectors):
    return tst.BagCombiner(vectors.size(-1))(vectors, torch.ones(vectors.shape[:-1], dtype=torch.bool))


def test_the_bag_combiner_is_the_mean_of_the_bag():
    emb = torch.nn.Embedding(10, 3)
    bags = torch.tensor([[[1, 2], [3, 3]]])
    expected = torch.stack([(emb.weight[1] + emb.weight[2]) / 2, emb.weight[3]])
    torch.testing.assert_close(combine(emb(bags))[0], expected)
    assert list(tst.BagCombiner(3).parameters()) == []  # the paper's combiner learns nothing


def test_the_bag_mean_accumulates_bf16_in_float32():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 64).to(torch.bfloat16)
    bags = torch.randint(0, 50, (2, 5, 16))
    out = combine(emb(bags))
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


def test_the_bag_mean_gradient_counts_repeated_tokens():
    emb = torch.nn.Embedding(10, 4)
    bags = torch.tensor([[[7, 7, 2, 5]]])  # token 7 twice in one bag of 4
    combine(emb(bags)).sum().backward()
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


@pytest.mark.parametrize("bad,message", [("square", "use uniform, power"), ([1, 2], "needs s=3 numbers"),
                                         ([-1, 2, 3], "non-negative"), ([0, 0, 0], "not all 0"),
                                         ("power:abc", "power:K needs a number K")])
def test_bag_weights_rejects_bad_kinds_by_name(bad, message):
    with pytest.raises(ValueError, match=message):
        tst.bag_weights(3, bad)


@pytest.mark.parametrize("s", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["uniform", "power", "power:-1.25", "first"])
def test_mce_equals_the_papers_loop_of_cross_entropies(s, kind):
    torch.manual_seed(s)
    T, V = 6, 37
    rows = torch.randint(0, V, (3, s * T + 1))
    _, targets, _ = stage(s).batch(rows[:, :-1], rows[:, 1:])
    targets = targets.view(3, T, -1)  # next-token targets (s = 1) have no bag axis
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


def stage(s, mode="full", kind="uniform", loss="mce"):
    weights = (1.0,) if mode == "input" else tuple(tst.bag_weights(s, kind).tolist())
    return tst.Stage(0, 10, s, mode, weights, loss)


def test_mode_targets():
    s, T = 3, 4
    rows = torch.arange(s * T + 1).view(1, -1)  # data tokens 0..12
    x, y, loss_fn = stage(s).batch(rows[:, :-1], rows[:, 1:])
    assert x.tolist() == [[[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]]
    assert y[0, :, 0].tolist() == [3, 6, 9, 12] and y[0, 0].tolist() == [3, 4, 5]
    assert loss_fn.func is tst.mce_loss
    torch.testing.assert_close(loss_fn.keywords["weights"], torch.full((3,), 1 / 3))
    assert loss_fn.keywords["column_counts"].tolist() == [4, 3, 3]  # the last bag has one target
    x, y, loss_fn = stage(s, "input").batch(rows[:, :-1], rows[:, 1:])
    assert x.shape == (1, T, s) and y.tolist() == [[[3], [6], [9], [12]]]  # the first token of the next bag
    assert loss_fn.keywords["weights"].tolist() == [1.0]
    rows = torch.arange(T + 1).view(1, -1)  # output-only reads no extra data: T + 1 tokens
    x, y, _ = stage(s, "output").batch(rows[:, :-1], rows[:, 1:])
    assert x.tolist() == [[0, 1, 2, 3]]
    I = IGNORE_INDEX
    assert y.tolist() == [[[1, 2, 3], [2, 3, 4], [3, 4, I], [4, I, I]]]
    x, y, loss_fn = stage(1).batch(rows[:, :-1], rows[:, 1:])
    assert x.tolist() == [[0, 1, 2, 3]] and y.tolist() == [[1, 2, 3, 4]] and loss_fn is None
    tokens = torch.arange(s * T + 1).view(1, -1)
    _, _, loss_fn = stage(s, loss="sum_to_one").batch(tokens[:, :-1], tokens[:, 1:])
    assert loss_fn.func is tst.sum_to_one_loss and loss_fn.keywords["scored_positions"].item() == 4


def test_the_stage_calls_mce_loss_by_name_so_that_a_fork_that_edits_it_trains_the_edit(monkeypatch):
    rows = torch.randint(0, 20, (2, 3 * 4 + 1))
    _, targets, stock = stage(3).batch(rows[:, :-1], rows[:, 1:])
    logits = torch.randn(2 * 4, 20)
    real = tst.mce_loss
    monkeypatch.setattr(tst, "mce_loss", lambda *a, **k: 2 * real(*a, **k))
    _, _, edited = stage(3).batch(rows[:, :-1], rows[:, 1:])
    assert edited(logits, targets.flatten(0, 1)) == 2 * stock(logits, targets.flatten(0, 1))


def test_data_tokens_per_row_by_mode():
    assert stage(6).data_tokens_per_row(2048) == 6 * 2048
    assert stage(6, "input").data_tokens_per_row(2048) == 6 * 2048
    assert stage(6, "output").data_tokens_per_row(2048) == 2048
    assert stage(1).data_tokens_per_row(2048) == 2048


def settings(**kw):
    return {**tst.DEFAULTS, **kw}


def test_the_papers_single_switch():
    schedule = tst.Schedule(settings(s=6, r=0.3, max_steps=20_000))
    assert schedule.boundaries == [6_000]  # the paper's 270M run: 6k of 20k
    assert [schedule.stage(k).s for k in (0, 5_999, 6_000, 19_999)] == [6, 6, 1, 1]
    assert tst.Schedule(settings(s=4, r=0.25, max_steps=10)).boundaries == [2]  # floor
    for baseline in (settings(), settings(s=1, r=0.3), settings(s=4, r=0.0)):
        schedule = tst.Schedule({**baseline, "max_steps": 100})
        assert schedule.boundaries == [] and schedule.stage(0).s == 1


def test_switch_step_is_exact_where_floating_point_is_not():
    assert math.floor(0.29 * 100) == 28  # the float product undershoots
    assert tst.step_at(0.29, 100) == 29
    for n in (100, 977, 20_000, 50_000):
        for k in range(1, 100):
            r = k / 100
            assert tst.step_at(r, n) == (k * n) // 100, (r, n)


def test_a_schedule_of_several_stages():
    schedule = tst.Schedule(settings(s_schedule=[(0.15, 8), (0.3, 4)], bag_weights="power", max_steps=100))
    assert [(st.start, st.end, st.s) for st in schedule.stages] == [(0, 15, 8), (15, 30, 4), (30, 100, 1)]
    assert schedule.boundaries == [15, 30]
    assert schedule.stage(14).data_tokens_per_row(16) == 128 and schedule.stage(15).data_tokens_per_row(16) == 64
    assert schedule.window_factor == 8  # windows of 8T: rows of 8T, 4T and T tokens all divide them
    assert tst.Schedule(settings(s_schedule=[(0.1, 3), (0.2, 2)], max_steps=100)).window_factor == 6
    torch.testing.assert_close(torch.tensor(schedule.stage(20).weights), tst.bag_weights(4, "power"))


@pytest.mark.parametrize("kw,message", [
    (dict(s_schedule=[(0.3, 4)], s=4, r=0.3), "set either s and r, or s_schedule"),
    (dict(s_schedule=[(0.3, 4), (0.2, 2)]), "fractions increasing"),
    (dict(s_schedule=[(0.3, 1)]), "s >= 2"),
    (dict(s_schedule=[(1.0, 4)]), "0 < end_fraction < 1"),
    (dict(s_schedule=[(0.001, 4)]), "at least one step"),
    (dict(s_schedule=[4]), "each stage is a pair"),
    (dict(r=1.0, s=4), "r=1.0"),
    (dict(s=0), "s=0"),
    (dict(tst_mode="both"), "tst_mode='both'"),
    (dict(s=3, r=0.3, bag_weights=[1, 2]), "needs s=3 numbers"),
    (dict(s=4, r=0.3, bag_weights=["a", "b", "c", "d"]), "bag_weights=\\['a', 'b', 'c', 'd'\\]: an explicit list"),
    (dict(s_schedule=[("a", 4)]), "s_schedule=\\[\\('a', 4\\)\\]: each stage is a pair"),
    (dict(s_schedule=[(0.3, True)]), "each stage is a pair"),
    (dict(s=4, r=0.3, bag_loss="bce"), "bag_loss='bce': use one of mce, sum_to_one"),
    (dict(s=4, r=0.3, bag_loss="sum_to_one", bag_weights="power"), "the sum-to-one loss has no weights"),
])
def test_impossible_schedules_are_refused_by_name(kw, message):
    with pytest.raises(ValueError, match=message if "\\" in message else re.escape(message)):
        tst.check(settings(**kw, max_steps=100))


def test_s_1_is_exactly_next_token_training():
    rows = torch.randint(0, 50, (2, 9))
    x1, y1, loss_fn = stage(1).batch(rows[:, :-1], rows[:, 1:])
    assert torch.equal(x1, rows[:, :-1]) and torch.equal(y1, rows[:, 1:]) and loss_fn is None
    emb = torch.nn.Embedding(50, 8)
    assert torch.equal(combine(emb(x1.unsqueeze(-1))), emb(x1))
    assert math.isclose(tst.bag_weights(1, "power").item(), 1.0)


def test_the_console_names_the_stage_of_a_tst_run_only():
    assert tst.Schedule(settings(max_steps=10)).label(3) == ""  # a baseline has one phase: nothing to say
    schedule = tst.Schedule(settings(s=4, r=0.5, max_steps=10))
    assert schedule.label(4) == "phase 1: s=4, MCE" and schedule.label(5) == "phase 2"
    assert tst.Schedule(settings(s=2, r=0.5, bag_loss="sum_to_one", max_steps=10)).label(0) == "phase 1: s=2, sum-to-one"


# -----------------------------------------------------------------------------
# The losses add up over chunks of positions, as model.chunked_loss calls them

@pytest.mark.parametrize("loss", ["mce", "sum_to_one"])
def test_the_shares_of_chunks_add_up_to_the_loss(loss):
    torch.manual_seed(0)
    logits, targets = torch.randn(30, 17, dtype=torch.float64), torch.randint(0, 17, (30, 4))
    targets[torch.rand(30, 4) < 0.3] = IGNORE_INDEX
    targets[:5] = IGNORE_INDEX
    valid = targets != IGNORE_INDEX
    if loss == "mce":
        whole = tst.mce_loss(logits, targets, tst.bag_weights(4, "power").double())
        share = functools.partial(tst.mce_loss, weights=tst.bag_weights(4, "power").double(),
                                  column_counts=valid.sum(0))
    else:
        whole = tst.sum_to_one_loss(logits, targets)
        share = functools.partial(tst.sum_to_one_loss, scored_positions=valid.any(1).sum())
    parts = [share(logits[a:a + 7], targets[a:a + 7]) for a in range(0, 30, 7)]
    torch.testing.assert_close(sum(parts), whole)


# -----------------------------------------------------------------------------
# The sum-to-one loss: -log of the probability of the bag as a whole

def slow_sum_to_one(logits, targets):
    """Position by position: -log of the summed softmax probabilities of the bag's distinct valid tokens; positions
    without one left out of the mean."""
    losses = []
    for z, bag in zip(logits.reshape(-1, logits.size(-1)), targets.reshape(-1, targets.size(-1))):
        tokens = sorted({int(t) for t in bag if t != IGNORE_INDEX})
        if tokens:
            losses.append(-torch.log(sum(z.softmax(-1)[t] for t in tokens)))
    return torch.stack(losses).mean()


def test_sum_to_one_equals_its_slow_statement_in_value_and_gradient():
    torch.manual_seed(3)
    logits = torch.randn(2, 9, 23, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 6, (2, 9, 4))  # a small alphabet: bags with repeated tokens
    targets[torch.rand(2, 9, 4) < 0.25] = IGNORE_INDEX
    targets[0, 0] = IGNORE_INDEX  # a position with no target
    ours, ref = tst.sum_to_one_loss(logits, targets), slow_sum_to_one(logits, targets)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(ref, logits)[0])


def test_sum_to_one_counts_a_repeated_token_once():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    # the bag "0 0 1": P(0) + P(1) = 0.8, not 2 * P(0) + P(1) = 1.3 (which would make the loss negative)
    torch.testing.assert_close(tst.sum_to_one_loss(logits, torch.tensor([[0, 0, 1]])), -torch.log(torch.tensor(0.8)))
    # all the mass on the bag: 0; one token: the cross-entropy
    assert tst.sum_to_one_loss(logits, torch.tensor([[0, 1, 2]])).abs() < 1e-6
    torch.testing.assert_close(tst.sum_to_one_loss(logits, torch.tensor([[2, IGNORE_INDEX, 2]])),
                               F.cross_entropy(logits, torch.tensor([2])))


def test_sum_to_one_is_never_negative_and_at_most_the_mce():
    torch.manual_seed(4)
    logits, targets = torch.randn(50, 11), torch.randint(0, 11, (50, 4))  # every target valid
    ours = tst.sum_to_one_loss(logits, targets)
    assert ours >= 0
    # -log sum P <= min_i -log P(y_i) <= the mean of the -log P(y_i): below MCE position by position
    assert ours <= tst.mce_loss(logits, targets, tst.bag_weights(4))


# -----------------------------------------------------------------------------
# Document-aware bags (doc_bags): no bag holds tokens of two documents

EOT = 0


def test_after_an_end_of_text_the_rest_of_the_bag_is_padding_and_no_bag_mixes_documents():
    bags = torch.tensor([[[5, 0, 7, 8], [0, 9, 0, 3], [4, 5, 6, 0]]])
    padded = tst.pad_after_end_of_text(bags, EOT)
    P = tst.IGNORE_INDEX
    assert padded.tolist() == [[[5, 0, P, P], [0, P, P, P], [4, 5, 6, 0]]]
    torch.manual_seed(0)
    rows = torch.randint(0, 6, (8, 4 * 16 + 1))  # an end of text in one token of six
    x, _, _ = tst.Stage(0, 1, 4, eot=EOT).batch(rows[:, :-1], rows[:, 1:])
    for bag in x.flatten(0, 1).tolist():
        tokens = [t for t in bag if t >= 0]
        assert tokens and EOT not in tokens[:-1]  # one document each: an end of text only as its last token
        assert bag[:len(tokens)] == tokens  # padding only at the end
    # the bags are the row's, cut at the ends of text: every token kept is where it was
    assert torch.equal(x[x >= 0], tst.fold(rows[:, :-1], 4)[x >= 0])


def test_padding_changes_neither_the_bag_mean_nor_the_loss():
    torch.manual_seed(1)
    emb = torch.nn.Embedding(10, 6)
    bags = torch.tensor([[[5, 0, 7, 8], [3, 4, 0, 9]]])
    padded = tst.pad_after_end_of_text(bags, EOT)
    mean = tst.BagCombiner(6)(emb(padded.clamp(min=0)), padded >= 0)
    torch.testing.assert_close(mean[0, 0], emb.weight[[5, 0]].mean(0))  # the mean of the tokens before the padding
    torch.testing.assert_close(mean[0, 1], emb.weight[[3, 4, 0]].mean(0))

    # the loss: a padded target is not scored, as if the bag had only its real tokens
    rows = torch.tensor([[1, 2, 3, 4, 5, 0, 7, 8, 9, 2, 3, 4, 6]])  # bags (1 2 3 4) (5 0 7 8) (9 2 3 4), then 6
    x, targets, loss_fn = tst.Stage(0, 1, 4, weights=(0.25,) * 4, eot=EOT).batch(rows[:, :-1], rows[:, 1:])
    P = tst.IGNORE_INDEX
    assert targets.tolist() == [[[5, 0, P, P], [9, 2, 3, 4], [6, P, P, P]]]
    logits = torch.randn(3, 10)
    plain = tst.Stage(0, 1, 4, weights=(0.25,) * 4)
    _, plain_targets, plain_loss = plain.batch(rows[:, :-1], rows[:, 1:])
    by_hand = sum(F.cross_entropy(logits[j:j + 1], torch.tensor([t]), reduction="sum") / n
                  for j, bag in enumerate(targets[0].tolist()) for t, n in zip(bag, [3, 2, 1, 1]) if t != P) / 4
    # columns 0..3 of the targets hold 3, 2, 1 and 1 scored targets; MCE is the weighted mean of their means
    torch.testing.assert_close(loss_fn(logits, targets.flatten(0, 1)), by_hand)
    assert not torch.equal(loss_fn(logits, targets.flatten(0, 1)), plain_loss(logits, plain_targets.flatten(0, 1)))
    assert tst.Stage.padding(x) == 2  # read from the corpus, not trained on


def test_doc_bags_takes_the_end_of_text_id_from_the_data():
    schedule = tst.Schedule(settings(s=4, r=0.5, max_steps=10, doc_bags=True), {"eot": 256})
    assert schedule.stage(0).eot == 256 and schedule.stage(9).eot is None
    assert tst.Schedule(settings(s=4, r=0.5, max_steps=10), {"eot": 256}).stage(0).eot is None
    with pytest.raises(ValueError, match="doc_bags=True with tst_mode='output'"):
        tst.check(settings(s=4, r=0.5, max_steps=10, doc_bags=True, tst_mode="output"))
