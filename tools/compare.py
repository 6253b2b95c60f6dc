"""
Compare train.py runs the three ways the paper does (equal FLOPs, equal data, equal loss), and train sweeps over s,
r, the TST modes, the re-initialisation ablation and seeds.

    python tools/compare.py runs/baseline runs/tst              # table; PNGs beside the runs (needs matplotlib)
    python tools/compare.py runs/sweep/* --by_seed --markdown   # runs that differ only by seed: mean ± sd, n
    python tools/compare.py sweep --config config/tiny_tst.py --s 2 3 4 --r 0.25 --seeds 1337 2
    python tools/compare.py sweep --config config/tiny_tst.py --s 2 --r 0.25 --modes full input output --reinit
    python tools/compare.py sweep --config config/270m_tst.py --s 4 6 8 --r 0.3 --torchrun 8   # prints the commands

A run is a train.py out_dir: config.json and log.jsonl (a run still training is read up to its last complete line),
and eval_step{steps}.json if eval.py scored its last checkpoint on the whole validation split. The baseline is the
run whose log has no phase-1 step (or --baseline); every other run is compared with it. Runs of different tokenizers
are refused: a loss per token is not comparable across them. The PNGs replace those of an earlier comparison in the
same folder (the script says so). The plots draw seeds of one configuration once: their mean, in a band from their
min to their max; dashed beside it, the training loss of next-token steps, smoothed.
"""

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository: its modules, and the train.py and eval.py a sweep runs
sys.path.insert(0, str(ROOT))
import cli  # noqa: E402
from cli import UserError  # noqa: E402

# eval.py's held-out loss over every token of the validation split, written to RUN/eval_step{step}.json as the task
# heldout_val_all
FULL_SPLIT_EVAL = ["--loss_tokens", "all"]


# -----------------------------------------------------------------------------
# Reading runs

def load_run(folder):
    """A run's settings, its evaluations [(steps done, data tokens, val_loss)], its training loss on next-token
    steps [(steps done, data tokens, loss)], the steps done where each of its stages ends (train.py evaluates there
    too) and the table's totals."""
    folder = Path(folder)
    for name in ("config.json", "log.jsonl"):
        if not (folder / name).is_file():
            raise UserError(f"{folder}: no {name}; a run folder is a train.py out_dir (config.json and log.jsonl)")
    config = read_config(folder)
    log = read_log(folder / "log.jsonl")
    evals = [(r["step"] + 1, r["data_tokens"], r["val_loss"]) for r in log if "val_loss" in r]
    if not evals:
        raise UserError(f"{folder}: no evaluation in log.jsonl yet (val_loss is logged every "
                        f"eval_interval={config.get('eval_interval')} steps and at the end)")
    schedule = config.get("s_schedule") or []  # [(end_fraction, s), ...]; older runs have s and r only
    steps = log[-1]["step"] + 1
    mode = config.get("tst_mode", "full") + ("+reinit" if config.get("reinit_at_switch") else "")
    if config.get("bag_loss", "mce") != "mce":  # runs older than the setting trained with MCE
        mode += f", {config['bag_loss']}"
    return dict(
        name=folder.name, folder=folder, config=config, steps=steps, max_steps=config["max_steps"], evals=evals,
        s=",".join(str(s) for _, s in schedule) if schedule else str(config.get("s", 1)), mode=mode,
        r=schedule[-1][0] if schedule else config.get("r", 0.0),
        is_baseline=all(r.get("phase", 2) == 2 for r in log),  # a trainer without TST logs no phase
        # a stage is a run of steps with one phase and one bag size ("s", logged per step by newer runs)
        boundaries=[r["step"] for before, r in zip(log, log[1:])
                    if (r.get("phase"), r.get("s")) != (before.get("phase"), before.get("s"))],
        final_val=evals[-1][2], full_split_val=full_split_loss(folder, steps),
        data_tokens=log[-1]["data_tokens"], positions=log[-1]["positions"], wall=sum(r["dt"] for r in log),
        # phase 1 logs the bag loss (MCE), another quantity than a next-token loss: only phase 2's (a baseline's
        # every step: it logs no phase)
        train=[(r["step"] + 1, r["data_tokens"], r["loss"]) for r in log if r.get("phase", 2) == 2])


