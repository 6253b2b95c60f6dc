"""Token Superposition Training (Peng, Gigant, Quesnelle, Nous Research 2026): the whole method.

Training runs N optimizer steps in two phases (METHOD.md in this project's shared notes has every detail):

Phase 1, superposition, steps [0, floor(r*N)). Each row holds s*T+1 consecutive data tokens. The input
row[:, :s*T] is folded into T bags of s tokens (`fold`); the model embeds a bag as the mean of its s
token embeddings (`bag_embed`), so the transformer still sees T positions and a step costs the same FLOPs
as a baseline step while it reads s times as much text. Latent position j predicts the whole next bag
(`bag_targets`) with a multi-hot cross-entropy (`mce_loss`, weighted by `bag_weights`).

Phase 2, recovery, the remaining steps: ordinary next-token training on rows of T+1 tokens. Same model,
same weights (embedding and LM head included), same optimizer state, one learning-rate schedule.

The paper's ablations are modes of phase 1: "full" (the above), "input" (bags in, the single next token
out) and "output" (tokens in, each position predicts the next s tokens with MCE; no extra data per step).

Everything TST-specific lives in this file. model.py calls `bag_embed` and train.py calls the phase
helpers at the bottom; a fork that removes TST deletes those calls and this file.
"""

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets with this value contribute nothing (as in F.cross_entropy)
MODES = ("full", "input", "output")


# -----------------------------------------------------------------------------
# Bags in

def fold(tokens, s):
    """(B, s*T) token ids -> (B, T, s): latent position j holds the bag of tokens j*s .. j*s+s-1."""
    B, L = tokens.shape
    if L % s != 0:
        raise ValueError(f"cannot fold a row of {L} tokens into bags of s={s}: {L} is not a multiple of {s}")
    return tokens.reshape(B, L // s, s)


def bag_embed(embedding, bags):
    """Mean of the s token embeddings of each bag: (B, T, s) ids -> (B, T, dim).

    Summed in float32 (bf16 loses the small differences between bags) and cast back to the embedding's
    dtype. One lookup over all s*T ids keeps the embedding backward to a single scatter. Nothing else is
    added here: the paper found that positional information inside a bag hurts.
    """
    vectors = embedding(bags)  # (B, T, s, dim)
    return (vectors.sum(dim=2, dtype=torch.float32) / bags.size(-1)).to(vectors.dtype)


# -----------------------------------------------------------------------------
# Bags out

def bag_targets(labels, s):
    """Ordinary next-token labels (B, s*T) -> next-bag targets (B, T, s).

    labels[:, k] is the token after input token k. Shifting left by s-1 makes latent position j (inputs
    j*s .. j*s+s-1) target tokens (j+1)*s .. (j+1)*s+s-1: the next bag, so the objective stays causal.
    Only the first target of the last bag exists in the row; its other s-1 are IGNORE_INDEX.
    With s = 1 this is the identity (with a trailing axis of 1).
    """
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, : labels.size(1) - (s - 1)] = labels[:, s - 1:]
    return fold(shifted, s)


