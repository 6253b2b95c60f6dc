"""
Compare train.py runs the three ways the paper does (equal FLOPs, equal data, equal loss), and sweep s and r.

    python compare.py runs/baseline runs/tst                   # table; PNGs beside the runs (needs matplotlib)
    python compare.py runs/sweep/* --markdown --out plots      # the table in Markdown, the PNGs in plots/
    python compare.py sweep --config config/tiny_tst.py --s 2 4 8 --r 0.2 0.3 --set max_steps=2000
    python compare.py sweep --config config/270m_tst.py --s 4 6 8 --r 0.3 --torchrun 8   # prints the commands

A run is a train.py out_dir: config.json (its settings) and log.jsonl (one line per step, val_loss on
evaluation steps). A run still training can be read: its last complete line counts. The baseline is the run
with s = 1 or r = 0 in its config.json (or --baseline); every other run is compared with it.

The table, one row per run:
  steps        optimizer steps done ("k/N" while the run is unfinished). Every step processes the same
               positions, so equal steps are equal FLOPs (a warning says when two runs differ).
  final val    the last evaluation's val_loss: held-out next-token loss on token input, comparable across
               runs and phases (the training loss is MCE in phase 1 and is not).
  data tokens  data tokens read: s per position in phase 1, one in phase 2 (equal data compares these).
  positions    positions the transformer processed (what FLOPs count).
  wall (s)     the sum of the logged step times dt: training only, train.py leaves evaluations out.
  Δ val        final val minus the baseline's final val; negative means lower than the baseline.
  speed-up     equal loss. L is the run's final val loss and N its steps at that evaluation; k is the first
               baseline evaluation (k = step + 1 steps done) with val_loss <= L. speed-up = k / N. It is read
               at evaluations, without interpolation, so it can overstate by less than one baseline
               eval_interval / N. If the baseline never gets to L: "> K/N", K the baseline's steps, a lower
               bound. Caveat: at step k the baseline is mid-schedule (its learning rate has not decayed yet),
               so its loss is above that of a k-step run with its own decay, and the speed-up can be
               overstated; for a strict number, train baselines of several lengths and compare final losses,
               as the paper did (3B: TST at 20k steps matched a 36k-step baseline, 1.8x).

Plots (matplotlib is optional: pip install matplotlib), written to --out: val_loss_vs_steps.png (equal FLOPs;
a dotted line at each TST run's switch to phase 2), val_loss_vs_data_tokens.png (equal data) and
equal_loss.png (the baseline's curve, each run's final loss as a dashed line, the crossing circled). The y
axis is cut at the baseline's loss after 10% of its steps: the differences that matter are hundredths of a nat.

Sweep: the baseline (s=1, r=0) and every (s, r) pair, one after another, each as
    python train.py CONFIG --s=S --r=R --out_dir=OUT_ROOT/sS_rR [--key=value ...]
(the baseline in OUT_ROOT/baseline). A run whose log reaches max_steps is skipped and one with a checkpoint
resumes (--resume=True), so an interrupted sweep continues where it stopped. --dry_run prints the commands
instead; --torchrun N prints them for torchrun, after a "--" that keeps torchrun's parser from reading --s and
--r as its own options. Once those have finished, the same sweep without --dry_run/--torchrun runs nothing
and writes the summary: OUT_ROOT/summary.md, the final val loss by s (rows) and r (columns) as the paper's
Table 4, then the table above for every run.
"""

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

TRAIN = Path(__file__).with_name("train.py")


# -----------------------------------------------------------------------------
# Reading runs

def load_run(folder):
    """A run's settings and its evaluations [(steps done, data tokens, val_loss)], with the table's totals."""
    folder = Path(folder)
    for name in ("config.json", "log.jsonl"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: no {name}; a run folder is a train.py out_dir "
                                    f"(config.json and log.jsonl)")
    config = json.loads((folder / "config.json").read_text())
    log = read_log(folder / "log.jsonl")
    evals = [(r["step"] + 1, r["data_tokens"], r["val_loss"]) for r in log if "val_loss" in r]
    if not evals:
        raise ValueError(f"{folder}: no evaluation in log.jsonl yet (val_loss is logged every "
                         f"eval_interval={config.get('eval_interval')} steps and at the end)")
    phase2 = [r["step"] for r in log if r["phase"] == 2]
    return dict(
        name=folder.name, folder=folder, s=config["s"], r=config["r"], mode=config["tst_mode"],
        max_steps=config["max_steps"], steps=log[-1]["step"] + 1, evals=evals, final_val=evals[-1][2],
        data_tokens=log[-1]["data_tokens"], positions=log[-1]["positions"], wall=sum(r["dt"] for r in log),
        # the first phase-2 step = phase-1 steps done; None for a baseline or a run still in phase 1
        switch=phase2[0] if phase2 and log[0]["phase"] == 1 else None)