def read_config(folder):
    """A run's config.json, which must be an object with max_steps; a UserError names a damaged one."""
    try:
        config = json.loads((folder / "config.json").read_text())
        problem = "" if isinstance(config, dict) and "max_steps" in config else "it has no max_steps"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problem = f"{type(e).__name__}: {e}"
    if problem:
        raise UserError(f"{folder / 'config.json'} is damaged ({problem}): train.py writes it at the start of a run; "
                        f"restore it, or write it from a checkpoint (its train state holds the config)")
    return config


def read_log(path):
    # Split on newlines and drop the last piece: it is empty when the file ends with a newline, or a line that
    # a running train.py is still writing.
    records = []
    for i, line in enumerate(path.read_text().split("\n")[:-1], 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}, line {i}: not a JSON line ({e}); a log.jsonl holds one JSON object per "
                            f"line") from None
    return records


def full_split_loss(folder, steps):
    """eval.py's loss over the whole validation split (--loss_tokens all) at the run's last step, or None."""
    path = folder / f"eval_step{steps}.json"
    rows = json.loads(path.read_text())["results"] if path.is_file() else []
    return next((r["value"] for r in rows if r["task"] == "heldout_val_all" and r["metric"] == "loss"), None)


def find_baseline(runs, by_seed=False):
    found = [run for run in runs if run["is_baseline"]]
    if not found:
        raise UserError(f"no baseline among {', '.join(str(run['folder']) for run in runs)}: a baseline's log has "
                        f"no phase-1 step (s=1 or r=0); add one, or name one with --baseline RUN_DIR")
    if len(found) > 1 and not (by_seed and len(seed_groups(found)) == 1):
        raise UserError(f"several baselines ({', '.join(str(run['folder']) for run in found)}): choose one with "
                        f"--baseline RUN_DIR" + ("" if by_seed else ", or average seeds with --by_seed"))
    return found[0]


# -----------------------------------------------------------------------------
# The numbers

# the settings that choose the held-out rows every val_loss of a run is measured on (data.validation_rows)
VAL_ROWS = ("data_dir", "seq_len", "eval_tokens")


def compare(runs, baseline):
    """Adds delta, speedup and crossing to each run but the baseline; returns the runs, the baseline first. Refuses
    runs of different tokenizers, and warns where steps are not equal FLOPs or val_loss scores other text.

    delta = final val - the baseline's final val: negative is better. final val is the last evaluation's
    val_loss, the next-token loss on token input (comparable across phases, unlike the logged MCE).
    speedup: equal loss. L is the run's final val and N its steps done at that evaluation; crossing k is the
    first baseline evaluation (k steps done) with val_loss <= L; speed-up = k / N, read at evaluations, so it can
    overstate by less than one baseline eval_interval / N. If the baseline never gets to L (crossing None) it is
    K / N with K the baseline's steps, a lower bound. Caveat: at step k the baseline is mid-schedule (its learning
    rate has not decayed), so the speed-up can be overstated; for a strict figure train baselines of several
    lengths and compare final losses, as the paper did.
    """
    tokenizers = {}
    for run in runs:
        tokenizers.setdefault(run["config"]["tokenizer"], []).append(str(run["folder"]))
    if len(tokenizers) > 1:
        which = "; ".join(f"{', '.join(folders)}: {tokenizer}" for tokenizer, folders in tokenizers.items())
        raise UserError(f"these runs use different tokenizers ({which}): a loss per token is not comparable across "
                        f"tokenizers, whose tokens hold different amounts of text; compare runs of one tokenizer")
    per_step = baseline["positions"] / baseline["steps"]
    for run in runs:
        if run is baseline:
            continue
        if run["positions"] / run["steps"] != per_step:
            print(f"warning: {run['name']} processes {run['positions'] / run['steps']:,.0f} positions per step, "
                  f"the baseline {per_step:,.0f}: their steps are not equal FLOPs", file=sys.stderr)
        other = [f"{key}={run['config'][key]!r} (the baseline's {baseline['config'][key]!r})" for key in VAL_ROWS
                 if run["config"][key] != baseline["config"][key]]
        if other:
            print(f"warning: {run['name']} is evaluated on other held-out rows than the baseline, {', '.join(other)}: "
                  f"Δ val mixes how hard those rows are with how well it trained", file=sys.stderr)
        run["delta"] = run["final_val"] - baseline["final_val"]
        equal_loss(run, baseline)
    return [baseline] + [run for run in runs if run is not baseline]


