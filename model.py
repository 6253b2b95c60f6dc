"""A Llama-3-style dense transformer (and, with n_experts > 0, a Qwen3-style mixture of experts).

Pre-norm RMSNorm, rotary position embeddings (rotate-half convention, as Hugging Face's Llama, so an
export is a renaming), grouped-query attention through scaled_dot_product_attention, SwiGLU feed-forward,
no biases, untied input embedding and LM head by default, optional QK-norm (Qwen3). The TST lines are marked:
a (B, T, s) input of bags becomes one vector per bag (`tst.BagCombiner`: the mean of its token embeddings). With
targets, the forward pass returns the loss without ever holding the (positions x vocabulary) logits: `chunked_loss`
runs the LM head and the loss function (next-token cross-entropy, or the stage's from tst.py) a chunk at a time.

Initialisation (GPT-2 / nanoGPT): every weight matrix and the embedding ~ N(0, 0.02); the projections that
write into the residual stream (attention output, MLP down, every expert's down) ~ N(0, 0.02 / sqrt(2 *
n_layers)) so the residual's variance does not grow with depth; RMSNorm weights 1.

Mixture of experts (n_experts > 0): every block's MLP becomes a `moe.MoE`, described in moe.py.
"""

import functools
import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import tst  # TST
from moe import BALANCE, EXPERTS_IMPL, GROUPED_MM, MoE

LLAMA3_VOCAB = 128_256
HEAD_CHUNK_LOGITS = 2**26  # chunked_loss makes at most this many logits at a time (256 MiB in float32)


