"""Token Superposition Training (Peng, Gigant, Quesnelle, Nous Research 2026): the whole method.

For the first fraction r of the N optimizer steps each row holds s*T+1 consecutive data tokens instead of T+1. The
input is folded into T bags of s tokens (`fold`), a bag is embedded as the mean of its token embeddings (`bag_mean`),
so the transformer still sees T positions and a step costs the FLOPs of a baseline step while it reads s times the
text. Latent position j predicts the whole next bag (`bag_targets`) with a multi-hot cross-entropy (`mce_loss`,
weighted by `bag_weights`). Then training switches hard to ordinary next-token prediction: same weights, same
optimizer state, one learning-rate schedule. The paper's ablations are modes of the superposition phase: "input"
(bags in, the next token out) and "output" (tokens in, each position predicts its next s tokens; no extra data).

A `Schedule` says what each step does: the paper's single switch (s, r), or several stages of decreasing bag size
(`s_schedule`). train.py asks it for the step's `Stage` and never branches on TST itself; the lines that call into
this file are marked "# TST" there and in model.py, and deleting them with this file leaves a plain trainer.
"""

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # F.cross_entropy's default: a target with this value is not scored
MODES = ("full", "input", "output")

# The TST settings of train.py, with their defaults: the baseline (no superposition).
DEFAULTS = dict(
    s=1,  # bag size; 1 = ordinary next-token training throughout
    r=0.0,  # fraction of max_steps spent in superposition
    s_schedule=[],  # several stages instead of (s, r): [(end_fraction, s), ...], e.g. [(0.15, 8), (0.3, 4)]
    tst_mode="full",  # full | input | output (the paper's ablations)
    bag_weights="uniform",  # uniform | power | power:K | exp | first | [w_1, ..., w_s]
    reinit_at_switch=False,  # re-initialise input embedding and LM head at the switch (the paper's Table 2 ablation)
)


# -----------------------------------------------------------------------------
# Bags in

def fold(tokens, s):
    """(B, s*T) token ids -> (B, T, s): latent position j holds the bag of tokens j*s .. j*s+s-1."""
    B, L = tokens.shape
    if L % s != 0:
        raise ValueError(f"cannot fold a row of {L} tokens into bags of s={s}: {L} is not a multiple of {s}")
    return tokens.reshape(B, L // s, s)


def bag_mean(vectors):
    """(B, T, s, dim) embeddings of the bags' tokens -> (B, T, dim), the mean of each bag.

    Summed in float32 (bf16 loses the small differences between bags) and cast back. Nothing else is added: the
    paper found that positional information inside a bag hurts.
    """
    return (vectors.sum(dim=2, dtype=torch.float32) / vectors.size(2)).to(vectors.dtype)


# -----------------------------------------------------------------------------
# Bags out

def bag_targets(labels, s):
    """Ordinary next-token labels (B, s*T) -> next-bag targets (B, T, s).

    labels[:, k] is the token after input token k. Shifting left by s-1 makes latent position j (inputs j*s .. j*s+s-1)
    target tokens (j+1)*s .. (j+1)*s+s-1: the next bag, so the objective stays causal. Only the first target of the
    last bag exists in the row; its other s-1 are IGNORE_INDEX.
    """
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, : labels.size(1) - (s - 1)] = labels[:, s - 1:]
    return fold(shifted, s)


