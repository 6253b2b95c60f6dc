"""Token Superposition Training (Peng, Gigant, Quesnelle, Nous Research 2026): the whole method.

For the first fraction r of the N optimizer steps each row holds s*T+1 consecutive data tokens instead of T+1. The
input is folded into T bags of s tokens (`fold`), a bag becomes one input vector (`BagCombiner`: the mean of its token
embeddings), so the transformer still sees T positions and a step costs the FLOPs of a baseline step while it reads s
times the text. Latent position j predicts the whole next bag (`bag_targets`) with a multi-hot cross-entropy
(`mce_loss`, weighted by `bag_weights`; or the paper's alternative, `sum_to_one_loss`). Then training switches hard to
ordinary next-token prediction: same weights, same optimizer state, one learning-rate schedule. The paper's ablations
are modes of the superposition phase: "input" (bags in, the next token out) and "output" (tokens in, each position
predicts its next s tokens; no extra data).

A `Schedule` says what each step does: the paper's single switch (s, r), or several stages of decreasing bag size
(`s_schedule`). train.py asks it for the step's `Stage` and never branches on TST itself; the lines that call into
this file are marked "# TST" there and in model.py, and deleting them with this file leaves a plain trainer.

The losses here are what trains: model.py computes the logits a chunk of positions at a time (never all at once, at a
128k vocabulary they take gigabytes) and calls the stage's loss on each chunk under autograd, so editing the body of
mce_loss changes training with nothing else to edit. A loss must therefore add up over chunks of positions: each
takes the micro-batch's normalisers (column_counts, scored_positions) and returns its chunk's share.
"""

import functools
import math
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn as nn

IGNORE_INDEX = -100  # a target with this value is not scored (F.cross_entropy's default)
MODES = ("full", "input", "output")
BAG_LOSSES = ("mce", "sum_to_one")

# The TST settings of a run (config.py's table), with their defaults (the baseline: no superposition) and meanings
SETTINGS = dict(
    s=(1, "bag size; 1 = ordinary next-token training throughout"),
    r=(0.0, "fraction of max_steps spent in superposition"),
    s_schedule=([], "several stages instead of (s, r): [(end_fraction, s), ...], e.g. [(0.15, 8), (0.3, 4)]"),
    tst_mode=("full", "full | input | output (the paper's ablations)"),
    bag_loss=("mce", "mce (multi-hot cross-entropy) | sum_to_one (-log of the bag's total probability)"),
    bag_weights=("uniform", "MCE's weights: uniform | power | power:K | exp | first | [w_1, ..., w_s]"),
    reinit_at_switch=(False, "re-initialise input embedding and LM head at the switch (the paper's Table 2 ablation)"),
    doc_bags=(False, "document-aware bags: after an end of text the rest of the bag is padding, left out of the bag's "
                     "mean, its targets and the data-token count"),
)
DEFAULTS = {name: default for name, (default, _) in SETTINGS.items()}


# -----------------------------------------------------------------------------
# Bags in

def fold(tokens, s):
    """(B, s*T) token ids -> (B, T, s): latent position j holds the bag of tokens j*s .. j*s+s-1."""
    B, L = tokens.shape
    if L % s != 0:
        raise ValueError(f"cannot fold a row of {L} tokens into bags of s={s}: {L} is not a multiple of {s}")
    return tokens.reshape(B, L // s, s)


class BagCombiner(nn.Module):
    """A bag's token embeddings -> one input vector: (B, T, s, dim), and which of them are tokens rather than
    padding, (B, T, s) bool -> (B, T, dim). The paper's, and this one: the mean of the bag's tokens, summed in float32
    (bf16 loses the small differences between bags) and cast back. Nothing positional is added: the paper found that
    it hurts. Padding exists only with doc_bags (see pad_after_end_of_text); every bag keeps at least one token.

    The model owns one (Transformer.bag_combiner) and calls it in superposition stages only. A learned combiner (say,
    attention pooling over the bag) is this class with parameters: model.init_weights initialises them by name
    (matrices N(0, init_std), norm weights 1, biases 0) or calls reset_parameters() if the class has one; they train
    in superposition stages, are saved and resumed with the model, and get no gradient after the switch, which
    train.py tells DDP to expect (FSDP2 and AdamW skip a parameter without a gradient).
    """

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, vectors, tokens):
        summed = vectors.masked_fill(~tokens[..., None], 0).sum(dim=2, dtype=torch.float32)
        return (summed / tokens.sum(dim=2, keepdim=True)).to(vectors.dtype)