@dataclass
class ModelConfig:
    vocab_size: int = 257  # rows of the embedding and the LM head
    dim: int = 128  # width of the residual stream
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # query heads (head_dim = dim / n_heads)
    n_kv_heads: int = 4  # = n_heads: full multi-head attention; fewer: grouped-query attention
    ffn_dim: int = 512  # hidden width of the SwiGLU feed-forward
    rope_theta: float = 500_000.0  # RoPE base (Llama 3's)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    max_seq_len: int = 2048  # the longest row the model accepts
    tie_embeddings: bool = False  # share the input embedding with the LM head
    qk_norm: bool = False  # RMSNorm on each query and key head before RoPE (Qwen3)
    init_std: float = 0.02  # N(0, init_std) for matrices; residual projections get init_std / sqrt(2 n_layers)
    # mixture of experts (0 experts: the dense model above, and every field below is unused)
    n_experts: int = 0  # experts per MoE layer; 0 = dense
    top_k: int = 0  # experts per position
    expert_ffn_dim: int = 0  # hidden width of each expert's SwiGLU (ffn_dim is unused when n_experts > 0)
    shared_expert_ffn_dim: int = 0  # 0: no shared expert; else a dense SwiGLU every position also runs
    balance: str = "aux"  # "aux": Qwen3's load-balancing loss; "bias": aux-loss-free expert bias; "none"
    aux_loss_coef: float = 0.001  # weight of each layer's load-balancing loss (balance="aux")
    bias_update_rate: float = 1e-3  # step of the expert bias per optimizer step (balance="bias")
    experts_impl: str = "auto"  # "loop" (the reference), "grouped" (torch's grouped GEMM), "auto": grouped on CUDA

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if isinstance(getattr(self, name), bool) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be an integer >= 1")
        for name in ("norm_eps", "init_std", "rope_theta"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a number > 0")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim={self.dim} must be a multiple of n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2 != 0:
            raise ValueError(f"head_dim={self.dim // self.n_heads} must be even for RoPE")
        if self.n_experts < 0:
            raise ValueError(f"n_experts={self.n_experts} must be >= 0 (0 = dense)")
        if self.n_experts == 0:
            moe_only = {k: getattr(self, k) for k in ("top_k", "expert_ffn_dim", "shared_expert_ffn_dim")}
            if any(moe_only.values()):
                raise ValueError(f"{moe_only} are set but n_experts=0 (dense): set n_experts or leave them 0")
            return
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}")
        if self.expert_ffn_dim <= 0:
            raise ValueError(f"expert_ffn_dim={self.expert_ffn_dim} must be > 0 for a mixture of experts")
        if self.shared_expert_ffn_dim < 0:
            raise ValueError(f"shared_expert_ffn_dim={self.shared_expert_ffn_dim} must be >= 0 (0 = none)")
        if self.balance not in BALANCE:
            raise ValueError(f"unknown balance {self.balance!r}: use one of {BALANCE}")
        if self.aux_loss_coef < 0 or self.bias_update_rate < 0:
            raise ValueError(f"aux_loss_coef={self.aux_loss_coef} and bias_update_rate={self.bias_update_rate} "
                             f"must be >= 0")
        if self.experts_impl not in EXPERTS_IMPL:
            raise ValueError(f"unknown experts_impl {self.experts_impl!r}: use one of {EXPERTS_IMPL}")
        if self.experts_impl == "grouped":
            if GROUPED_MM is None:
                raise ValueError(f"experts_impl='grouped' needs torch.nn.functional.grouped_mm or torch._grouped_mm, "
                                 f"which torch {torch.__version__} lacks: use 'loop'")
            if not self.grouped_mm_aligned:
                raise ValueError(f"experts_impl='grouped' needs dim={self.dim} and expert_ffn_dim="
                                 f"{self.expert_ffn_dim} to be multiples of 8 (16-byte rows): use 'loop'")

    @property
    def grouped_mm_aligned(self):
        return self.dim % 8 == 0 and self.expert_ffn_dim % 8 == 0

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    def to_dict(self):
        return asdict(self)

    def num_params(self, embedding=True, active=False):
        """Parameters of the model this config builds (a tied LM head counted once).

        embedding=False leaves out the input embedding and the LM head (the 'non-embedding' count).
        active=True counts what one position uses: of each MoE layer's experts only top_k (the router, the
        shared expert, attention, norms, embedding and head in full). The same as the total for a dense model.
        The expert bias is a buffer, not a parameter.
        """
        d, hd = self.dim, self.head_dim
        attention = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads) + (2 * hd if self.qk_norm else 0)
        if self.n_experts:
            experts = self.top_k if active else self.n_experts
            ffn = self.n_experts * d + experts * 3 * d * self.expert_ffn_dim + 3 * d * self.shared_expert_ffn_dim
        else:
            ffn = 3 * d * self.ffn_dim
        layer = attention + ffn + 2 * d  # + the two RMSNorms
        body = self.n_layers * layer + d  # + the final norm
        if not embedding:
            return body
        return body + self.vocab_size * d * (1 if self.tie_embeddings else 2)

    def flops_per_position(self, seq_len):
        """Training FLOPs (forward + backward) per position, counted as nanoGPT and torchtitan count them.

        6 * N for the matrix multiplies, with N = every ACTIVE parameter except the input embedding (a lookup,
        not a matmul; a tied LM head still counts), plus 12 * n_layers * n_heads * head_dim * seq_len for
        attention scores and values over the full T x T square (causal masking is not discounted).
        For a mixture of experts N counts the router, top_k experts and the shared expert: MFU is measured
        against the compute a position really costs. The gather, the weighted combine of the top_k outputs
        and the softmax are not counted (O(top_k * dim) per position, like the norms).
        The same in both TST phases: the bag mean is s lookups, not a matmul.
        """
        matmul_params = self.num_params(active=True) - (0 if self.tie_embeddings else self.vocab_size * self.dim)
        return 6 * matmul_params + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len


    def activation_bytes(self, positions, dtype_bytes=2):
        """An estimate of the bytes autograd keeps for the backward pass of one micro-batch of `positions` positions,
        counted from what this code saves, eager: per position and layer the two RMSNorms' float32 input and output,
        the matmul inputs (in the compute dtype of dtype_bytes; with bf16 autocast each linear keeps its own cast of
        its input), attention's q, k, v, output and logsumexp, and the SwiGLU's three hidden activations and their
        product (for a mixture of experts: the router's probabilities and each of the top_k experts' copies); plus the
        final norm and the gradient of the hidden states that chunked_loss keeps. torch.compile saves less (it
        recomputes cheap ops): read this as an upper estimate."""
        d, c, kv = self.dim, dtype_bytes, self.n_kv_heads * self.head_dim
        casts = c < 4  # autocast: every linear keeps a cast copy of its input; float32 shares the tensor
        norm = 2 * 4 * d
        # wq, wk, wv inputs; rotated q, k and v; attention's output and logsumexp; wo's input (a reshaped copy)
        attention = norm + 3 * d * c * casts + (d + 2 * kv) * c + d * c + 4 * self.n_heads + d * c
        if self.n_experts:  # router input and probabilities; per chosen expert: gate and up inputs, hidden, output
            hidden = self.top_k * (2 * d * c * casts + 4 * self.expert_ffn_dim * c + d * c)
            mlp = norm + d * c * casts + 2 * 4 * self.n_experts + hidden
            if self.shared_expert_ffn_dim:
                mlp += 2 * d * c * casts + 4 * self.shared_expert_ffn_dim * c
        else:  # gate and up inputs; gate, silu(gate), up and their product
            mlp = norm + 2 * d * c * casts + 4 * self.ffn_dim * c
        head = norm + 4 * d  # the final norm; chunked_loss's gradient of the hidden states (float32)
        return positions * (self.n_layers * (attention + mlp) + head)


