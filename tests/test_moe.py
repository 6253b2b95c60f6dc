"""The mixture of experts: routing, the two load-balancing schemes, the two expert paths, counts and FLOPs,
and a tiny MoE run through both TST phases."""

import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tst
from model import NAMED_SHAPES, ModelConfig, Transformer
from moe import GROUPED_MM, MoE

CONFIG = Path(__file__).resolve().parents[1] / "config"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Hundreds of tiny matmuls: one thread is as fast, and immune to OpenMP's barriers on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def moe_config(**kw):
    base = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm=True,
                n_experts=8, top_k=2, expert_ffn_dim=24)
    return ModelConfig(**{**base, **kw})


def tiny_moe(**kw):
    torch.manual_seed(0)
    return Transformer(moe_config(**kw))


def cpu_grouped_mm_runs():
    if GROUPED_MM is None:
        return False
    try:
        GROUPED_MM(torch.randn(8, 8), torch.randn(2, 8, 8), offs=torch.tensor([3, 8], dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError):
        return False


needs_cpu_grouped_mm = pytest.mark.skipif(
    not cpu_grouped_mm_runs(), reason="this torch build has no CPU grouped GEMM: compare the paths on a GPU")


def naive_moe(moe, x):
    """The specification: every expert runs on every position; a position keeps the top_k experts by
    (probability + bias), weighted by their probabilities renormalised to sum 1; all other weights are 0."""
    x = x.reshape(-1, x.size(-1))
    probs = F.softmax(x @ moe.router.weight.t(), dim=-1)
    scores = probs + moe.expert_bias if moe.balance == "bias" else probs
    chosen = scores.topk(moe.top_k, dim=-1).indices
    gates = torch.zeros_like(probs).scatter(1, chosen, probs.gather(1, chosen))
    gates = gates / gates.sum(-1, keepdim=True)
    ex = moe.experts
    out = sum(gates[:, e:e + 1] * ((F.silu(x @ ex.w_gate[e].t()) * (x @ ex.w_up[e].t())) @ ex.w_down[e].t())
              for e in range(moe.n_experts))
    return out if moe.shared is None else out + moe.shared(x)


IMPLS = ["loop", pytest.param("grouped", marks=needs_cpu_grouped_mm)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kw", [{}, {"shared_expert_ffn_dim": 16}, {"balance": "bias"}])
def test_moe_equals_every_expert_on_every_position_masked(impl, kw):
    m = tiny_moe(experts_impl=impl, **kw)
    moe = m.layers[0].mlp
    moe.expert_bias.normal_(0.0, 0.05)  # only used by balance="bias"
    x = torch.randn(3, 10, 32)
    out, _ = moe(x)
    torch.testing.assert_close(out.reshape(30, 32), naive_moe(moe, x))


def test_every_position_reaches_exactly_k_experts_with_weights_summing_to_one():
    moe = tiny_moe(n_experts=16, top_k=4, balance="bias").layers[0].mlp
    moe.expert_bias.normal_(0.0, 0.1)
    x = torch.randn(50, 32)
    probs, chosen, weights = moe.route(x)
    assert chosen.shape == weights.shape == (50, 4)
    assert all(len(set(row.tolist())) == 4 for row in chosen)  # k distinct experts, none dropped
    torch.testing.assert_close(weights.sum(-1), torch.ones(50))
    # the bias chooses the experts, the probabilities alone weight them (Qwen3's renormalised top-k)
    assert torch.equal(chosen.sort(-1).values, (probs + moe.expert_bias).topk(4).indices.sort(-1).values)
    torch.testing.assert_close(weights, probs.gather(1, chosen) / probs.gather(1, chosen).sum(-1, keepdim=True))


@needs_cpu_grouped_mm
def test_grouped_gemm_equals_the_loop_forward_and_backward():
    torch.manual_seed(0)
    moe = tiny_moe(n_experts=16).layers[0].mlp
    x = torch.randn(1, 5, 32)  # 10 (position, slot) pairs for 16 experts: some experts get no position
    results = {}
    for impl in ("loop", "grouped"):
        moe.zero_grad()
        moe.experts.impl = impl
        xi = x.clone().requires_grad_()
        out, aux = moe(xi)
        (out.square().sum() + aux).backward()
        results[impl] = [out, xi.grad] + [p.grad.clone() for p in moe.parameters()]
    for a, b in zip(results["loop"], results["grouped"]):
        torch.testing.assert_close(a, b)
    unused = moe.tokens_per_expert == 0
    assert unused.any() and (moe.experts.w_gate.grad[unused] == 0).all()


def skewed_router(moe):
    """Inputs of diverse positions and a router that sends nearly all of them to experts 0 and 1."""
    torch.manual_seed(0)
    x = torch.randn(1, 256, moe.router.in_features)
    x[..., 0] = 1.0
    with torch.no_grad():
        moe.router.weight.normal_(0.0, 0.2)
        moe.router.weight[:2, 0] += 4.0
    return x


def test_aux_loss_equals_its_formula_by_hand():
    moe = MoE(moe_config(dim=8, n_experts=4, top_k=2))
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4, 8))  # router logits = the first 4 input features
    logits = [[2.0, 1.0, 0.0, 0.0],  # top-2: experts 0 and 1
              [0.0, 2.0, 1.0, 0.0],  # 1 and 2
              [1.0, 0.0, 0.0, 2.0]]  # 3 and 0
    x = torch.zeros(1, 3, 8)
    x[0, :, :4] = torch.tensor(logits)
    _, aux = moe(x)
    f = [2 / 6, 2 / 6, 1 / 6, 1 / 6]  # share of the 6 (position, slot) assignments per expert
    softmax = [[math.exp(z) / sum(math.exp(v) for v in row) for z in row] for row in logits]
    P = [sum(p[i] for p in softmax) / 3 for i in range(4)]  # mean router probability per expert
    assert aux.item() == pytest.approx(4 * sum(f[i] * P[i] for i in range(4)), rel=1e-6)