def read_log(path):
    # Split on newlines and drop the last piece: it is empty when the file ends with a newline, or a line that
    # a running train.py is still writing.
    records = []
    for i, line in enumerate(path.read_text().split("\n")[:-1], 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {i}: not a JSON line ({e})") from None
    return records


def is_baseline(run):
    return run["s"] == 1 or run["r"] == 0


def find_baseline(runs):
    found = [run for run in runs if is_baseline(run)]
    if not found:
        raise ValueError(f"no baseline among {', '.join(str(run['folder']) for run in runs)}: a baseline has "
                         f"s=1 or r=0 in its config.json; add one, or name one with --baseline RUN_DIR")
    if len(found) > 1:
        raise ValueError(f"several baselines ({', '.join(str(run['folder']) for run in found)}): "
                         f"choose one with --baseline RUN_DIR")
    return found[0]


# -----------------------------------------------------------------------------
# The numbers: Δ final val loss and the equal-loss speed-up (definitions in the docstring above)

def compare(runs, baseline):
    """Adds delta, speedup and crossing (the baseline's steps at L, None if it never gets there) to each
    run but the baseline; returns the runs, the baseline first."""
    per_step = baseline["positions"] / baseline["steps"]
    for run in runs:
        if run is baseline:
            continue
        if run["positions"] / run["steps"] != per_step:
            print(f"warning: {run['name']} processes {run['positions'] / run['steps']:,.0f} positions per step, "
                  f"the baseline {per_step:,.0f}: their steps are not equal FLOPs", file=sys.stderr)
        steps, _, loss = run["evals"][-1]
        run["delta"] = loss - baseline["final_val"]
        run["crossing"] = next((k for k, _, v in baseline["evals"] if v <= loss), None)
        run["speedup"] = (baseline["steps"] if run["crossing"] is None else run["crossing"]) / steps
    return [baseline] + [run for run in runs if run is not baseline]


COLUMNS = ["run", "s", "r", "mode", "steps", "final val", "data tokens", "positions", "wall (s)", "Δ val",
           "speed-up"]


def table(runs, baseline, markdown=False):
    rows = []
    for run in runs:
        mode = "baseline" if run is baseline else "-" if is_baseline(run) else run["mode"]
        steps = str(run["steps"]) if run["steps"] >= run["max_steps"] else f"{run['steps']}/{run['max_steps']}"
        if run is baseline:
            delta = speedup = "-"
        else:
            delta = f"{run['delta']:+.4f}"
            speedup = ("> " if run["crossing"] is None else "") + f"{run['speedup']:.2f}x"
        rows.append([run["name"], str(run["s"]), f"{run['r']:g}", mode, steps, f"{run['final_val']:.4f}",
                     f"{run['data_tokens']:,}", f"{run['positions']:,}", f"{run['wall']:.0f}", delta, speedup])
    left = {0, 3}  # run and mode are text; the rest are numbers, aligned right
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |",
                 "|" + "|".join(":---" if i in left else "---:" for i in range(len(COLUMNS))) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(row[i]) for row in [COLUMNS] + rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) if i in left else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
                     for row in [COLUMNS] + rows)


# -----------------------------------------------------------------------------
# The three plots

