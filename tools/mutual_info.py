"""
The mutual information I(d) between tokens d positions apart in a prepared data folder, and the bag weights it implies.

    python tools/mutual_info.py --data_dir data/X --max_distance 32 --s 16

Sample: sample_tokens // window non-overlapping windows of `window` consecutive train tokens, at random
(np.random.default_rng(seed)); by default as many as the train split holds, up to 8M tokens (about a minute on 2
cores). A pair (x, y) taken inside a window lies exactly d tokens apart. The N pairs of each distance are counted
sparsely (np.unique on the int64 keys x * V + y: a dense V x V table does not fit at V = 128k), their marginals from
the same pairs.

Estimator: the plug-in I = sum c_xy / N * log(c_xy N / (c_x c_y)) is biased upward by about
(K_xy - K_x - K_y + 1) / (2N), K being the occupied cells, rows and columns; I(d) is the plug-in less that bias
(Miller-Madow). Both are printed. That is a first-order correction: with a 50k-128k vocabulary the table is sampled
too thinly for it, and it removes only part of the bias. The rest is measured by the same estimator on pairs from
two different windows (true value about 0); it is nearly the same at every d past the first few, so the fit takes
it into C0 and k hardly moves with the sample size.

Fit: I(d) ~ C0 + a d^k by least squares (a grid over k; at each k, C0 and a solved in closed form). The paper's DCLM
fit is C0 = 3.63, a = 1.35, k = -1.25. Its k gives the MCE weights w_i ~ i^k of a bag of s tokens, the training
setting bag_weights = "power:K". Writes DATA_DIR/mi.json, and DATA_DIR/mi.png if matplotlib is installed.
"""

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: cli, data, prepare
import cli  # noqa: E402
import data  # noqa: E402
from cli import UserError  # noqa: E402
from prepare import count  # noqa: E402

PAPER_FIT = {"C0": 3.63, "a": 1.35, "k": -1.25}  # DCLM, Llama 3 tokenizer (METHOD.md)
SAMPLE_TOKENS = 8_000_000  # the default sample, where the train split holds that many