def next_tokens(labels, s):
    """Output-only mode: (B, T) next-token labels -> (B, T, s), position j targets tokens j+1 .. j+s.

    Targets past the end of the row are IGNORE_INDEX, so no extra data is read.
    """
    B, T = labels.shape
    targets = torch.full((B, T, s), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    for i in range(s):
        targets[:, : T - i, i] = labels[:, i:]
    return targets


def bag_weights(s, kind="uniform"):
    """Weights w_1..w_s of the target positions inside a bag, normalised to sum 1 (float32).

    "uniform": 1 (the paper's default, best for s <= 8); "power": 1/i (better for s >= 8); "power:K": i**K, the decay
    term of the paper's mutual-information fit C0 + a*d**K (K = -1.25 on DCLM; the constants C0 and a play no part);
    "exp": exp(-i); "first": only the first token; or an explicit list of s non-negative numbers.
    """
    i = torch.arange(1, s + 1, dtype=torch.float64)
    if isinstance(kind, (list, tuple)):
        if len(kind) != s:
            raise ValueError(f"bag_weights={list(kind)}: an explicit list needs s={s} numbers, got {len(kind)}")
        w = torch.tensor([float(x) for x in kind], dtype=torch.float64)
    elif kind == "uniform":
        w = torch.ones(s, dtype=torch.float64)
    elif kind == "power":
        w = 1.0 / i
    elif isinstance(kind, str) and kind.startswith("power:"):
        try:
            w = i ** float(kind.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"bag_weights={kind!r}: power:K needs a number K, e.g. power:-1.25") from None
    elif kind == "exp":
        w = torch.exp(-i)
    elif kind == "first":
        w = (i == 1).double()
    else:
        raise ValueError(f"bag_weights={kind!r}: use uniform, power, power:K, exp, first or a list of s numbers")
    if (w < 0).any() or not torch.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"bag_weights={kind!r} gives {w.tolist()}: weights must be finite, non-negative, not all 0")
    return (w / w.sum()).float()


def mce_loss(logits, targets, weights):
    """Multi-hot cross-entropy, the plain statement: sum_i w_i * CE_i / sum_i w_i.

    logits (..., V); targets (..., s) with IGNORE_INDEX for missing tokens; weights (s,). CE_i is the mean
    cross-entropy over the valid entries of target column i; a column with no valid entry drops out. Every CE_i shares
    the log-normaliser, so one log-softmax serves all s targets: the cost of one cross-entropy at any s (the paper's
    loop of s cross-entropies costs s times that). With s = 1 this is F.cross_entropy. Training computes the same
    value without ever holding the logits (model.head_loss, tested against this function).
    """
    s = targets.size(-1)
    logits = logits.reshape(-1, logits.size(-1))
    targets = targets.reshape(-1, s)
    valid = targets != IGNORE_INDEX
    nll = -F.log_softmax(logits, dim=-1).gather(1, targets.masked_fill(~valid, 0)).float()  # (N, s): lse - z[y_i]
    count = valid.sum(0)
    column_ce = (nll * valid).sum(0) / count.clamp(min=1)
    w = weights.to(column_ce.device) * (count > 0)
    return (w * column_ce).sum() / w.sum()


# -----------------------------------------------------------------------------
# The schedule: which steps read bags of which size

@dataclass(frozen=True)
class Stage:
    """A range of steps [start, end) that reads bags of s tokens (s = 1: ordinary next-token training)."""
    start: int
    end: int
    s: int
    mode: str = "full"
    weights: tuple = (1.0,)  # bag_weights(s, ...) as numbers

    @property
    def superposition(self):
        return self.s > 1

    def data_tokens_per_row(self, T):
        """Data tokens a row consumes (the stream advances by this; the row holds one more, the last label). The
        transformer processes T positions per row in every stage, so FLOPs per step never change."""
        return self.s * T if self.superposition and self.mode in ("full", "input") else T

    def inputs_and_targets(self, rows):
        """Rows of data_tokens_per_row(T) + 1 tokens -> (inputs, targets, target_weights) for the model.

        inputs (B, T) ids or (B, T, s) bags; targets (B, T) next tokens, or (B, T, k) scored by MCE with
        target_weights (k,) (None for next-token training).
        """
        inputs, labels = rows[:, :-1], rows[:, 1:]
        if not self.superposition:
            return inputs, labels, None
        weights = torch.tensor(self.weights)
        if self.mode == "full":
            return fold(inputs, self.s), bag_targets(labels, self.s), weights
        if self.mode == "input":  # the first token of the next bag
            return fold(inputs, self.s), bag_targets(labels, self.s)[..., :1], torch.ones(1)
        return inputs, next_tokens(labels, self.s), weights  # "output"


def step_at(fraction, max_steps):
    """floor(fraction * max_steps) computed exactly: 0.29 * 100 is 28.999999999999996 in floating point."""
    return math.floor(Fraction(str(fraction)) * max_steps)


