"""The dense transformer: shapes, counts, causality in both phases, FLOPs, and the loss without logits."""

import functools
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import model
import tst
from model import NAMED_SHAPES, ModelConfig, Transformer, apply_rope, chunked_loss, rope_tables


def tiny(**kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, **kw))


@pytest.mark.parametrize("name,label", [("270m", 270e6), ("600m", 600e6)])
def test_named_shapes_land_on_the_papers_sizes(name, label):
    assert abs(NAMED_SHAPES[name].num_params() - label) / label < 0.03


def test_named_shape_counts_derived_by_hand():
    V = 128_256
    # 270M: SmolLM2-135M shape (d 576, 30 layers, 9 heads, FFN 1536), full multi-head attention, untied
    layer = 4 * 576 * 576 + 3 * 576 * 1536 + 2 * 576
    assert NAMED_SHAPES["270m"].num_params() == 30 * layer + 576 + 2 * V * 576 == 267_225_408
    # the 3B label: SmolLM3-3B shape with 4 KV heads of 128 counts 3.34B
    layer = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 11008 + 2 * 2048
    assert NAMED_SHAPES["3b"].num_params() == 36 * layer + 2048 + 2 * V * 2048 == 3_337_766_912
    assert NAMED_SHAPES["600m"].num_params() == 600_208_320


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": True}, {"qk_norm": True}])
def test_counted_params_equal_the_module(kw):
    m = tiny(**kw)
    assert m.cfg.num_params() == sum(p.numel() for p in m.parameters())
    emb = m.embed.weight.numel() * (1 if m.cfg.tie_embeddings else 2)
    assert m.cfg.num_params(embedding=False) == m.cfg.num_params() - emb


def test_tied_head_shares_the_embedding():
    m = tiny(tie_embeddings=True)
    assert m.lm_head.weight is m.embed.weight


def test_gqa_equals_attention_with_repeated_kv_heads():
    torch.manual_seed(0)
    gqa = tiny()
    cfg = gqa.cfg
    mha = Transformer(ModelConfig(**{**cfg.to_dict(), "n_kv_heads": cfg.n_heads}))
    state = gqa.state_dict()
    hd, rep = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    for key in list(state):
        if key.endswith(("attn.wk.weight", "attn.wv.weight")):  # (kv*hd, d) -> each KV head repeated for its group
            state[key] = state[key].view(cfg.n_kv_heads, hd, -1).repeat_interleave(rep, 0).reshape(-1, cfg.dim)
    mha.load_state_dict(state)
    x = torch.randint(0, 61, (2, 10))
    torch.testing.assert_close(gqa(x), mha(x))


def test_rope_rotates_by_position_and_keeps_dot_products_relative():
    torch.manual_seed(0)
    cos, sin = rope_tables(8, 16, 10_000.0, "cpu")
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    def at(x, pos):  # x placed at position pos
        return apply_rope(x.expand(1, 8, 1, 16), cos, sin)[0, pos, 0]
    assert torch.allclose(at(q, 0), q[0, 0, 0])  # position 0: no rotation
    torch.testing.assert_close(at(q, 5).norm(), q.norm())
    torch.testing.assert_close(at(q, 5) @ at(k, 3), at(q, 4) @ at(k, 2))  # depends on 5-3 = 4-2 only


@pytest.mark.parametrize("bags", [False, True])
def test_causal_changing_a_later_input_never_changes_earlier_logits(bags):
    m = tiny()
    T, s = 8, 3
    x = torch.randint(0, 61, (2, T, s)) if bags else torch.randint(0, 61, (2, T))
    y = x.clone()
    y[:, 5] = (y[:, 5] + 1) % 61  # position 5 (a whole bag in phase 1)
    a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_a_bag_input_is_order_free_within_the_bag():
    m = tiny()
    x = torch.randint(0, 61, (1, 6, 4))
    torch.testing.assert_close(m(x), m(x.flip(-1)))  # no position inside a bag (docs/METHOD.md, step 3)


def test_one_module_serves_both_phases():
    m = tiny()
    keys = list(m.state_dict())
    rows = torch.randint(0, 61, (2, 4 * 8 + 1))
    for stage, row in ((tst.Stage(0, 1, 4), rows), (tst.Stage(1, 2, 1), rows[:, : 8 + 1])):
        x, _, _ = stage.batch(row[:, :-1], row[:, 1:])
        assert m(x).shape == (2, 8, 61)
        assert list(m.state_dict()) == keys


def test_init_scales_the_residual_projections():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=100, dim=256, n_layers=8, n_heads=4, n_kv_heads=4, ffn_dim=512))
    assert abs(m.layers[0].attn.wq.weight.std().item() - 0.02) < 0.001
    assert abs(m.layers[0].mlp.w_down.weight.std().item() - 0.02 / 4) < 0.0005  # 0.02 / sqrt(2 * 8)
    assert torch.equal(m.layers[3].attn_norm.weight, torch.ones(256))


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of n_heads"):
        ModelConfig(dim=100, n_heads=3)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        ModelConfig(dim=128, n_heads=4, n_kv_heads=3)