def sample_windows(data_dir, sample_tokens, window, seed):
    """(sample_tokens // window, window) int64: non-overlapping windows of the train split in random order
    (sample_tokens None: as many as the split holds, up to SAMPLE_TOKENS tokens); and meta.json's contents."""
    meta = data.load_meta(data_dir)
    shards = [s for s in meta["shards"] if s["split"] == "train"]
    slots = np.array([s["tokens"] // window for s in shards], np.int64)  # whole windows that fit in each shard
    n_windows = min(SAMPLE_TOKENS // window, slots.sum()) if sample_tokens is None else sample_tokens // window
    if n_windows > slots.sum():
        raise UserError(f"sample_tokens={sample_tokens:,} is more than the {slots.sum() * window:,} tokens of the "
                        f"train split of {data_dir} that whole windows of {window:,} can cover: sample fewer tokens")
    if n_windows < 2:  # the bias is measured across two windows
        raise UserError(f"the sample must hold at least two windows of {window:,} tokens: it holds {n_windows} "
                        f"(the train split of {data_dir} holds {slots.sum()}): a larger --sample_tokens or a "
                        f"smaller --window")
    picks = np.random.default_rng(seed).choice(slots.sum(), n_windows, replace=False)
    ends = np.cumsum(slots)
    shard_of = np.searchsorted(ends, picks, side="right")
    start = (picks - (ends - slots)[shard_of]) * window
    tokens = {i: data.read_shard(Path(data_dir) / shards[i]["file"]) for i in np.unique(shard_of)}
    windows = np.stack([tokens[i][j:j + window] for i, j in zip(shard_of, start)]).astype(np.int64)
    return windows, meta


def mutual_information(x, y, vocab_size):
    """Plug-in estimate (nats) of the mutual information of the pairs (x[n], y[n]), and its Miller-Madow bias."""
    n = len(x)
    cells, c = np.unique(x * vocab_size + y, return_counts=True)
    cx, cy = np.bincount(x, minlength=vocab_size), np.bincount(y, minlength=vocab_size)
    log_ratio = np.log(c) + np.log(n) - np.log(cx[cells // vocab_size]) - np.log(cy[cells % vocab_size])
    bias = (len(cells) - np.count_nonzero(cx) - np.count_nonzero(cy) + 1) / (2 * n)
    return float(c @ log_ratio / n), bias


def estimate(data_dir, max_distance=32, sample_tokens=None, window=1024, seed=0):
    """I(d) for d = 1..max_distance from a sample of the train split (sample_tokens None: the default one), with
    plug-in values and bias estimates."""
    if max_distance < 4:
        raise UserError(f"max_distance={max_distance}: the fit C0 + a d^k has three parameters and needs at least "
                        f"4 distances")
    if window <= max_distance:
        raise UserError(f"window={window} must be longer than max_distance={max_distance}")
    t0 = time.time()
    windows, meta = sample_windows(data_dir, sample_tokens, window, seed)
    V = meta["vocab_size"]
    plug_in, bias = zip(*[mutual_information(windows[:, :-d].ravel(), windows[:, d:].ravel(), V)
                          for d in range(1, max_distance + 1)])
    # each window against the next one in the random order: the same estimator where the true value is about 0
    apart = mutual_information(windows[:, :-max_distance].ravel(), np.roll(windows, 1, 0)[:, max_distance:].ravel(), V)
    train_tokens = sum(s["tokens"] for s in meta["shards"] if s["split"] == "train")
    return {"data_dir": str(data_dir), "vocab_size": V, "train_tokens": train_tokens,
            "sample_tokens": windows.size, "window": window, "windows": len(windows), "seed": seed,
            "max_distance": max_distance, "pairs": [len(windows) * (window - d) for d in range(1, max_distance + 1)],
            "mi": [p - b for p, b in zip(plug_in, bias)], "mi_plug_in": list(plug_in), "bias": list(bias),
            "different_windows": {"mi": apart[0] - apart[1], "mi_plug_in": apart[0], "bias": apart[1]},
            "seconds": time.time() - t0}


def fit_power_law(mi):
    """Least-squares C0 + a d^k to mi[d - 1], d = 1..D, with k in [-6, -0.01]: a grid of k, then a finer grid
    around its best point; C0 and a by linear regression on d^k at each k. Returns k, C0, a, rms residual."""
    d, y = np.arange(1, len(mi) + 1, dtype=np.float64), np.asarray(mi, np.float64)
    lo, hi = -6.0, -0.01
    for _ in range(2):
        ks = np.linspace(lo, hi, 1001)
        p = d ** ks[:, None]
        p_centred = p - p.mean(1, keepdims=True)
        a = p_centred @ (y - y.mean()) / (p_centred ** 2).sum(1)
        C0 = y.mean() - a * p.mean(1)
        sse = ((y - C0[:, None] - a[:, None] * p) ** 2).sum(1)
        best = int(np.argmin(sse))
        lo, hi = ks[max(best - 1, 0)], ks[min(best + 1, len(ks) - 1)]
    return {"k": float(ks[best]), "C0": float(C0[best]), "a": float(a[best]),
            "residual_rms": float(np.sqrt(sse[best] / len(y)))}


def power_weights(s, k):
    """w_i = i^k / sum_j j^k, i = 1..s: what bag_weights = "power:K" trains with (tst.bag_weights)."""
    w = np.arange(1, s + 1, dtype=np.float64) ** k
    return w / w.sum()


def plot(path, result, fit):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    d = np.geomspace(1, result["max_distance"], 200)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.loglog(range(1, result["max_distance"] + 1), result["mi"], "o", ms=3, label="I(d), Miller-Madow")
    ax.loglog(d, fit["C0"] + fit["a"] * d ** fit["k"], label=f"{fit['C0']:.3g} + {fit['a']:.3g} d^{fit['k']:.2f}")
    ax.axhline(result["different_windows"]["mi"], ls=":", c="gray", label="tokens of different windows")
    ax.set(xlabel="distance d (tokens)", ylabel="mutual information (nats)", title=str(path.parent))
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="a folder prepared by python prepare.py")
    parser.add_argument("--max_distance", type=int, default=32, help="D: measure I(d) for d = 1..D")
    parser.add_argument("--s", type=int, default=16, help="the bag size whose weights to print")
    parser.add_argument("--sample_tokens", type=count, default=None,
                        help=f"train tokens to sample (default: the whole train split, up to {SAMPLE_TOKENS:,})")
    parser.add_argument("--window", type=int, default=1024, help="tokens per sampled window")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.s < 1:
        raise UserError(f"--s {args.s}: a bag holds at least 1 token")

    result = estimate(args.data_dir, args.max_distance, args.sample_tokens, args.window, args.seed)
    note = ""
    if args.sample_tokens is None:  # what the default took
        note = (f"; the default sample: the whole train split, in whole windows, as it holds under {SAMPLE_TOKENS:,}"
                if result["train_tokens"] < SAMPLE_TOKENS else f"; the default sample: at most {SAMPLE_TOKENS:,}")
    print(f"{args.data_dir}: {result['windows']:,} windows of {args.window:,} = {result['sample_tokens']:,} of "
          f"{result['train_tokens']:,} train tokens (seed {args.seed}{note}), vocabulary {result['vocab_size']:,}, "
          f"{result['seconds']:.1f}s")
    print(f"{'d':>3} {'I(d) nats':>10} {'plug-in':>9} {'bias':>9} {'pairs':>11}")
    for d, row in enumerate(zip(result["mi"], result["mi_plug_in"], result["bias"], result["pairs"]), 1):
        print(f"{d:>3} {row[0]:10.4f} {row[1]:9.4f} {row[2]:9.4f} {row[3]:11,}")
    apart = result["different_windows"]
    print(f"tokens of different windows (true I ~ 0): I = {apart['mi']:.4f} (plug-in {apart['mi_plug_in']:.4f}, "
          f"bias {apart['bias']:.4f}): the bias the correction leaves")
    fit, result["fit_plug_in"] = fit_power_law(result["mi"]), fit_power_law(result["mi_plug_in"])
    result.update(fit)
    for name, f in (("fit I(d)", fit), ("plug-in", result["fit_plug_in"]), ("paper (DCLM)", PAPER_FIT)):
        residual = f", residual rms {f['residual_rms']:.4f} nats" if "residual_rms" in f else ""
        print(f"{name + ':':<14} C0 + a d^k with C0 = {f['C0']:.3f}, a = {f['a']:.3f}, k = {f['k']:.3f}{residual}")
    if fit["a"] <= 0 or not -5.99 < fit["k"] < -0.02:
        print("warning: I(d) does not decay like a power law here (a <= 0 or k at the edge of [-6, -0.01]): "
              "the weights below mean little")
    result["bag_weights"] = f"power:{fit['k']:.2f}"
    result["s"], result["weights"] = args.s, power_weights(args.s, round(fit["k"], 2)).tolist()
    print(f"weights of a bag of s={args.s}: {' '.join(f'{w:.3f}' for w in result['weights'])}")
    print(f"config line to paste: bag_weights = \"{result['bag_weights']}\"")

    out = Path(args.data_dir) / "mi.json"
    out.write_text(json.dumps(result, indent=1))
    if importlib.util.find_spec("matplotlib") is None:
        print(f"wrote {out}; matplotlib is not installed, so no plot (pip install matplotlib for mi.png)")
    else:
        plot(out.with_suffix(".png"), result, fit)
        print(f"wrote {out} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    cli.run(main)