def test_aux_loss_is_smallest_for_uniform_routing():
    moe = MoE(moe_config(n_experts=8, top_k=2))
    N, E, k = 64, 8, 2
    uniform = torch.full((N, E), 1 / E)
    balanced = torch.full((E,), N * k / E, dtype=torch.long)
    assert moe.aux_loss(uniform, balanced).item() == pytest.approx(1.0)  # the floor: E * sum_i (1/E)(1/E)
    collapsed = torch.zeros(N, E)
    collapsed[:, :k] = 1 / k  # every position sends everything to the same k experts
    counts = torch.zeros(E, dtype=torch.long)
    counts[:k] = N
    assert moe.aux_loss(collapsed, counts).item() == pytest.approx(E / k)  # the ceiling
    # descending the aux loss alone from a skewed router spreads the load and brings the loss to its floor
    x = skewed_router(moe)
    opt = torch.optim.SGD(moe.router.parameters(), lr=1.0)
    losses, imbalance = [], []
    for _ in range(60):
        _, aux = moe(x)
        losses.append(aux.item())
        imbalance.append((moe.tokens_per_expert.max() / moe.tokens_per_expert.float().mean()).item())
        moe.tokens_per_expert.zero_()
        opt.zero_grad()
        aux.backward()
        opt.step()
    assert losses[0] > 3.0 and losses[-1] < 1.05
    assert imbalance[0] > 3.5 and imbalance[-1] < 1.3  # 4 = two of the 8 experts take every assignment


def test_model_aux_loss_is_the_coefficient_times_the_sum_over_layers():
    m = tiny_moe(n_layers=3, aux_loss_coef=0.01)
    per_layer = []
    for layer in m.layers:
        layer.mlp.register_forward_hook(lambda mod, inp, out: per_layer.append(out[1]))
    x = torch.randint(0, 61, (2, 12))
    _, aux = m(x, x)
    assert len(per_layer) == 3 and all(a.item() > 0.99 for a in per_layer)
    torch.testing.assert_close(aux, 0.01 * sum(per_layer))
    for kw in ({"balance": "bias"}, {"balance": "none"}, {"n_experts": 0, "top_k": 0, "expert_ffn_dim": 0}):
        x = torch.randint(0, 61, (2, 12))
        loss, aux = tiny_moe(**kw)(x, x)
        assert aux.shape == () and aux.item() == 0.0 and loss.shape == ()