def pad_after_end_of_text(bags, eot):
    """Document-aware bags (doc_bags): (B, T, s) ids -> the same with every token that follows an end of text (eot) in
    its bag replaced by IGNORE_INDEX, so that no bag holds tokens of two documents. The end of text itself stays: it
    ends its document's bag. The model reads an id < 0 as padding (left out of the bag's mean)."""
    after = (bags == eot).cumsum(dim=2) - (bags == eot).long() > 0
    return bags.masked_fill(after, IGNORE_INDEX)


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
        if len(kind) != s or not all(is_number(x) for x in kind):
            raise ValueError(f"bag_weights={list(kind)}: an explicit list needs s={s} numbers")
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


def mce_loss(logits, targets, weights, column_counts=None):
    """Multi-hot cross-entropy, what superposition stages train on: sum_i w_i * CE_i / sum_i w_i.

    logits (..., V), float32; targets (..., s) with IGNORE_INDEX where a bag has no token; weights (s,). CE_i is the
    mean cross-entropy logsumexp(z) - z[y_i] over the valid entries of target column i; a column without one drops
    out. Every CE_i shares the log-normaliser, so one log-softmax serves all s targets: the cost of one cross-entropy
    at any s (the paper's loop of s cross-entropies costs s times that). With s = 1 this is F.cross_entropy.
    column_counts (s,): the valid entries of each column in the whole micro-batch when `logits` are a chunk of its
    positions (model.py passes them); the chunk's share is returned, and the shares add up to the loss.
    """
    logits, targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1, targets.size(-1))
    valid = targets != IGNORE_INDEX
    counts = valid.sum(0) if column_counts is None else column_counts
    nll = -torch.log_softmax(logits, dim=-1).gather(1, targets.masked_fill(~valid, 0))  # (N, s): lse - z[y_i]
    w = weights.to(logits.device) * (counts > 0)
    return ((nll * valid).sum(0) / counts.clamp(min=1) * w).sum() / w.sum()


def sum_to_one_loss(logits, targets, scored_positions=None):
    """The paper's alternative to MCE (its Appendix C.2): -log sum_{y in bag} P(y), the probability the model gives
    the next bag as a whole, = logsumexp(z) - logsumexp(z[bag]).

    logits (..., V), float32; targets (..., s) with IGNORE_INDEX for missing tokens. Each distinct valid token of a bag
    counts once: the sum is then the probability that the next token is one of the bag's, at most 1, so the loss is
    >= 0 and 0 exactly when all the mass is on the bag. Counted with multiplicity, a bag "a a" would ask for P(a) = 2
    and reward a model past certainty (repeats are common: spaces, at s = 16 most bags hold one). Weights play no
    part. The mean over the positions whose bag has a valid token; scored_positions: their number in the whole
    micro-batch when `logits` are a chunk of it (as column_counts in mce_loss).
    """
    logits, targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1, targets.size(-1))
    valid = targets != IGNORE_INDEX
    repeat = (targets[:, :, None] == targets[:, None, :]).tril(-1).any(-1)  # an earlier entry of the bag holds it
    keep = valid & ~repeat
    scored = keep.any(1)
    picked = logits.gather(1, targets.masked_fill(~valid, 0)).masked_fill(~keep, -math.inf)
    picked = picked.masked_fill(~scored[:, None], 0.0)  # a position with no target: finite, then weighted 0
    loss = (torch.logsumexp(logits, dim=-1) - torch.logsumexp(picked, dim=-1)) * scored
    n = scored.sum() if scored_positions is None else torch.as_tensor(scored_positions)
    return loss.sum() / n.clamp(min=1)


# -----------------------------------------------------------------------------
# The schedule: which steps read bags of which size