def plot(runs, baseline, out):
    """Writes the three PNGs into out and returns their paths; [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib); the table has the numbers",
              file=sys.stderr)
        return []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    colours = ["black" if run is baseline else f"C{i}" for i, run in enumerate(runs)]
    # Zoom: every curve starts near log(vocab_size) and would squash the end of training into a flat line.
    top = next(v for k, _, v in baseline["evals"] if k >= 0.1 * baseline["steps"])
    top = max(top, *(run["final_val"] for run in runs))
    bottom = min(v for run in runs for _, _, v in run["evals"])
    pad = 0.1 * (top - bottom) or 0.05  # room for the speed-up labels
    paths = []

    def label(run):
        return f"{run['name']} (baseline)" if run is baseline else f"{run['name']} (s={run['s']}, r={run['r']:g})"

    def figure(title, xlabel):
        fig, ax = plt.subplots(figsize=(8, 5))
        ax.set(title=title, xlabel=xlabel, ylabel="validation loss (next token, nats)",
               ylim=(bottom - pad, top + pad))
        ax.grid(alpha=0.3)
        return fig, ax

    def save(fig, ax, name):
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        paths.append(out / name)

    fig, ax = figure("Equal FLOPs: validation loss by step (dotted: switch to phase 2)", "steps")
    for run, colour in zip(runs, colours):
        steps, _, val = zip(*run["evals"])
        ax.plot(steps, val, marker=".", color=colour, label=label(run))
        if run["switch"] is not None:
            ax.axvline(run["switch"], color=colour, linestyle=":", linewidth=1)
    save(fig, ax, "val_loss_vs_steps.png")

    fig, ax = figure("Equal data: validation loss by data tokens read", "data tokens")
    for run, colour in zip(runs, colours):
        _, tokens, val = zip(*run["evals"])
        ax.plot(tokens, val, marker=".", color=colour, label=label(run))
    save(fig, ax, "val_loss_vs_data_tokens.png")

    fig, ax = figure("Equal loss: baseline steps to each run's final loss", "steps")
    steps, _, val = zip(*baseline["evals"])
    ax.plot(steps, val, marker=".", color="black", label=label(baseline))
    for run, colour in zip(runs, colours):
        if run is baseline:
            continue
        n, _, loss = run["evals"][-1]
        ax.axhline(loss, color=colour, linestyle="--", linewidth=1, label=f"{label(run)}: {loss:.4f} at {n} steps")
        ax.plot(n, loss, marker="s", color=colour)  # where the run got to its final loss
        if run["crossing"] is not None:
            ax.plot(run["crossing"], loss, marker="o", markersize=10, fillstyle="none", color=colour)
            ax.annotate(f"{run['speedup']:.2f}x", (run["crossing"], loss), xytext=(6, 6),
                        textcoords="offset points", color=colour)
        else:
            ax.annotate(f"> {run['speedup']:.2f}x", (baseline["steps"], loss), xytext=(6, 6),
                        textcoords="offset points", color=colour)
    save(fig, ax, "equal_loss.png")
    return paths


# -----------------------------------------------------------------------------
# The sweep over s and r

def run_state(out_dir):
    """new | done | resume, from what an earlier (possibly interrupted) sweep left in out_dir."""
    log = out_dir / "log.jsonl"
    records = read_log(log) if log.is_file() else []
    if not records:
        return "new"
    max_steps = json.loads((out_dir / "config.json").read_text())["max_steps"]
    if records[-1]["step"] == max_steps - 1:
        return "done"
    if (out_dir / "ckpt.pt").exists():
        return "resume"
    # train.py appends to an existing log, so starting over here would mix two runs in one log
    raise ValueError(f"{out_dir} holds an unfinished log.jsonl but no checkpoint (ckpt.pt) to resume from: "
                     f"delete the folder to start that run over")


def command_line(args, torchrun):
    if torchrun:
        return shlex.join(["torchrun", f"--nproc_per_node={torchrun}", "train.py", "--", *args])
    return shlex.join(["python", "train.py", *args])


def summary(root, jobs, s_values, r_values):
    """Table 4's grid: final val loss (Δ vs the baseline) by s and r; then the full table."""
    runs = {(s, r): load_run(root / name) for name, s, r in jobs}
    baseline = runs[1, 0.0]
    base = baseline["final_val"]
    lines = [f"# Sweep in {root}: final validation loss by s and r", "",
             f"Each cell: final val loss (Δ vs the baseline, s=1: {base:.4f}); at s=1 r plays no part.", "",
             "| s \\ r | " + " | ".join(f"{r:g}" for r in r_values) + " |",
             "|---:|" + "---:|" * len(r_values),
             "| 1 (baseline) | " + " | ".join(f"{base:.4f}" for _ in r_values) + " |"]
    for s in s_values:
        finals = [runs[s, r]["final_val"] for r in r_values]
        lines.append(f"| {s} | " + " | ".join(f"{v:.4f} ({v - base:+.4f})" for v in finals) + " |")
    ordered = compare(list(runs.values()), baseline)
    return "\n".join(lines + ["", table(ordered, baseline, markdown=True)]) + "\n"