class Schedule:
    """The stages of a run of max_steps steps: superposition stages, then next-token training to the end.

    From the settings: s and r (the paper: bags of s for floor(r * max_steps) steps), or s_schedule, a list of
    (end_fraction, s) pairs with increasing fractions, e.g. [(0.15, 8), (0.3, 4)]: s = 8 for the first 15% of the
    steps, 4 until 30%, then next-token. Raises ValueError on impossible settings, naming them.
    """

    def __init__(self, config, max_steps):
        s, r, pairs, mode = config["s"], config["r"], config["s_schedule"], config["tst_mode"]
        if mode not in MODES:
            raise ValueError(f"tst_mode={mode!r}: use one of {', '.join(MODES)}")
        if not isinstance(s, int) or s < 1:
            raise ValueError(f"s={s!r}: the bag size must be an integer >= 1 (1 = baseline)")
        if not 0 <= r < 1:
            raise ValueError(f"r={r}: the superposition fraction must be in [0, 1) (the paper: 0.2-0.4)")
        if pairs and (s != 1 or r != 0):
            raise ValueError(f"s_schedule={pairs} and s={s}, r={r}: set either s and r, or s_schedule")
        if not pairs:  # the paper's single switch; floor(r * max_steps) = 0 steps of it is the baseline
            pairs = [(r, s)] if s > 1 and step_at(r, max_steps) > 0 else []
        self.stages, start = [], 0
        for item in pairs:
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], int)):
                raise ValueError(f"s_schedule={pairs}: each stage is a pair (end_fraction, s), e.g. (0.3, 4)")
            fraction, stage_s = item
            end = step_at(fraction, max_steps)
            if not 0 < fraction < 1 or stage_s < 2 or end <= start:
                raise ValueError(f"s_schedule={pairs}: stage {tuple(item)} must have 0 < end_fraction < 1, "
                                 f"fractions increasing, s >= 2, and at least one step of the {max_steps}")
            weights = tuple(bag_weights(stage_s, config["bag_weights"]).tolist())
            self.stages.append(Stage(start, end, stage_s, mode, weights))
            start = end
        self.stages.append(Stage(start, max_steps, 1))
        self.reinit_at_switch = config["reinit_at_switch"]

    @property
    def switch_step(self):
        """The first step of next-token training (0 for a baseline)."""
        return self.stages[-1].start

    @property
    def boundaries(self):
        """The steps at which a new stage starts: a checkpoint is kept at each."""
        return [stage.start for stage in self.stages[1:]]

    def stage(self, step):
        return next(stage for stage in self.stages if step < stage.end)

    def longest_row(self, T):
        return max(stage.data_tokens_per_row(T) for stage in self.stages) + 1

    def describe(self, T):
        lines = []
        for stage in self.stages:
            what = (f"bags of s={stage.s} (mode {stage.mode}, weights {[round(w, 4) for w in stage.weights]})"
                    if stage.superposition else "next-token training")
            lines.append(f"steps {stage.start}-{stage.end - 1}: {what}, rows of {stage.data_tokens_per_row(T) + 1} "
                         f"tokens")
        return "\n".join(lines)

    def begin_step(self, step, model, optimizer, announce=True):
        """What happens when a step starts a new stage: it is announced, and at the switch to next-token training
        the re-initialisation ablation replaces the embedding and the LM head (and drops their AdamW moments)."""
        if step not in self.boundaries:
            return
        stage = self.stage(step)
        reinit = self.reinit_at_switch and not stage.superposition
        if reinit:
            replaced = [model.embed.weight] + [model.lm_head.weight] * (model.lm_head.weight is not model.embed.weight)
            with torch.no_grad():
                for p in replaced:  # a list, not a set: the same order (and random numbers) on every rank
                    p.normal_(0.0, model.cfg.init_std)
                    optimizer.state.pop(p, None)
        if announce:
            what = f"bags of s={stage.s}" if stage.superposition else "next-token prediction"
            print(f"step {step}: switching to {what}" + (" (embedding and LM head re-initialised)" if reinit else ""))