def next_tokens(labels, s):
    """Output-only mode: (B, T) next-token labels -> (B, T, s), position j targets tokens j+1 .. j+s.

    Targets that run past the end of the row are IGNORE_INDEX, so no extra data is read.
    """
    B, T = labels.shape
    targets = torch.full((B, T, s), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    for i in range(s):
        targets[:, : T - i, i] = labels[:, i:]
    return targets


def bag_weights(s, kind="uniform"):
    """Weights w_1..w_s of the target positions inside a bag, normalised to sum 1.

    "uniform": 1 (the paper's default, best for s <= 8); "power": 1/i (better for s >= 8);
    "power:K": i**K (the paper's mutual-information fit gives K = -1.25); "exp": exp(-i);
    "first": only the first token; or an explicit list of s non-negative numbers.
    """
    i = torch.arange(1, s + 1, dtype=torch.float64)
    if isinstance(kind, (list, tuple)):
        if len(kind) != s:
            raise ValueError(f"explicit bag weights need s={s} numbers, got {len(kind)}: {list(kind)}")
        w = torch.tensor([float(x) for x in kind], dtype=torch.float64)
    elif kind == "uniform":
        w = torch.ones(s, dtype=torch.float64)
    elif kind == "power":
        w = 1.0 / i
    elif isinstance(kind, str) and kind.startswith("power:"):
        w = i ** float(kind.split(":", 1)[1])
    elif kind == "exp":
        w = torch.exp(-i)
    elif kind == "first":
        w = (i == 1).double()
    else:
        raise ValueError(f"unknown bag weights {kind!r}: use uniform, power, power:K, exp, first or a list of s numbers")
    if (w < 0).any() or not torch.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"bag weights must be finite, non-negative and not all zero, got {w.tolist()}")
    return (w / w.sum()).float()


def mce_loss(logits, targets, weights):
    """Multi-hot cross-entropy: sum_i w_i * CE_i / sum_i w_i.

    logits (..., V); targets (..., s) with IGNORE_INDEX for missing tokens; weights (s,).
    CE_i is the mean cross-entropy over the valid entries of target column i; a column with no valid entry
    drops out. Every CE_i shares the log-normaliser, so the log-softmax is computed once and the s targets
    are gathered from it: the same work as one F.cross_entropy (log_softmax + a gather) at any s, where the
    paper's loop of s cross-entropies costs s times as much. With s = 1 this is exactly
    F.cross_entropy(logits, targets[..., 0], ignore_index=IGNORE_INDEX).
    """
    s = targets.size(-1)
    logits = logits.reshape(-1, logits.size(-1))
    targets = targets.reshape(-1, s)
    valid = targets != IGNORE_INDEX
    safe = targets.masked_fill(~valid, 0)  # any index works where invalid: those terms are masked out
    nll = -F.log_softmax(logits, dim=-1).gather(1, safe).float()  # (N, s): lse - z[y_i]
    count = valid.sum(0)
    column_ce = (nll * valid).sum(0) / count.clamp(min=1)
    w = weights.to(column_ce.device) * (count > 0)
    return (w * column_ce).sum() / w.sum()


# -----------------------------------------------------------------------------
# The two phases: what train.py needs to know

def switch_step(r, max_steps, s):
    """First step of phase 2. r = 0 or s = 1 means no superposition phase: exactly the baseline."""
    return 0 if s == 1 else math.floor(r * max_steps)


def phase(step, r, max_steps, s):
    return 1 if step < switch_step(r, max_steps, s) else 2


def data_tokens_per_row(T, s, phase, mode="full"):
    """Data tokens a row consumes (the stream advances by this): s*T when bags come in, else T.

    A row holds this many tokens plus one, the label of its last position. The transformer processes T
    positions per row in every phase and mode, so FLOPs per step never change.
    """
    return s * T if phase == 1 and mode in ("full", "input") else T


def batch(rows, s, phase, mode="full"):
    """Rows of data_tokens_per_row + 1 tokens -> (inputs, targets) for the model and `mce_loss`.

    inputs are (B, T) ids or (B, T, s) bags; targets are (B, T, k) with k = s when the loss is MCE over a
    bag and k = 1 for ordinary next-token prediction (for which mce_loss is plain cross-entropy).
    """
    inputs, labels = rows[:, :-1], rows[:, 1:]
    if phase == 2 or s == 1:
        return inputs, labels.unsqueeze(-1)
    if mode == "full":
        return fold(inputs, s), bag_targets(labels, s)
    if mode == "input":
        return fold(inputs, s), bag_targets(labels, s)[..., :1]  # the first token of the next bag
    if mode == "output":
        return inputs, next_tokens(labels, s)
    raise ValueError(f"unknown tst_mode {mode!r}: use one of {MODES}")