def count_train_flops(model, x, targets, loss_fn):
    # the math attention backend runs as plain matmuls, which the counter sees (CPU flash kernels it does not)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        loss, _ = model(x, targets, loss_fn)
        loss.backward()
    return counter.get_total_flops()


def test_flops_per_step_are_equal_in_both_phases_and_match_the_formula():
    m = tiny()
    B, T, s = 2, 16, 4
    rows = torch.randint(0, 61, (B, s * T + 1))
    phase1 = count_train_flops(m, *tst.Stage(0, 1, s, weights=(0.25,) * 4).batch(rows[:, :-1], rows[:, 1:]))
    phase2 = count_train_flops(m, *tst.Stage(1, 2, 1).batch(rows[:, :T], rows[:, 1:T + 1]))
    assert phase1 == phase2
    predicted = m.cfg.flops_per_position(T) * B * T
    # the formula also counts the RMSNorm weights as parameters: a rounding error at real sizes
    assert abs(phase2 - predicted) / predicted < 0.01
    assert phase2 < predicted  # and nothing else is counted


# -----------------------------------------------------------------------------
# chunked_loss: the LM head and any loss of tst.py a chunk of positions at a time, against full logits

def bag_loss(kind, weights, targets):
    """The stage's loss function for these targets (N, k), as tst.Stage.batch makes it."""
    valid = targets != tst.IGNORE_INDEX
    if kind == "sum_to_one":
        return functools.partial(tst.sum_to_one_loss, scored_positions=valid.any(1).sum())
    return functools.partial(tst.mce_loss, weights=weights, column_counts=valid.sum(0))


def random_targets(n, k, vocab, ignore_fraction, seed):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, (n, k), generator=g)
    targets[torch.rand(n, k, generator=g) < ignore_fraction] = tst.IGNORE_INDEX
    return targets


@pytest.mark.parametrize("s", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("kind", ["uniform", "power", "power:-1.25", "first", "sum_to_one"])
def test_chunked_loss_equals_the_loss_of_the_whole_logits_in_value_and_gradients(s, kind, monkeypatch):
    monkeypatch.setattr(model, "HEAD_CHUNK_LOGITS", 13 * 50)  # chunks of 13 positions: uneven, several
    torch.manual_seed(s)
    n, d, vocab = 70, 24, 50
    h = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, d, dtype=torch.float64, requires_grad=True)
    targets = random_targets(n, s, vocab, 0.3, s)
    if s > 1:
        targets[:, -1] = tst.IGNORE_INDEX  # a column with no target at all drops out
    targets[:3] = tst.IGNORE_INDEX  # positions with no target
    w = tst.bag_weights(s, "uniform" if kind == "sum_to_one" else kind).double()
    whole = bag_loss(kind, w, targets)(h @ weight.t(), targets)  # the plain statement, on all the logits at once
    whole_grads = torch.autograd.grad(whole, (h, weight))
    ours = chunked_loss(h, weight, targets, bag_loss(kind, w, targets))
    grads = torch.autograd.grad(3.0 * ours, (h, weight))  # the backward scales by the incoming gradient
    torch.testing.assert_close(ours, whole)
    for g, r in zip(grads, whole_grads):
        torch.testing.assert_close(g, 3.0 * r)


def test_the_default_loss_is_next_token_cross_entropy():
    m = tiny()
    x, y = torch.randint(0, 61, (2, 8)), torch.randint(0, 61, (2, 8))
    loss, _ = m(x, y)
    torch.testing.assert_close(loss, F.cross_entropy(m(x).flatten(0, 1), y.flatten()))


def test_mce_counts_a_token_twice_in_a_bag_twice():
    h, weight = torch.randn(1, 8, requires_grad=True), torch.randn(5, 8)
    targets = torch.tensor([[3, 3]])
    twice = chunked_loss(h, weight, targets, bag_loss("mce", torch.ones(2), targets))
    once = F.cross_entropy(h @ weight.t(), torch.tensor([3]))
    torch.testing.assert_close(twice, once)  # the mean of two equal cross-entropies
    (g,) = torch.autograd.grad(twice, h)
    (g_ref,) = torch.autograd.grad(once, h)
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("s,loss", [(4, "mce"), (4, "sum_to_one"), (1, "next-token")])
def test_the_model_loss_equals_the_plain_path_in_every_stage(s, loss, monkeypatch):
    monkeypatch.setattr(model, "HEAD_CHUNK_LOGITS", 7 * 61)
    m = tiny()
    rows = torch.randint(0, 61, (3, s * 8 + 1))
    kind = "power" if loss == "mce" else "uniform"
    stage = tst.Stage(0, 1, s, weights=tuple(tst.bag_weights(s, kind).tolist()), loss=loss)
    x, targets, loss_fn = stage.batch(rows[:, :-1], rows[:, 1:])
    ours, aux = m(x, targets, loss_fn)
    grads = torch.autograd.grad(ours, list(m.parameters()))
    logits = m(x).float().flatten(0, 1)
    plain = loss_fn(logits, targets.flatten(0, 1)) if loss_fn else F.cross_entropy(logits, targets.flatten())
    plain_grads = torch.autograd.grad(plain, list(m.parameters()))
    torch.testing.assert_close(ours, plain)
    assert aux.item() == 0.0
    for g, r in zip(grads, plain_grads):
        torch.testing.assert_close(g, r)