def equal_loss(run, baseline):
    """Sets the run's crossing and speed-up against the baseline (compare says how they are read)."""
    steps, _, loss = run["evals"][-1]
    run["crossing"] = next((k for k, _, v in baseline["evals"] if v <= loss), None)
    run["speedup"] = (baseline["steps"] if run["crossing"] is None else run["crossing"]) / steps


# settings that do not change what a run computes: runs that differ only in these are seeds of one configuration
NOT_CONFIGURATION = {"seed", "out_dir", "resume", "log_interval", "ckpt_interval", "keep_last", "wandb_project",
                     "wandb_run_name", "tensorboard", "sample_interval", "sample_prompt", "sample_tokens",
                     "sample_temperature"}


def seed_groups(runs):
    """Runs with the same settings but for the seed, in groups, in the order they first appear."""
    groups = {}
    for run in runs:
        key = json.dumps({k: v for k, v in run["config"].items() if k not in NOT_CONFIGURATION}, sort_keys=True)
        groups.setdefault(key, []).append(run)
    return list(groups.values())


def mean_sd(values):
    """The mean and the sample standard deviation (None for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def steps_cell(run):
    # "k/N" while a run is unfinished; equal steps are equal FLOPs (compare warns where they are not)
    return str(run["steps"]) if run["steps"] >= run["max_steps"] else f"{run['steps']}/{run['max_steps']}"


def table(runs, baseline, markdown=False):
    """One row per run; the full-split column only when some run has that figure."""
    full = any(run["full_split_val"] is not None for run in runs)
    columns = ["run", "s", "r", "mode", "steps", "final val"] + ["full-split val"] * full + [
        "data tokens", "positions", "wall (s)", "Δ val", "speed-up"]
    rows = []
    for run in runs:
        mode = "baseline" if run is baseline else "-" if run["is_baseline"] else run["mode"]
        if run is baseline:
            delta = speedup = "-"
        else:
            delta = f"{run['delta']:+.4f}"
            speedup = ("> " if run["crossing"] is None else "") + f"{run['speedup']:.2f}x"
        rows.append([run["name"], run["s"], f"{run['r']:g}", mode, steps_cell(run), f"{run['final_val']:.4f}"]
                    + [number(run["full_split_val"])] * full
                    + [f"{run['data_tokens']:,}", f"{run['positions']:,}", f"{run['wall']:.0f}", delta, speedup])
    return render(columns, rows, markdown)


def seed_table(groups, baseline, markdown=False):
    """One row per configuration: final val (and full-split val) as mean ± sample sd over its n seeds, and Δ of the
    means (of each) against the baseline's configuration, listed first."""
    groups = sorted(groups, key=lambda group: all(run is not baseline for run in group))
    full = any(run["full_split_val"] is not None for group in groups for run in group)
    columns = ["configuration", "s", "r", "mode", "n", "steps", "final val"] + ["full-split val"] * full + ["Δ val"]
    columns += ["Δ full-split"] * full
    base_mean = statistics.mean(run["final_val"] for run in groups[0])
    base_full = [run["full_split_val"] for run in groups[0]]
    rows = []
    for i, group in enumerate(groups):
        first = group[0]
        mean, sd = mean_sd([run["final_val"] for run in group])
        full_split = [run["full_split_val"] for run in group]  # every seed's, or the cell is "-"
        delta_full = "-" if i == 0 or None in full_split + base_full else (
            f"{statistics.mean(full_split) - statistics.mean(base_full):+.4f}")
        rows.append([re.sub(r"_seed\d+$", "", first["name"]), first["s"], f"{first['r']:g}",
                     "baseline" if i == 0 else first["mode"], str(len(group)),
                     steps_cell(min(group, key=lambda run: run["steps"])), number(mean, sd)]
                    + ["-" if None in full_split else number(*mean_sd(full_split))] * full
                    + ["-" if i == 0 else f"{mean - base_mean:+.4f}"] + [delta_full] * full)
    return render(columns, rows, markdown)


def number(value, sd=None):
    return "-" if value is None else f"{value:.4f}" + ("" if sd is None else f" ± {sd:.4f}")


def render(columns, rows, markdown):
    left = {0, 3}  # the name and mode are text; the rest are numbers, aligned right
    if markdown:
        lines = ["| " + " | ".join(columns) + " |",
                 "|" + "|".join(":---" if i in left else "---:" for i in range(len(columns))) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(row[i]) for row in [columns] + rows) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) if i in left else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
                     for row in [columns] + rows)