@dataclass(frozen=True)
class Stage:
    """A range of steps [start, end) that reads bags of s tokens (s = 1: ordinary next-token training)."""
    start: int
    end: int
    s: int
    mode: str = "full"
    weights: tuple = (1.0,)  # MCE's w_1..w_k of the stage's k targets per position, as numbers
    loss: str = "mce"  # the bag loss: mce or sum_to_one
    eot: int = None  # doc_bags: the data's end-of-text id, after which a bag holds padding; None: bags of any tokens

    @property
    def superposition(self):
        return self.s > 1

    @property
    def name(self):
        if not self.superposition:
            return "next-token training"
        loss = "sum-to-one loss" if self.loss == "sum_to_one" else f"MCE, weights {[round(w, 4) for w in self.weights]}"
        return f"bags of s={self.s} (mode {self.mode}, {loss})"

    @property
    def tokens_per_position(self):
        """Data tokens one of the T positions of a row reads: s with bags in (modes full and input), else 1. The
        transformer processes T positions per row in every stage, so FLOPs per step never change."""
        return self.s if self.superposition and self.mode in ("full", "input") else 1

    def data_tokens_per_row(self, T):
        """Data tokens a row consumes (the loader's row length; the row holds one more, the last label)."""
        return self.tokens_per_position * T

    @staticmethod
    def padding(inputs):
        """Tokens of a batch's inputs (as batch returns them) that are doc_bags padding: read but not trained on."""
        return (inputs < 0).sum()

    def batch(self, inputs, labels):
        """A micro-batch's next-token (inputs, labels), each (B, data_tokens_per_row(T)): the rows with their last
        token dropped and shifted by one -> (inputs, targets, loss_fn) for the model.

        inputs (B, T) ids or (B, T, s) bags; targets (B, T) next tokens, or (B, T, k) bags of targets; loss_fn None
        (the model's next-token cross-entropy) or the stage's bag loss, as model.py calls it on a chunk of positions:
        loss_fn(logits (n, V) float32, targets (n, k)) -> the chunk's share of the micro-batch's loss.
        """
        if not self.superposition:
            return inputs, labels, None
        if self.mode == "full":
            inputs, targets = fold(inputs, self.s), bag_targets(labels, self.s)
        elif self.mode == "input":  # the first token of the next bag
            inputs, targets = fold(inputs, self.s), bag_targets(labels, self.s)[..., :1]
        else:  # "output"
            targets = next_tokens(labels, self.s)
        if self.eot is not None and self.mode != "output":
            inputs = pad_after_end_of_text(inputs, self.eot)
            # the target of latent position j is bag j + 1, padded as its inputs are (the last position's target,
            # the first token of the bag after the row, is never padding)
            targets[:, :-1] = targets[:, :-1].masked_fill(inputs[:, 1:, :targets.size(2)] < 0, IGNORE_INDEX)
        valid = (targets != IGNORE_INDEX).flatten(0, -2)
        if self.loss == "sum_to_one":
            return inputs, targets, functools.partial(sum_to_one_loss, scored_positions=valid.any(1).sum())
        weights = torch.tensor(self.weights, device=targets.device)
        return inputs, targets, functools.partial(mce_loss, weights=weights, column_counts=valid.sum(0))


def is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def step_at(fraction, max_steps):
    """floor(fraction * max_steps) computed exactly: 0.29 * 100 is 28.999999999999996 in floating point."""
    return math.floor(Fraction(str(fraction)) * max_steps)


def check(config):
    """The TST settings of a run of config["max_steps"] steps: a ValueError naming any that is impossible."""
    s, r, pairs, mode, loss = (config[k] for k in ("s", "r", "s_schedule", "tst_mode", "bag_loss"))
    if mode not in MODES:
        raise ValueError(f"tst_mode={mode!r}: use one of {', '.join(MODES)}")
    if loss not in BAG_LOSSES:
        raise ValueError(f"bag_loss={loss!r}: use one of {', '.join(BAG_LOSSES)}")
    if loss == "sum_to_one" and config["bag_weights"] != "uniform":
        raise ValueError(f"bag_weights={config['bag_weights']!r} with bag_loss='sum_to_one': the sum-to-one loss "
                         f"has no weights; leave bag_weights='uniform' or use bag_loss='mce'")
    if not isinstance(s, int) or s < 1:
        raise ValueError(f"s={s!r}: the bag size must be an integer >= 1 (1 = baseline)")
    if not 0 <= r < 1:
        raise ValueError(f"r={r}: the superposition fraction must be in [0, 1) (the paper: 0.2-0.4)")
    for item in pairs:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and is_number(item[0])
                and isinstance(item[1], int) and not isinstance(item[1], bool)):
            raise ValueError(f"s_schedule={pairs}: each stage is a pair (end_fraction, s) of a number and an "
                             f"integer, e.g. (0.3, 4)")
    if pairs and (s != 1 or r != 0):
        raise ValueError(f"s_schedule={pairs} and s={s}, r={r}: set either s and r, or s_schedule")
    if config["doc_bags"] and mode == "output":
        raise ValueError("doc_bags=True with tst_mode='output': output-only reads no bags; leave doc_bags False")
    start = 0
    for fraction, stage_s in pairs:
        end = step_at(fraction, config["max_steps"])
        if not 0 < fraction < 1 or stage_s < 2 or end <= start:
            raise ValueError(f"s_schedule={pairs}: stage {(fraction, stage_s)} must have 0 < end_fraction < 1, "
                             f"fractions increasing, s >= 2, and at least one step of the {config['max_steps']}")
        start = end
    for stage_s in [s] + [stage_s for _, stage_s in pairs]:
        if mode != "input" and stage_s > 1:
            bag_weights(stage_s, config["bag_weights"])  # raises on weights that do not fit