def test_bias_update_moves_the_load_toward_balance():
    m = tiny_moe(n_layers=1, balance="bias", bias_update_rate=0.005)
    moe = m.layers[0].mlp
    x = skewed_router(moe)
    imbalance = []
    for _ in range(100):
        moe(x)
        load = m.pop_expert_load()
        imbalance.append((load.max() / load.mean()).item())
        m.update_expert_bias(load)
    assert imbalance[0] > 3.5  # 4 = two of the 8 experts take every assignment
    assert sum(imbalance[-20:]) / 20 < 1.6  # the sign rule then cycles within a step or two of balance
    assert set(moe.expert_bias.topk(2, largest=False).indices.tolist()) == {0, 1}  # the favourites pay
    assert abs(moe.expert_bias.sum().item()) < 1e-5  # recentred: the mean bias stays 0


def test_bias_update_is_torchtitans_sign_rule():
    m = tiny_moe(balance="bias", bias_update_rate=0.1, n_experts=4)
    load = torch.tensor([[10.0, 0.0, 5.0, 5.0], [4.0, 4.0, 4.0, 4.0]])
    m.update_expert_bias(load)
    # mean 5: expert 0 over-loaded (-0.1), expert 1 under-loaded (+0.1), 2 and 3 on the mean (0); mean 0
    torch.testing.assert_close(m.layers[0].mlp.expert_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    torch.testing.assert_close(m.layers[1].mlp.expert_bias, torch.zeros(4))  # balanced: unchanged
    with pytest.raises(ValueError, match="rows for 2 MoE layers"):
        m.update_expert_bias(load[:1])


def test_expert_load_counts_training_positions_and_resets():
    m = tiny_moe()
    x = torch.randint(0, 61, (3, 10))
    m(x)
    m(x)
    load = m.pop_expert_load()
    assert load.shape == (2, 8) and load.dtype == torch.float32
    assert torch.equal(load.sum(1), torch.full((2,), 2 * 30 * 2.0))  # 2 calls x 30 positions x top_k 2
    assert m.pop_expert_load().sum() == 0  # reset
    with torch.no_grad():
        m(x)  # evaluation does not count, in train mode or not
    m.eval()
    m(x)
    assert m.pop_expert_load().sum() == 0
    assert tiny_moe(n_experts=0, top_k=0, expert_ffn_dim=0).pop_expert_load().shape == (0, 0)


def test_distributed_paths_run_in_a_one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        m = tiny_moe()
        x = torch.randint(0, 61, (3, 10))
        _, aux = m(x, x)  # all-reduces f in every layer
        dist.destroy_process_group()
        _, aux_local = m(x, x)
        torch.testing.assert_close(aux, aux_local)  # one rank: the global batch is the local one
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=0, world_size=1)
        assert m.pop_expert_load().sum(1).tolist() == [2 * 60.0, 2 * 60.0]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_gradients_reach_router_experts_and_shared_expert():
    for balance in ("aux", "bias"):
        m = tiny_moe(shared_expert_ffn_dim=16, balance=balance)
        x = torch.randint(0, 61, (4, 16))
        loss, aux = m(x, x.roll(1, 1))
        (loss + aux).backward()
        moe = m.layers[0].mlp
        for p in (moe.router.weight, moe.shared.w_gate.weight, m.embed.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0
        used = moe.tokens_per_expert > 0
        for w in (moe.experts.w_gate, moe.experts.w_up, moe.experts.w_down):
            assert (w.grad[used].flatten(1).abs().sum(1) > 0).all()
        assert moe.expert_bias.grad is None  # a buffer, moved only by update_expert_bias


@pytest.mark.parametrize("balance", ["aux", "bias"])
def test_tiny_moe_tst_run_goes_through_both_phases(balance):
    m = tiny_moe(balance=balance, bias_update_rate=0.01)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    max_steps, s, r, B, T = 10, 4, 0.4, 4, 16
    schedule = tst.Schedule({**tst.DEFAULTS, "s": s, "r": r, "bag_weights": "power", "max_steps": max_steps})
    stream = torch.arange(10_000) % 61  # a repeating text, so that the loss has something to learn
    pos, phases, losses = 0, [], []
    for step in range(max_steps):
        stage = schedule.stage(step)
        n = stage.data_tokens_per_row(T)
        rows = torch.stack([stream[pos + b * n: pos + b * n + n + 1] for b in range(B)])
        pos += B * n
        loss, aux = m(*stage.batch(rows[:, :-1], rows[:, 1:]))
        loss = loss + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        load = m.pop_expert_load()
        assert torch.equal(load.sum(1), torch.full((2,), B * T * 2.0))  # latent positions route like any other
        if balance == "bias":
            m.update_expert_bias(load)
        phases.append(stage.s)
        losses.append(loss.item())
    assert phases == [s] * 4 + [1] * 6  # floor(0.4 * 10) superposition steps
    assert all(math.isfinite(v) for v in losses)
    assert losses[3] < losses[0]  # phase 1 learns
    if balance == "bias":
        assert m.layers[0].mlp.expert_bias.abs().sum() > 0


def test_state_dict_keys_and_shapes():
    m = tiny_moe(shared_expert_ffn_dim=16)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items() if k.startswith("layers.0.mlp.")}
    assert shapes == {
        "layers.0.mlp.router.weight": (8, 32),
        "layers.0.mlp.experts.w_gate": (8, 24, 32),
        "layers.0.mlp.experts.w_up": (8, 24, 32),
        "layers.0.mlp.experts.w_down": (8, 32, 24),
        "layers.0.mlp.expert_bias": (8,),
        "layers.0.mlp.shared.w_gate.weight": (16, 32),
        "layers.0.mlp.shared.w_up.weight": (16, 32),
        "layers.0.mlp.shared.w_down.weight": (32, 16),
    }
    assert "layers.0.attn.q_norm.weight" in m.state_dict()