# -----------------------------------------------------------------------------
# The three plots, each in two panels: every evaluation of every run, and the end zoomed in, where runs differ by
# hundredths of a nat. Seeds of one configuration are one line, their mean, in a band from their min to their max.

PLOTS = ["val_loss_vs_steps.png", "val_loss_vs_data_tokens.png", "equal_loss.png"]
# the training loss is drawn as the mean over the 2 * 50 + 1 = 101 logged steps centred on each: a step's loss
# is noisy, by about 0.1 nats in the quick start, and a mean of 101 is within about 0.01
SMOOTHING = 50


def smoothed(points, half=SMOOTHING):
    """points [(steps, data tokens, loss)], each loss the mean over the 2 * half + 1 points centred on it (fewer at
    the ends). Centred, unlike an exponential average, it does not shift a falling curve to later steps."""
    losses = [loss for _, _, loss in points]
    windows = (losses[max(0, i - half):i + half + 1] for i in range(len(losses)))
    return [(k, tokens, sum(window) / len(window)) for (k, tokens, _), window in zip(points, windows)]


def across_seeds(curves):
    """Curves [[(steps, data tokens, y)]], one per seed, as [(steps, mean data tokens, mean y, min y, max y)] at the
    steps every seed has: a seed still training ends the configuration's curve where it ends."""
    common = set.intersection(*({k for k, _, _ in curve} for curve in curves))
    rows = []
    for at in zip(*([point for point in curve if point[0] in common] for curve in curves)):
        ys = [y for _, _, y in at]
        tokens = statistics.fmean(tokens for _, tokens, _ in at)
        rows.append((at[0][0], tokens, statistics.fmean(ys), min(ys), max(ys)))
    return rows


def lines(runs, by_seed):
    """The plots' lines for runs (the baseline first, as compare returns them), the baseline's first: one per
    configuration when seeds are averaged (by_seed, or some configuration has several seeds), else one per run. A
    line is its first run's dict with evals and train the means over its seeds of the val loss and the smoothed
    training loss, band the (min, max) of the val loss (None for one seed), and the mean's crossing and speed-up."""
    groups = seed_groups(runs)
    if not by_seed and all(len({run["config"].get("seed") for run in group}) == 1 for group in groups):
        groups = [[run] for run in runs]  # reruns of one seed are not seeds: each is its own line, as in the table
    drawn = []
    for group in groups:
        evals = across_seeds([run["evals"] for run in group])
        drawn.append(dict(
            group[0], seeds=len(group), steps=min(run["steps"] for run in group),
            name=re.sub(r"_seed\d+$", "", group[0]["name"]) if len(group) > 1 else group[0]["name"],
            evals=[e[:3] for e in evals], final_val=evals[-1][2],
            band=[[e[3] for e in evals], [e[4] for e in evals]] if len(group) > 1 else None,
            train=[p[:3] for p in across_seeds([smoothed(run["train"]) for run in group])]))
    for line in drawn[1:]:
        equal_loss(line, drawn[0])
    return drawn


def with_band(xs, line, colour):
    """The zoom's series for a line, and for its band's edges: the zoom shows the band's tail whole too."""
    return [(xs, ys, tail(line), colour) for ys in [[e[2] for e in line["evals"]], *(line["band"] or [])]]


def tail(run):
    """The index of the run's first evaluation in the second half of its last stage: the part the zoom shows whole.
    (TST's val_loss before the switch is far above the rest: token input is not what phase 1 trains on.)"""
    start = run["boundaries"][-1] if run["boundaries"] else 0
    return next((i for i, (k, _, _) in enumerate(run["evals"]) if 2 * k >= start + run["steps"]),
                len(run["evals"]) - 1)


def zoom(series):
    """The zoomed panel's limits for series [(xs, ys, first index of the tail, colour)]: in y every tail, in x every
    point that falls in that y range."""
    bottom = min(y for _, ys, _, _ in series for y in ys)
    top = max(y for _, ys, i, _ in series for y in ys[i:])
    pad = 0.06 * (top - bottom) or 0.01
    xs = [x for xs, ys, _, _ in series for x, y in zip(xs, ys) if y <= top]
    margin = 0.03 * (max(xs) - min(xs)) or 1
    return (min(xs) - margin, max(xs) + margin), (bottom - pad, top + pad)