class Schedule:
    """The stages of a run: superposition stages, then next-token training to the end. Built once per run, from its
    checked settings (config.check) and the facts of its prepared data (data.load_meta's meta.json: the end-of-text
    id eot, the token counts; None where there is no data, as for a plan), which a stage may use.

    From the settings: s and r (the paper: bags of s for floor(r * max_steps) steps), or s_schedule, a list of
    (end_fraction, s) pairs with increasing fractions, e.g. [(0.15, 8), (0.3, 4)]: s = 8 for the first 15% of the
    steps, 4 until 30%, then next-token.
    """

    def __init__(self, config, data=None):
        s, r, pairs, mode, loss = (config[k] for k in ("s", "r", "s_schedule", "tst_mode", "bag_loss"))
        max_steps, self.data = config["max_steps"], data
        if not pairs:  # the paper's single switch; floor(r * max_steps) = 0 steps of it is the baseline
            pairs = [(r, s)] if s > 1 and step_at(r, max_steps) > 0 else []
        self.stages, start = [], 0
        for fraction, stage_s in pairs:
            end = step_at(fraction, max_steps)
            weights = (1.0,) if mode == "input" else tuple(bag_weights(stage_s, config["bag_weights"]).tolist())
            eot = data["eot"] if config["doc_bags"] and data else None  # a fact of the data (none in a plan)
            self.stages.append(Stage(start, end, stage_s, mode, weights, loss, eot))
            start = end
        self.stages.append(Stage(start, max_steps, 1))
        self.reinit_at_switch = config["reinit_at_switch"]

    @property
    def boundaries(self):
        """The steps at which a new stage starts: a checkpoint is kept at each."""
        return [stage.start for stage in self.stages[1:]]

    def stage(self, step):
        return next(stage for stage in self.stages if step < stage.end)

    @property
    def window_factor(self):
        """The least common multiple of every stage's data tokens per position: the loader's windows of T times this
        many tokens divide evenly into rows of every stage (4T for s = 4)."""
        return math.lcm(*(stage.tokens_per_position for stage in self.stages))

    def label(self, step):
        """The console's name for the stage of `step`: nothing for a baseline, which has one."""
        if len(self.stages) == 1:
            return ""
        stage = self.stage(step)
        if not stage.superposition:
            return "phase 2"
        return f"phase 1: s={stage.s}, {'sum-to-one' if stage.loss == 'sum_to_one' else 'MCE'}"

    def describe(self, T):
        return "\n".join(f"steps {stage.start}-{stage.end - 1}: {stage.name}, rows of "
                         f"{stage.data_tokens_per_row(T) + 1} tokens" for stage in self.stages)

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
                    p.copy_(redrawn(p, model.cfg.init_std))
                    optimizer.state.pop(p, None)
        if announce:
            what = f"bags of s={stage.s}" if stage.superposition else "next-token prediction"
            print(f"step {step}: switching to {what}" + (" (embedding and LM head re-initialised)" if reinit else ""))


def redrawn(p, std):
    """A new N(0, std) draw of the whole of parameter p, in its layout: the same values however p is sharded. (A
    sharded parameter's normal_() would draw every shard from the same random state: under FSDP2 on CPU, rows
    0-127 of a 256-row embedding would equal rows 128-255.)"""
    full = torch.empty(p.shape, dtype=p.dtype, device=p.device).normal_(0.0, std)
    if hasattr(p, "device_mesh"):  # a DTensor: every rank drew the same full tensor; keep this rank's part of it
        from torch.distributed.tensor import distribute_tensor
        full = distribute_tensor(full, p.device_mesh, p.placements)
    return full