@pytest.mark.parametrize("kw", [{}, {"shared_expert_ffn_dim": 16}, {"tie_embeddings": True}])
def test_counted_total_and_active_params_equal_the_module(kw):
    m = tiny_moe(**kw)
    cfg = m.cfg
    total = sum(p.numel() for p in m.parameters())
    assert cfg.num_params() == total
    experts = sum(layer.mlp.experts.w_gate.numel() * 3 for layer in m.layers)
    assert cfg.num_params(active=True) == total - experts * (cfg.n_experts - cfg.top_k) // cfg.n_experts
    emb = m.embed.weight.numel() * (1 if cfg.tie_embeddings else 2)
    assert cfg.num_params(embedding=False, active=True) == cfg.num_params(active=True) - emb


def test_init_covers_the_experts_and_a_meta_built_model():
    torch.manual_seed(0)
    cfg = moe_config(dim=256, n_layers=8, n_experts=4, expert_ffn_dim=512, shared_expert_ffn_dim=512)
    m = Transformer(cfg)
    moe = m.layers[0].mlp
    assert abs(moe.router.weight.std().item() - 0.02) < 0.002
    assert abs(moe.experts.w_gate.std().item() - 0.02) < 0.001
    assert abs(moe.experts.w_down.std().item() - 0.02 / 4) < 0.0005  # 0.02 / sqrt(2 * 8)
    assert abs(moe.shared.w_down.weight.std().item() - 0.02 / 4) < 0.0005
    with torch.device("meta"):
        meta = Transformer(cfg)
    meta.to_empty(device="cpu")
    meta.layers[0].mlp.expert_bias.fill_(float("nan"))
    meta.init_weights()
    assert all(torch.isfinite(t).all() for t in meta.state_dict().values())
    assert meta.layers[0].mlp.expert_bias.abs().sum() == 0


def test_flops_count_active_parameters():
    m = tiny_moe(experts_impl="loop", n_experts=16, expert_ffn_dim=64)
    B, T = 2, 16
    rows = torch.randint(0, 61, (B, T + 1))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        loss, aux = m(rows[:, :-1], rows[:, 1:])
        (loss + aux).backward()
    predicted = m.cfg.flops_per_position(T) * B * T
    # counted beyond the formula: the k-way weighted sum of expert outputs (a small bmm); the norms are not
    assert abs(counter.get_total_flops() - predicted) / predicted < 0.02
    dense_equivalent = 6 * (m.cfg.num_params() - 61 * 32) * B * T
    assert counter.get_total_flops() < dense_equivalent / 2  # all 16 experts would cost far more