def plot(runs, out, by_seed=False):
    """Writes the three PNGs into out for runs (the baseline first, as compare returns them) and returns their
    paths; [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib); the table has the numbers",
              file=sys.stderr)
        return []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in PLOTS]
    earlier = [path.name for path in paths if path.exists()]
    if earlier:
        print(f"replacing the earlier plots in {out}: {', '.join(earlier)}", file=sys.stderr)
    drawn = lines(runs, by_seed)
    baseline = drawn[0]
    colours = ["black" if i == 0 else f"C{i}" for i in range(len(drawn))]
    # the legend's entries for the marks on the curves, where some run has more than one stage, and for the dashes
    extra = [Line2D([], [], marker="D", color="grey", fillstyle="none", linestyle="none",
                    label="a change of stage (the switch)")] * any(line["boundaries"] for line in drawn)
    if any(line["train"] for line in drawn):
        extra.append(Line2D([], [], color="grey", linestyle="--", linewidth=0.8,
                            label=f"dashed: training loss, mean of {2 * SMOOTHING + 1} logged steps; none in TST's "
                                  f"phase 1\n(it logs the bag loss, MCE, not a next-token loss)"))
    save(plt, paths[0], figure(plt, "Equal FLOPs: validation loss by step", "steps",
                               *curves(drawn, colours, 0)), extra)
    save(plt, paths[1], figure(plt, "Equal data: validation loss by data tokens read", "data tokens",
                               *curves(drawn, colours, 1)), extra)
    save(plt, paths[2], equal_loss_figure(plt, drawn, baseline, colours))
    return paths


def label(line, baseline, band=True):
    """band=False where only the mean is drawn (a final loss in the equal-loss figure)."""
    seeds = f", mean of {line['seeds']} seeds" + " (band: their min to max)" * band if line["band"] else ""
    if line is baseline:
        return f"{line['name']} (baseline){seeds}"
    mode = "" if line["mode"] == "full" else f", {line['mode']}"
    return f"{line['name']} (s={line['s']}, r={line['r']:g}{mode}){seeds}"


def figure(plt, title, xlabel, series, draw):
    """draw(ax) in two panels, the lower one zoomed to the tails of series [(xs, ys, tail index, colour)], with a
    mark on its top edge for a point above it."""
    from matplotlib.ticker import EngFormatter
    fig, (whole, end) = plt.subplots(2, 1, figsize=(8, 9), height_ratios=[2, 3])
    # fixed margins, which fit these labels: a layout engine would double the time to draw
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.06, top=0.93, hspace=0.25)
    fig.suptitle(title)
    whole.set_title("every evaluation", fontsize="medium")
    end.set_title("the end: the second half of every run's last stage (△ a point above this range)",
                  fontsize="medium")
    for ax in (whole, end):
        draw(ax)
        ax.set(xlabel=xlabel, ylabel="validation loss (next token, nats)")
        ax.grid(alpha=0.3)
        if xlabel == "data tokens":
            ax.xaxis.set_major_formatter(EngFormatter())
    (left, right), (low, high) = zoom(series)
    end.set(xlim=(left, right), ylim=(low, high))
    for xs, ys, _, colour in series:
        # where the curve comes in from above, and every spike after that (the upper panel shows the rest)
        first = next(i for i, y in enumerate(ys) if y <= high)
        above = [x for i, (x, y) in enumerate(zip(xs, ys)) if y > high and i >= first - 1 and left <= x <= right]
        if above:
            end.plot(above, [high] * len(above), "^", color=colour, fillstyle="none", clip_on=False)
    return fig


def save(plt, path, fig, legend_extra=()):
    whole = fig.axes[0]
    whole.legend(handles=whole.get_legend_handles_labels()[0] + list(legend_extra), fontsize="small")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curves(drawn, colours, which):
    """Every line's val loss by steps (which 0) or by data tokens (1), its band, its training loss dashed: their
    series and draw(ax), which also marks each stage boundary on the line."""
    series = []
    for line, colour in zip(drawn, colours):
        series += with_band([e[which] for e in line["evals"]], line, colour)

    def draw(ax):
        for line, colour in zip(drawn, colours):
            xs = [e[which] for e in line["evals"]]
            ax.plot(xs, [e[2] for e in line["evals"]], marker=".", color=colour, label=label(line, drawn[0]))
            if line["band"]:
                ax.fill_between(xs, *line["band"], color=colour, alpha=0.2, linewidth=0)
            # from the first evaluation on: the first steps' loss (about ln of the vocabulary) would squash the rest
            train = [p for p in line["train"] if p[0] >= line["evals"][0][0]]
            ax.plot([p[which] for p in train], [p[2] for p in train], "--", color=colour, linewidth=0.8)
            at = [(e[which], e[2]) for e in line["evals"] if e[0] in line["boundaries"]]
            if at:
                ax.plot(*zip(*at), "D", color=colour, fillstyle="none", markersize=8)
    return series, draw


def equal_loss_figure(plt, runs, baseline, colours):
    """The baseline's curve (and band), each run's final loss as a line, and where the baseline gets there (the
    speed-up)."""
    steps, _, val = zip(*baseline["evals"])
    others = [(run, colour) for run, colour in zip(runs, colours) if run is not baseline]
    # besides the baseline's curve, the zoom shows where each run ends and where the baseline gets there
    series = with_band(steps, baseline, "black")
    series += [([run["evals"][-1][0]], [run["final_val"]], 0, colour) for run, colour in others]
    series += [([run["crossing"]], [run["final_val"]], 0, colour) for run, colour in others
               if run["crossing"] is not None]

    def draw(ax):
        ax.plot(steps, val, marker=".", color="black", label=label(baseline, baseline))
        if baseline["band"]:
            ax.fill_between(steps, *baseline["band"], color="black", alpha=0.15, linewidth=0)
        for run, colour in others:
            n, _, loss = run["evals"][-1]
            ax.axhline(loss, color=colour, linestyle="--", linewidth=1,
                       label=f"{label(run, baseline, band=False)}: {loss:.4f} at {n} steps")
            ax.plot(n, loss, marker="s", color=colour)  # where the run got to its final loss
            if run["crossing"] is not None:
                ax.plot(run["crossing"], loss, marker="o", markersize=10, fillstyle="none", color=colour)

    fig = figure(plt, "Equal loss: baseline steps to each run's final loss", "steps", series, draw)
    end = fig.axes[1]
    for run, colour in others:  # the speed-up, in the zoom only: at the end the upper panel has no room
        at, bound = (baseline["steps"], "> ") if run["crossing"] is None else (run["crossing"], "")
        side = -1 if at > sum(end.get_xlim()) / 2 else 1  # the label on the side with room
        end.annotate(f"{bound}{run['speedup']:.2f}x", (at, run["final_val"]), xytext=(6 * side, 6),
                     textcoords="offset points", ha="right" if side < 0 else "left", color=colour)
    return fig


# -----------------------------------------------------------------------------
# Sweeps: the baseline and every (s, r, mode) once per seed, one run after another

def run_state(out_dir):
    """new | done | resume, from what an earlier (possibly interrupted) sweep left in out_dir."""
    log = out_dir / "log.jsonl"
    records = read_log(log) if log.is_file() else []
    if not records:
        return "new"
    if records[-1]["step"] == read_config(out_dir)["max_steps"] - 1:
        return "done"
    if (out_dir / "ckpt.pt").exists():
        return "resume"
    # train.py appends to an existing log, so starting over here would mix two runs in one log
    raise UserError(f"{out_dir} holds an unfinished log.jsonl but no checkpoint (ckpt.pt) to resume from: "
                    f"delete the folder to start that run over")


def command_line(script, args, torchrun):
    if torchrun:
        return shlex.join(["torchrun", f"--nproc_per_node={torchrun}", script, "--", *args])
    return shlex.join(["python", script, *args])


def sweep_jobs(args):
    """[(out_dir name, s, r, variant, train.py settings)], seed by seed, each seed's baseline first. The variant is
    a tst_mode, or "reinit" (full, with the embedding and LM head re-initialised at the switch)."""
    variants = args.modes + ["reinit"] * args.reinit
    jobs = []
    for seed in args.seeds or [None]:
        tail = "" if seed is None else f"_seed{seed}"
        seed_setting = [] if seed is None else [f"--seed={seed}"]
        jobs.append(("baseline" + tail, 1, 0.0, "baseline", ["--s=1", "--r=0"] + seed_setting))
        for s in args.s:
            for r in args.r:
                for variant in variants:
                    name = f"s{s}_r{r:g}" + ("" if variant == "full" else f"_{variant}") + tail
                    mode = ["--tst_mode=full", "--reinit_at_switch=True"] if variant == "reinit" else [
                        f"--tst_mode={variant}"]
                    jobs.append((name, s, r, variant, [f"--s={s}", f"--r={r:g}", *mode, *seed_setting]))
    return jobs


def summary(root, jobs):
    """Every configuration's final val as mean ± sd over its seeds, Table 4's grid of the full-mode means by s and r,
    then every run."""
    runs = [load_run(root / name) for name, *_ in jobs]
    baseline = runs[0]
    means = {}
    for (_, s, r, variant, _), run in zip(jobs, runs):
        means.setdefault((s, r, variant), []).append(run["final_val"])
    means = {key: statistics.mean(values) for key, values in means.items()}
    base = means[1, 0.0, "baseline"]
    lines = [f"# Sweep in {root}", "",
             "Final validation loss by configuration: mean ± sample standard deviation over its n seeds; Δ is the "
             "difference of the means from the baseline's.", "",
             seed_table(seed_groups(runs), baseline, markdown=True)]
    s_values = sorted({s for s, _, variant in means if variant == "full"})
    r_values = sorted({r for _, r, variant in means if variant == "full"})
    if len(s_values) * len(r_values) > 1:  # a grid of one cell would repeat the table
        lines += ["", f"Mode full, mean final val loss by s and r (Δ vs the baseline, s=1: {base:.4f}):", "",
                  "| s \\ r | " + " | ".join(f"{r:g}" for r in r_values) + " |",
                  "|---:|" + "---:|" * len(r_values),
                  "| 1 (baseline) | " + " | ".join(f"{base:.4f}" for _ in r_values) + " |"]
        for s in s_values:
            finals = [means[s, r, "full"] for r in r_values]
            lines.append(f"| {s} | " + " | ".join(f"{v:.4f} ({v - base:+.4f})" for v in finals) + " |")
    lines += ["", "Every run (Δ and speed-up against the first baseline):", "",
              table(compare(runs, baseline), baseline, markdown=True)]
    return "\n".join(lines) + "\n"


def sweep(argv):
    import tst  # TST: the modes' one list (imported here: tst imports torch, which the table and plots do without)
    p = argparse.ArgumentParser(
        prog="compare.py sweep", description=(
            "Train the baseline (s=1, r=0) and every (s, r, mode) once per seed, one after another, each as "
            "python train.py CONFIG --s=S --r=R --tst_mode=MODE [--seed=SEED] --out_dir=OUT_ROOT/NAME [--KEY=VALUE]; "
            "then write OUT_ROOT/summary.md. NAME is sS_rR, with _MODE for input and output, _reinit for the "
            "re-initialisation ablation, _seedSEED with --seeds. A finished run is skipped and one with a "
            "checkpoint resumes, so the same command continues an interrupted sweep; once everything has run "
            "it only writes the summary. The config's s_schedule, if it has one, must be empty."))
    p.add_argument("--config", required=True, help="a train.py config file, e.g. config/tiny_tst.py")
    p.add_argument("--s", type=int, nargs="+", required=True, help="bag sizes, each >= 2")
    p.add_argument("--r", type=float, nargs="+", required=True, help="phase-1 fractions, each in (0, 1)")
    p.add_argument("--modes", nargs="+", default=["full"],
                   choices=tst.MODES,  # TST
                   help="tst_mode of the TST runs (default: full); input and output are the paper's ablations")
    p.add_argument("--reinit", action="store_true", help="also a full run with the input embedding and LM head "
                   "re-initialised at the switch (reinit_at_switch=True, the paper's ablation)")
    p.add_argument("--seeds", type=int, nargs="+", help="run each configuration once per seed (default: the "
                   "config's seed, and names without _seedSEED)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="more train.py settings for every run, passed on as --KEY=VALUE")
    p.add_argument("--out_root", default="runs/sweep", help="the runs' parent folder (default runs/sweep)")
    p.add_argument("--full_split_eval", action="store_true", help="after training, score each run's final "
                   f"checkpoint on the whole validation split (python eval.py --ckpt RUN/ckpt.pt "
                   f"{shlex.join(FULL_SPLIT_EVAL)}); the summary shows it beside the in-training final val")
    p.add_argument("--torchrun", type=int, metavar="N", help="print the commands for torchrun with N processes "
                   "(after a -- that keeps torchrun from reading the script's options)")
    p.add_argument("--dry_run", action="store_true", help="print the commands instead of running them")
    args = p.parse_args(argv)
    if args.torchrun is not None and args.torchrun < 1:
        raise UserError(f"--torchrun {args.torchrun}: the number of processes per node must be >= 1")
    if not Path(args.config).is_file():
        raise UserError(f"config file {args.config} not found")
    if any(s < 2 for s in args.s) or any(not 0 < r < 1 for r in args.r):
        raise UserError(f"--s {' '.join(map(str, args.s))} --r {' '.join(f'{r:g}' for r in args.r)}: TST needs "
                        f"s >= 2 and 0 < r < 1; the baseline (s=1, r=0) is run anyway")
    if len(set(args.seeds or [])) < len(args.seeds or []):
        raise UserError(f"--seeds {' '.join(map(str, args.seeds))}: a seed is repeated")
    overrides = []
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item}: write KEY=VALUE")
        own = {"s": "--s", "r": "--r", "tst_mode": "--modes", "reinit_at_switch": "--reinit", "seed": "--seeds",
               "out_dir": "--out_root", "resume": "rerunning the sweep"}
        if key in own:
            raise UserError(f"--set {item}: the sweep sets {key} itself; use {own[key]}")
        overrides.append(f"--{key}={value}")

    root = Path(args.out_root)
    jobs = sweep_jobs(args)
    print_only = args.dry_run or args.torchrun is not None
    states = [run_state(root / name) for name, *_ in jobs]  # first, so a bad folder stops the sweep before any run
    for (name, *_, settings), state in zip(jobs, states):
        out = root / name
        if state == "done":
            print(f"# finished: {out}")
            continue
        cmd = [args.config, *settings, f"--out_dir={out}", *overrides] + ["--resume=True"] * (state == "resume")
        if print_only:
            print(command_line("train.py", cmd, args.torchrun))
            continue
        print(f"==> {command_line('train.py', cmd, None)}", flush=True)
        if subprocess.run([sys.executable, str(ROOT / "train.py"), *cmd]).returncode != 0:
            raise UserError(f"train.py stopped on {out} (its message is above); fix the cause and run the sweep "
                            f"again: finished runs are skipped and interrupted ones resume")
    to_score = jobs if args.full_split_eval else []
    for (name, *_), state in zip(to_score, states):
        out = root / name
        trained = state == "done" or not print_only  # when only printing, the other runs do not exist yet
        if trained and load_run(out)["full_split_val"] is not None:
            continue
        cmd = ["--ckpt", str(out / "ckpt.pt"), *FULL_SPLIT_EVAL]
        if print_only:
            print(command_line("eval.py", cmd, None))
            continue
        print(f"==> {command_line('eval.py', cmd, None)}", flush=True)
        if subprocess.run([sys.executable, str(ROOT / "eval.py"), *cmd]).returncode != 0:
            raise UserError(f"eval.py stopped on {out} (its message is above); fix the cause and run the sweep "
                            f"again: finished runs and evaluations are skipped")
    if print_only:
        print(f"# when these have finished, run this sweep again without --dry_run/--torchrun: it writes "
              f"{root / 'summary.md'}")
        return
    text = summary(root, jobs)
    (root / "summary.md").write_text(text)
    print(text, end="")
    print(f"wrote {root / 'summary.md'}")


# -----------------------------------------------------------------------------

def main(argv):
    if argv[:1] == ["sweep"]:
        return sweep(argv[1:])
    p = argparse.ArgumentParser(prog="compare.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="train.py out_dirs (config.json, log.jsonl)")
    p.add_argument("--baseline", metavar="RUN_DIR", help="the run to compare against (default: the one run whose "
                   "log has no phase-1 step)")
    p.add_argument("--by_seed", action="store_true", help="one row per configuration: runs whose settings differ "
                   "only by seed as mean ± sample sd over their n seeds (the plots draw such seeds as their mean in "
                   "a min-max band even without it)")
    p.add_argument("--out", help="folder for the PNGs (default: the first run's parent folder, or ./plots when "
                   "that is the current folder)")
    p.add_argument("--markdown", action="store_true", help="print the table in Markdown")
    args = p.parse_args(argv)
    folders = [folder for folder in args.runs
               if not args.baseline or Path(folder).resolve() != Path(args.baseline).resolve()]
    runs = [load_run(folder) for folder in ([args.baseline] if args.baseline else []) + folders]
    baseline = runs[0] if args.baseline else find_baseline(runs, args.by_seed)
    runs = compare(runs, baseline)
    if args.by_seed:
        print(seed_table(seed_groups(runs), baseline, markdown=args.markdown))
    else:
        print(table(runs, baseline, markdown=args.markdown))
    out = args.out or Path(args.runs[0]).resolve().parent
    if not args.out and out == Path.cwd():
        out = Path("plots")
    for path in plot(runs, out, args.by_seed):
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