# The paper's shapes (docs/METHOD.md): SmolLM2 / SmolLM3 shapes run through Llama-3 code with the Llama-3
# tokenizer, untied. With full multi-head attention the two small ones count 267M and 600M, which is what
# the paper's names say; SmolLM2's own grouped KV heads (3 and 5) would give 254M and 561M. The 3B keeps
# SmolLM3's 4 KV heads and counts 3.34B ("3B" is a label).
# The paper names its MoE only "Qwen3-style 10B-A1B". Ours keeps Qwen3-30B-A3B's depth (48), head size (128),
# QK-norm, 128 experts with top-8 and no shared expert, at width 1024 with 2 KV heads and experts of 512: with
# the Llama-3 vocabulary (untied) it counts 10,058,576,896 parameters, 998,880,256 active per position.
NAMED_SHAPES = {
    "270m": ModelConfig(vocab_size=LLAMA3_VOCAB, dim=576, n_layers=30, n_heads=9, n_kv_heads=9, ffn_dim=1536),
    "600m": ModelConfig(vocab_size=LLAMA3_VOCAB, dim=960, n_layers=32, n_heads=15, n_kv_heads=15, ffn_dim=2560),
    "3b": ModelConfig(vocab_size=LLAMA3_VOCAB, dim=2048, n_layers=36, n_heads=16, n_kv_heads=4, ffn_dim=11008),
    "10b-a1b": ModelConfig(vocab_size=LLAMA3_VOCAB, dim=1024, n_layers=48, n_heads=8, n_kv_heads=2, qk_norm=True,
                           n_experts=128, top_k=8, expert_ffn_dim=512, max_seq_len=4096),
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32, scale after casting back (as Llama and Hugging Face do)
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).type_as(x)


def rope_tables(seq_len, head_dim, theta, device):
    """cos and sin of the rotary angles, (seq_len, head_dim), float32."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x (B, T, heads, head_dim): rotate pairs (i, i + head_dim/2) by the position's angle."""
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (x.float() * cos + rotated.float() * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        # grouped-query attention: each KV head serves n_heads / n_kv_heads query heads
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))