def test_rejects_bad_moe_settings():
    with pytest.raises(ValueError, match="top_k=9 must be between 1 and n_experts=8"):
        moe_config(top_k=9)
    with pytest.raises(ValueError, match="expert_ffn_dim"):
        moe_config(expert_ffn_dim=0)
    with pytest.raises(ValueError, match="unknown balance"):
        moe_config(balance="sinkhorn")
    with pytest.raises(ValueError, match="unknown experts_impl"):
        moe_config(experts_impl="triton")
    with pytest.raises(ValueError, match="but n_experts=0"):
        ModelConfig(top_k=2)
    if GROUPED_MM is not None:
        with pytest.raises(ValueError, match="multiples of 8"):
            moe_config(expert_ffn_dim=20, experts_impl="grouped")


# -----------------------------------------------------------------------------
# The 10B-A1B shape and the configs

def test_10b_a1b_counts():
    cfg = NAMED_SHAPES["10b-a1b"]
    V, d, L, E, k, f, hd = 128_256, 1024, 48, 128, 8, 512, 128
    attention = d * 8 * hd + 2 * (d * 2 * hd) + 8 * hd * d + 2 * hd  # q, k and v (2 KV heads), o, QK-norm
    router, expert, norms = E * d, 3 * d * f, 2 * d
    assert cfg.num_params() == L * (attention + router + E * expert + norms) + d + 2 * V * d == 10_058_576_896
    assert cfg.num_params(active=True) == L * (attention + router + k * expert + norms) + d + 2 * V * d == 998_880_256
    with torch.device("meta"):  # the real module, without allocating 40 GB
        m = Transformer(cfg)
    assert sum(p.numel() for p in m.parameters()) == 10_058_576_896
    assert cfg.flops_per_position(4096) == 6 * (998_880_256 - V * d) + 12 * L * 8 * hd * 4096


def read_config(name):
    path = CONFIG / name
    scope = {"__file__": str(path)}
    exec(path.read_text(), scope)
    return {k: v for k, v in scope.items()  # as train.py reads it: names that are settings, not imports
            if not k.startswith("_") and not callable(v) and type(v).__name__ != "module"}


TRAIN_KEYS = {"out_dir", "data_dir", "vocab_size", "seq_len", "batch_size", "global_batch_tokens", "max_steps", "lr",
              "warmup_steps", "decay_frac", "weight_decay", "s", "r", "tst_mode", "bag_weights", "eval_interval",
              "eval_tokens", "fsdp", "compile", "data_source", "tokenizer"}
MODEL_KEYS = {f.name for f in fields(ModelConfig)}


def model_config(conf):
    return ModelConfig(**{k: v for k, v in conf.items() if k in MODEL_KEYS})


def test_10b_a1b_configs_are_the_papers_runs():
    base, run = read_config("10b_a1b_baseline.py"), read_config("10b_a1b_tst.py")
    for conf in (base, run):
        assert set(conf) <= TRAIN_KEYS | MODEL_KEYS
        assert model_config(conf) == NAMED_SHAPES["10b-a1b"]
        assert conf["global_batch_tokens"] == 8 * 2**20 and conf["lr"] == 3e-4 and conf["fsdp"] and conf["compile"]
    assert base["max_steps"] == 125_000 and "s" not in base  # the default: no superposition
    assert (run["max_steps"], run["s"], run["r"], run["bag_weights"]) == (50_000, 16, 0.25, "power")
    # the paper's data budgets: 1.05T tokens for the baseline, about 2T for TST
    assert base["max_steps"] * base["global_batch_tokens"] == pytest.approx(1.05e12, rel=0.01)
    n1 = tst.step_at(run["r"], run["max_steps"])
    data = (n1 * run["s"] + run["max_steps"] - n1) * run["global_batch_tokens"]
    assert data == pytest.approx(2.0e12, rel=0.01)


def test_tiny_moe_config_builds_a_cpu_moe():
    conf = read_config("tiny_moe_tst.py")
    assert set(conf) <= TRAIN_KEYS | MODEL_KEYS
    cfg = model_config({**conf, "vocab_size": conf["vocab_size"] or 256})
    assert cfg.n_experts > 0 and conf["s"] > 1 and not conf["fsdp"]
    m = Transformer(cfg)
    rows = torch.randint(0, 256, (2, conf["s"] * conf["seq_len"] + 1))
    x, targets, loss_fn = tst.Stage(0, 1, conf["s"], weights=(0.25,) * 4).batch(rows[:, :-1], rows[:, 1:])
    loss, aux = m(x, targets, loss_fn)
    assert m(x).shape == (2, conf["seq_len"], cfg.vocab_size) and aux.item() > 0 and loss.item() > 0
