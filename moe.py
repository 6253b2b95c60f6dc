"""The Qwen3-MoE-style mixture of experts that model.py's blocks use instead of the dense MLP when n_experts > 0.

A linear router and a softmax give each position a distribution over the experts; the top_k are kept and renormalised
to sum to 1; the position's output is the weighted sum of those experts' SwiGLU outputs (plus an optional shared
expert). Dropless: every position reaches exactly top_k experts, however unbalanced the routing. Load balancing is
Qwen3's auxiliary loss (balance="aux") or torchtitan's auxiliary-loss-free expert bias (balance="bias"; the bias is
updated once per optimizer step by model.Transformer.update_expert_bias). Phase 1 of TST routes latent (bag)
positions like any other position.

This file does not import model.py: ModelConfig checks its fields against the constants below, and model.Block passes
in the MLP class the shared expert is built from.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

BALANCE = ("aux", "bias", "none")
EXPERTS_IMPL = ("auto", "loop", "grouped")
# torch's grouped GEMM: public in recent releases, private (CUDA sm90 only) before. The CPU build of torch 2.13
# has a kernel too (any float dtype, rows 16-byte aligned); CUDA needs bfloat16 (sm80+ in recent releases).
GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class Experts(nn.Module):
    """n_experts SwiGLU MLPs stored as three stacked weights, so that a grouped GEMM can run them in one call.

    w_gate, w_up (E, hidden, dim) and w_down (E, dim, hidden): row e is expert e's nn.Linear weight, which
    makes an export to Hugging Face's per-expert gate_proj / up_proj / down_proj a slicing.
    Input: x (M, dim) sorted by expert, counts (E,) rows per expert (their sum is M). Output (M, dim).
    """

    def __init__(self, cfg):
        super().__init__()
        E, d, h = cfg.n_experts, cfg.dim, cfg.expert_ffn_dim
        self.w_gate = nn.Parameter(torch.empty(E, h, d))
        self.w_up = nn.Parameter(torch.empty(E, h, d))
        self.w_down = nn.Parameter(torch.empty(E, d, h))
        for w in (self.w_gate, self.w_up, self.w_down):  # Transformer.init_weights scales w_down by depth
            nn.init.normal_(w, 0.0, cfg.init_std)
        self.impl = cfg.experts_impl
        self.aligned = cfg.grouped_mm_aligned

    def forward(self, x, counts):
        auto = x.is_cuda and GROUPED_MM is not None and self.aligned
        grouped = self.impl == "grouped" or (self.impl == "auto" and auto)
        return self.grouped(x, counts) if grouped else self.loop(x, counts)

    def loop(self, x, counts):
        """The reference: one expert after another, each on its own rows (a host sync for the split sizes)."""
        out = []
        # unbind, not w[e]: the backward of one unbind stacks the experts' gradients once, where E separate
        # index operations would each write a zero-filled gradient of the whole (E, ...) weight
        experts = zip(self.w_gate.unbind(0), self.w_up.unbind(0), self.w_down.unbind(0))
        for rows, (w_gate, w_up, w_down) in zip(x.split(counts.tolist()), experts):
            out.append((F.silu(rows @ w_gate.t()) * (rows @ w_up.t())) @ w_down.t())
        return torch.cat(out)

    def grouped(self, x, counts):
        """The same three products for all experts at once: group e is rows offs[e-1]:offs[e]. No host sync."""
        offs = counts.cumsum(0).to(torch.int32)
        w_gate, w_up, w_down, h = self.w_gate, self.w_up, self.w_down, x
        if x.is_cuda or torch.compiler.is_compiling():  # CUDA's kernel (and compile's shape rule) take bfloat16 only
            w_gate, w_up, w_down, h = w_gate.bfloat16(), w_up.bfloat16(), w_down.bfloat16(), h.bfloat16()
        h = F.silu(GROUPED_MM(h, w_gate.transpose(1, 2), offs=offs)) * GROUPED_MM(h, w_up.transpose(1, 2), offs=offs)
        return GROUPED_MM(h, w_down.transpose(1, 2), offs=offs).type_as(x)


class MoE(nn.Module):
    """Qwen3-MoE feed-forward: router, softmax, top-k renormalised, SwiGLU experts, optional shared expert.

    forward(x (B, T, dim)) -> (out (B, T, dim), aux) with aux the unscaled load-balancing loss of this layer
    (balance="aux") or None. In a training step (train mode, gradients on) the layer also counts the positions
    routed to each expert into `tokens_per_expert` (read and reset by Transformer.pop_expert_load).
    """

    def __init__(self, cfg, mlp=None):
        """mlp: the class of the shared expert, model.MLP (passed in: this file does not import model.py); needed
        only when cfg.shared_expert_ffn_dim > 0."""
        super().__init__()
        if cfg.shared_expert_ffn_dim and mlp is None:
            raise ValueError(f"shared_expert_ffn_dim={cfg.shared_expert_ffn_dim} needs mlp, the shared expert's class")
        self.n_experts, self.top_k, self.balance = cfg.n_experts, cfg.top_k, cfg.balance
        self.bias_update_rate = cfg.bias_update_rate
        self.router = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.experts = Experts(cfg)
        self.shared = mlp(cfg.dim, cfg.shared_expert_ffn_dim) if cfg.shared_expert_ffn_dim else None
        # Added to the routing probabilities to choose the experts (balance="bias"), never to weight them. Kept in
        # the state dict (a resumed run routes as before) and in float32: updates of 1e-3 vanish in bfloat16.
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts))
        # an integer count stays exact and survives model.to(bfloat16)
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_experts, dtype=torch.long), persistent=False)

    def route(self, x):
        """x (N, dim) -> probs (N, E) float32, chosen experts (N, k), their gates (N, k) float32: the chosen
        experts' probabilities renormalised to sum 1."""
        probs = self.router(x).float().softmax(dim=-1)
        scores = probs + self.expert_bias if self.balance == "bias" else probs
        chosen = scores.topk(self.top_k, dim=-1).indices
        gates = probs.gather(1, chosen)
        return probs, chosen, gates / gates.sum(dim=-1, keepdim=True)

    def forward(self, x):
        B, T, d = x.shape
        x = x.reshape(B * T, d)
        probs, chosen, gates = self.route(x)
        slots = chosen.flatten()  # (N*k,): position n's j-th expert at n*k + j
        counts = torch.zeros_like(self.tokens_per_expert).scatter_add_(0, slots, torch.ones_like(slots))
        if self.training and torch.is_grad_enabled():  # training steps only: not evaluation, even in train mode
            with torch.no_grad():
                self.tokens_per_expert += counts
        # Dispatch: the N*k (position, slot) pairs sorted by expert, each carrying its position's input row.
        order = slots.argsort(stable=True)
        y = self.experts(x[order // self.top_k], counts)
        # Combine: back to (position, slot) order, then each position's k outputs weighted and summed.
        y = y[order.argsort()].view(B * T, self.top_k, d)
        out = torch.bmm(gates.to(y.dtype).unsqueeze(1), y).squeeze(1)
        if self.shared is not None:
            out = out + self.shared(x)
        aux = self.aux_loss(probs, counts) if self.balance == "aux" else None
        return out.view(B, T, d), aux

    def aux_loss(self, probs, counts):
        """Qwen3's load-balancing loss E * sum_i f_i * P_i, at least 1 when every f_i = P_i, 1 when uniform.

        f_i: fraction of the (position, slot) assignments that went to expert i, a constant (no gradient);
        P_i: mean router probability of expert i over this micro-batch's positions (the gradient flows here).
        Global batch (Qiu et al. 2025): in a training step under torch.distributed, f counts the assignments of the
        current micro-batch on every data-parallel rank (one all-reduce of E integers); P stays local, and since
        the loss is linear in P, the gradient averaged by DDP / FSDP is that of the global-batch loss. The
        scope is one micro-step: f does not accumulate across gradient-accumulation micro-batches.
        """
        counts = counts.detach()
        if self.training and torch.is_grad_enabled() and dist.is_available() and dist.is_initialized():
            counts = counts.clone()
            dist.all_reduce(counts)
        f = counts.float() / counts.sum()
        return self.n_experts * (f * probs.mean(dim=0)).sum()