def sweep(argv):
    p = argparse.ArgumentParser(prog="compare.py sweep", description="Train the baseline and every (s, r) pair, "
                                "then write OUT_ROOT/summary.md (python compare.py --help for the details).")
    p.add_argument("--config", required=True, help="a train.py config file, e.g. config/tiny_tst.py")
    p.add_argument("--s", type=int, nargs="+", required=True, help="bag sizes, each >= 2")
    p.add_argument("--r", type=float, nargs="+", required=True, help="phase-1 fractions, each in (0, 1)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="more train.py settings for every run, passed on as --KEY=VALUE")
    p.add_argument("--out_root", default="runs/sweep", help="each run goes to OUT_ROOT/sS_rR (default runs/sweep)")
    p.add_argument("--torchrun", type=int, metavar="N", help="print torchrun commands for N processes per node")
    p.add_argument("--dry_run", action="store_true", help="print the commands instead of running them")
    args = p.parse_args(argv)
    if args.torchrun is not None and args.torchrun < 1:
        raise ValueError(f"--torchrun {args.torchrun}: the number of processes per node must be >= 1")
    if not Path(args.config).is_file():
        raise FileNotFoundError(f"config file {args.config} not found")
    if any(s < 2 for s in args.s) or any(not 0 < r < 1 for r in args.r):
        raise ValueError(f"--s {args.s} --r {args.r}: TST needs s >= 2 and 0 < r < 1; the baseline (s=1, r=0) "
                         f"is run once anyway")
    overrides = []
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item}: write KEY=VALUE")
        if key in ("s", "r", "out_dir", "resume"):
            raise ValueError(f"--set {item}: the sweep sets {key} itself")
        overrides.append(f"--{key}={value}")

    root = Path(args.out_root)
    jobs = [("baseline", 1, 0.0)] + [(f"s{s}_r{r:g}", s, r) for s in args.s for r in args.r]
    print_only = args.dry_run or args.torchrun is not None
    states = [run_state(root / name) for name, _, _ in jobs]  # first, so a bad folder stops the sweep before any run
    for (name, s, r), state in zip(jobs, states):
        out = root / name
        if state == "done":
            print(f"# finished: {out}")
            continue
        cmd = [args.config, f"--s={s}", f"--r={r:g}", f"--out_dir={out}", *overrides]
        cmd += ["--resume=True"] if state == "resume" else []
        if print_only:
            print(command_line(cmd, args.torchrun))
            continue
        print(f"==> {command_line(cmd, None)}", flush=True)
        result = subprocess.run([sys.executable, str(TRAIN), *cmd])
        if result.returncode != 0:
            raise RuntimeError(f"train.py exited with {result.returncode} for {out}; fix the cause and run the sweep "
                               f"again: finished runs are skipped and interrupted ones resume")
    if print_only:
        if set(states) != {"done"}:
            print(f"# when these have finished, run this sweep again without --dry_run/--torchrun: it writes "
                  f"{root / 'summary.md'}")
        return
    text = summary(root, jobs, args.s, args.r)
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
    p.add_argument("--baseline", metavar="RUN_DIR", help="the run to compare against (default: the one run with "
                   "s=1 or r=0)")
    p.add_argument("--out", help="folder for the PNGs (default: the first run's parent folder, or ./plots when "
                   "that is the current folder)")
    p.add_argument("--markdown", action="store_true", help="print the table in Markdown")
    args = p.parse_args(argv)
    folders = [folder for folder in args.runs
               if not args.baseline or Path(folder).resolve() != Path(args.baseline).resolve()]
    runs = [load_run(folder) for folder in ([args.baseline] if args.baseline else []) + folders]
    baseline = runs[0] if args.baseline else find_baseline(runs)
    runs = compare(runs, baseline)
    print(table(runs, baseline, markdown=args.markdown))
    out = args.out or Path(args.runs[0]).resolve().parent
    if not args.out and out == Path.cwd():
        out = Path("plots")
    for path in plot(runs, baseline, out):
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