class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MoE(cfg, MLP) if cfg.n_experts else MLP(cfg.dim, cfg.ffn_dim)

    def forward(self, x, cos, sin):
        """-> (x, aux): aux is the MoE layer's load-balancing loss, None for a dense block or without it."""
        x = x + self.attn(self.attn_norm(x), cos, sin)
        if isinstance(self.mlp, MoE):
            y, aux = self.mlp(self.mlp_norm(x))
            return x + y, aux
        return x + self.mlp(self.mlp_norm(x)), None


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.bag_combiner = tst.BagCombiner(cfg.dim)  # TST: registered last, so its parameters (if any) init last
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """All parameters and buffers, so that a model built on the meta device can be materialised by it."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            elif name.endswith(("attn.wo.weight", "w_down.weight", "experts.w_down")):
                p.normal_(0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:  # embedding, attention, MLP, router, experts' gate and up, LM head
                p.normal_(0.0, std)
        for moe in self.moe_layers():
            moe.expert_bias.zero_()
            moe.tokens_per_expert.zero_()
        getattr(self.bag_combiner, "reset_parameters", lambda: None)()  # TST: a combiner with its own init

    def moe_layers(self):
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)]

    def forward(self, tokens, targets=None, loss_fn=None):
        """tokens: (B, T) ids, or (B, T, s) bags of s tokens (TST's superposition stages).

        Without targets -> logits (B, T, vocab_size). With targets (B, T), or (B, T, k) for a loss that scores k
        targets per position -> (loss, aux_loss). loss is loss_fn(logits, targets) computed by chunked_loss (default:
        next-token cross-entropy, the mean over every target). aux_loss is aux_loss_coef * the SUM over MoE layers of
        each layer's load-balancing loss (Megatron's convention: the coefficient is per layer, so each router is
        pushed as hard at any depth; its floor is aux_loss_coef * n_layers), a zero for a dense model or balance !=
        "aux". Train on their sum.
        """
        if tokens.size(1) > self.cfg.max_seq_len:
            raise ValueError(f"{tokens.size(1)} positions exceed max_seq_len={self.cfg.max_seq_len}")
        h = self.embed(tokens.clamp(min=0))  # (B, T, dim), or (B, T, s, dim) for bags (an id < 0: a bag's padding)
        h = self.bag_combiner(h, tokens >= 0) if tokens.dim() == 3 else h  # TST: one vector per bag of tokens
        cos, sin = rope_tables(h.size(1), self.cfg.head_dim, self.cfg.rope_theta, h.device)
        aux_losses = []
        for layer in self.layers:
            h, aux = layer(h, cos, sin)
            if aux is not None:
                aux_losses.append(aux)
        h = self.norm(h)
        if targets is None:
            return self.lm_head(h)
        targets = targets.flatten(0, 1)
        loss_fn = loss_fn or functools.partial(next_token_loss, count=targets.size(0))
        loss = chunked_loss(h.flatten(0, 1), self.lm_head.weight, targets, loss_fn)
        if not aux_losses:
            return loss, torch.zeros((), device=loss.device)
        return loss, self.cfg.aux_loss_coef * torch.stack(aux_losses).sum()

    @torch.no_grad()
    def generate(self, ids, max_new_tokens, temperature=1.0, top_k=0, generator=None, stop=None):
        """Continue the token ids `ids` (a list) by up to max_new_tokens tokens -> the new ids (a list). temperature
        0 is greedy; top_k > 0 samples among the k most likely; generation ends after the token `stop`. The window
        (the last max_seq_len tokens) is recomputed at every token: no KV cache, this is for samples, not serving."""
        device = self.lm_head.weight.device
        x = torch.tensor([ids], dtype=torch.long, device=device)
        new = []
        for _ in range(max_new_tokens):
            logits = self(x[:, -self.cfg.max_seq_len:])[0, -1].float()
            if temperature == 0:
                token = logits.argmax().view(1)
            else:
                logits = logits / temperature
                if top_k:
                    logits[logits < torch.topk(logits, min(top_k, logits.numel())).values[-1]] = -float("inf")
                token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            new.append(token.item())
            if new[-1] == stop:
                break
            x = torch.cat([x, token.view(1, 1)], dim=1)
        return new

    def num_params(self, embedding=True, active=False):
        """ModelConfig.num_params, and the parameters of any other module the model owns."""
        extra = 0
        extra += sum(p.numel() for p in self.bag_combiner.parameters())  # TST: a learned combiner's
        return self.cfg.num_params(embedding, active) + extra

    def flops_per_position(self, seq_len):
        """ModelConfig.flops_per_position, and 6 FLOPs per parameter of any other module a position goes through."""
        return self.cfg.flops_per_position(seq_len) + 6 * (self.num_params() - self.cfg.num_params())

    @torch.no_grad()
    def balance_experts(self):
        """Once per optimizer step of a mixture of experts: the expert loads since the last call (pop_expert_load),
        the expert bias updated from them (balance="bias"), and the busiest and idlest expert's share of a layer's
        load relative to an even split -> {"expert_load_max", "expert_load_min"}."""
        load = self.pop_expert_load()
        if self.cfg.balance == "bias":
            self.update_expert_bias(load)
        share = load / load.sum(-1, keepdim=True) * self.cfg.n_experts
        return {"expert_load_max": share.max().item(), "expert_load_min": share.min().item()}

    @torch.no_grad()
    def pop_expert_load(self):
        """Positions routed to each expert since the last call, (n_moe_layers, n_experts) float32, summed over
        data-parallel ranks (an all-reduce: every rank must call it), then reset. (0, 0) for a dense model.

        Each position counts once per slot: a layer's row sums to top_k * positions (exact below 2**24).
        """
        moes = self.moe_layers()
        if not moes:
            return torch.zeros(0, 0, device=self.lm_head.weight.device)
        load = torch.stack([moe.tokens_per_expert for moe in moes])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        for moe in moes:
            moe.tokens_per_expert.zero_()
        return load.float()

    @torch.no_grad()
    def update_expert_bias(self, load):
        """torchtitan's auxiliary-loss-free balancing (Wang et al. 2024), once per optimizer step: each layer's
        under-loaded experts gain bias_update_rate, over-loaded ones lose it (bias += rate * sign(mean - load)),
        recentred to mean 0 (top-k is unchanged by a common shift). `load` from pop_expert_load is identical on
        every rank, so the biases stay identical without a broadcast.
        """
        moes = self.moe_layers()
        if len(load) != len(moes):
            raise ValueError(f"load has {len(load)} rows for {len(moes)} MoE layers")
        for moe, layer_load in zip(moes, load):
            delta = moe.bias_update_rate * torch.sign(layer_load.mean() - layer_load)
            moe.expert_bias += (delta - delta.mean()).to(moe.expert_bias)


# -----------------------------------------------------------------------------
# The loss, without the logits: at a 128k vocabulary the (positions x vocabulary) logits of one micro-batch take
# gigabytes, and the plain path (head, float32 copy, log-softmax, their gradients) holds several copies of them.

def next_token_loss(logits, targets, count):
    """Next-token cross-entropy of a chunk of positions, summed and divided by the micro-batch's count of targets."""
    return F.cross_entropy(logits, targets, reduction="sum") / count