def test_chunked_loss_under_bf16_autocast_matches_the_bf16_plain_path():
    torch.manual_seed(0)
    h = torch.randn(64, 32, requires_grad=True)
    weight = torch.randn(100, 32, requires_grad=True)
    targets = random_targets(64, 4, 100, 0.1, 1)
    w = tst.bag_weights(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = chunked_loss(h, weight, targets, bag_loss("mce", w, targets))
        ref = tst.mce_loss(F.linear(h, weight).float(), targets, w)  # bf16 logits, then float32
    grads = torch.autograd.grad(ours, (h, weight))
    ref_grads = torch.autograd.grad(ref, (h, weight))
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-3)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, atol=2e-3, rtol=2e-2)


def test_a_tied_head_gets_the_gradient_of_both_uses():
    m = tiny(tie_embeddings=True)
    x, y = torch.randint(0, 61, (2, 8)), torch.randint(0, 61, (2, 8))
    loss, _ = m(x, y)
    (g,) = torch.autograd.grad(loss, m.embed.weight)
    plain = F.cross_entropy(m(x).flatten(0, 1), y.flatten())
    (g_ref,) = torch.autograd.grad(plain, m.embed.weight)
    torch.testing.assert_close(g, g_ref)


def test_chunked_loss_needs_no_gradient_for_evaluation():
    m = tiny()
    x, y = torch.randint(0, 61, (2, 8)), torch.randint(0, 61, (2, 8))
    with torch.no_grad():
        loss, _ = m(x, y)
        assert not loss.requires_grad
        torch.testing.assert_close(loss, F.cross_entropy(m(x).flatten(0, 1), y.flatten()))


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile's CPU backend needs a C compiler")
def test_compiled_blocks_match_eager_and_the_loss_stays_eager(monkeypatch):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(model, "HEAD_CHUNK_LOGITS", 7 * 61)
    m = tiny()
    rows = torch.randint(0, 61, (2, 4 * 8 + 1))
    x, targets, loss_fn = tst.Stage(0, 1, 4, weights=(0.25,) * 4).batch(rows[:, :-1], rows[:, 1:])
    eager_loss, _ = m(x, targets, loss_fn)
    eager_grads = torch.autograd.grad(eager_loss, list(m.parameters()))
    for block in m.layers:  # what train.py does with compile=True
        block.compile()
    loss, _ = m(x, targets, loss_fn)
    grads = torch.autograd.grad(loss, list(m.parameters()))
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


# -----------------------------------------------------------------------------
# The memory estimate of train.py --plan

def saved_bytes(m, x, autocast):
    """Bytes of the tensors autograd keeps for the backward of the body (each storage once, parameters aside)."""
    storages, params = {}, {p.untyped_storage().data_ptr() for p in m.parameters()}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    cos, sin = rope_tables(x.size(1), m.cfg.head_dim, m.cfg.rope_theta, "cpu")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        h = m.embed(x)
        for layer in m.layers:
            h, _ = layer(h, cos, sin)
        m.norm(h)  # the body up to the head: chunked_loss keeps no logits, only the gradient of h (4 bytes each)
    return sum(n for ptr, n in storages.items() if ptr not in params)


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("kw", [{}, dict(n_experts=4, top_k=2, expert_ffn_dim=48, shared_expert_ffn_dim=32)],
                         ids=["dense", "moe"])
def test_the_activation_estimate_counts_what_autograd_keeps(kw, autocast):
    """train.py --plan's activation estimate against what autograd really saves, eager on CPU: the growth from 4 to
    8 rows (so that what does not grow with the batch, the bf16 copies of the weights, drops out), within 15%."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=97, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=160,
                                max_seq_len=32, **kw))
    grown = saved_bytes(m, torch.randint(0, 97, (8, 32)), autocast) - saved_bytes(m, torch.randint(0, 97, (4, 32)),
                                                                                   autocast)
    estimate = m.cfg.activation_bytes(4 * 32, dtype_bytes=2 if autocast else 4) - 4 * 32 * 4 * m.cfg.dim
    assert abs(estimate - grown) / grown < 0.15, (estimate, grown)


def test_parameter_and_flop_counts_include_a_learned_bag_combiner(monkeypatch):
    import tst

    class Scored(torch.nn.Module):  # a combiner with dim + 1 parameters
        def __init__(self, dim):
            super().__init__()
            self.score = torch.nn.Linear(dim, 1)

        def forward(self, vectors, tokens):
            return vectors.mean(dim=2)
    cfg = ModelConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=32, max_seq_len=8)
    assert Transformer(cfg).num_params() == cfg.num_params() == sum(p.numel() for p in Transformer(cfg).parameters())
    monkeypatch.setattr(tst, "BagCombiner", Scored)
    m = Transformer(cfg)
    assert m.num_params() == cfg.num_params() + 17 == sum(p.numel() for p in m.parameters())
    assert m.flops_per_position(8) == cfg.flops_per_position(8) + 6 * 17