def chunked_loss(h, weight, targets, loss_fn):
    """loss_fn(h @ weight.T, targets) with hidden states h (N, dim), the LM head weight (V, dim), targets (N, ...),
    computed HEAD_CHUNK_LOGITS logits at a time: loss_fn(logits (n, V) float32, targets (n, ...)) returns the share of
    a chunk of n positions, and the shares add up (a sum over positions over a count over all N, as next_token_loss
    and the losses of tst.py are written).

    When gradients are needed, each chunk's loss is differentiated under autograd as soon as it is computed and the
    gradients of h and of the head are accumulated, so no chunk's logits outlive it (torchtitan's chunked loss does
    the same; a full-logits path at a 128k vocabulary holds several copies of all of them). Matmuls run in the
    autocast dtype when autocast is on; the loss sees float32 logits.
    """
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _ChunkedLoss.apply(h, weight, targets, loss_fn, dtype)
    head = weight.to(dtype)
    with torch.autocast(device, enabled=False):
        return sum(loss_fn(_logits(h[rows].to(dtype), head), targets[rows]) for rows in _chunks(h, weight))


def _chunks(h, weight):
    n = max(1, HEAD_CHUNK_LOGITS // weight.size(0))
    return [slice(a, a + n) for a in range(0, h.size(0), n)]


def _logits(h, head):
    """Logits in float32 at least (bf16 matmuls give bf16)."""
    z = h @ head.t()
    return z.to(torch.promote_types(z.dtype, torch.float32))


class _ChunkedLoss(torch.autograd.Function):
    """chunked_loss with its gradients computed chunk by chunk in the forward pass; the backward only scales them."""

    @staticmethod
    def forward(ctx, h, weight, targets, loss_fn, dtype):
        head = weight.detach().to(dtype).requires_grad_()
        grad_h = torch.empty_like(h)
        grad_weight = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                                  device=weight.device)
        loss = 0
        with torch.enable_grad(), torch.autocast(h.device.type, enabled=False):
            for rows in _chunks(h, weight):
                h_chunk = h[rows].detach().to(dtype).requires_grad_()
                chunk_loss = loss_fn(_logits(h_chunk, head), targets[rows])
                g_h, g_weight = torch.autograd.grad(chunk_loss, (h_chunk, head))
                grad_h[rows] = g_h
                grad_weight += g_weight
                loss = loss + chunk_loss.detach()
        ctx.save_for_backward(grad_h, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_weight = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), (grad_weight * grad_loss).to(ctx.weight_dtype), None, None, None
