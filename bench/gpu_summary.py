"""The summary of bench/gpu.sh: its four JSON files -> OUT/gpu.json (all of them) and OUT/gpu.md (the tables).

    python bench/gpu_summary.py OUT
"""

import json
import sys
from pathlib import Path


def number(value, form):
    return "n/a" if value is None else format(value, form)


def tables(figures):
    lines = [f"GPU: {figures['gpu']}", "", "| run | step | ms | positions/s | MFU | peak GiB |",
             "|---|---|---:|---:|---:|---:|"]
    for name in ("step_270m", "step_10b_a1b_6layers"):
        run = figures[name]
        for phase, r in run["phases"].items():
            mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            lines.append(f"| {run['config']} ({run['batch_size']} rows, {run['n_layers']} layers) | {phase} | "
                         f"{r['ms']:.1f} | {r['positions_per_sec']:,.0f} | {mfu} | "
                         f"{number(r['peak_memory_gib'], '.1f')} |")
        lines.append(f"| | phase 1 / baseline | {run['ratio']:.3f} | | | |")
    head = figures["head"]
    cases = [c for c in ("logits", "chunked", "fused") if c in head["rows"][0]]
    lines += ["", f"LM head + loss, {head['args']['positions']:,} positions, V = {head['args']['vocab']:,}, "
                  f"{head['args']['dtype']}:", "",
              "| s | " + " | ".join(f"{c} ms | {c} MB" for c in cases) + " |", "|---:|" + "---:|---:|" * len(cases)]
    for row in head["rows"]:
        lines.append(f"| {row['s']} | " + " | ".join(f"{row[c]['ms']:.1f} | {row[c]['peak_mb']:.0f}" for c in cases)
                     + " |")
    lines += ["", f"MCE against one cross-entropy, {figures['mce']['args']['positions']:,} positions:", "",
              "| s | CE ms | MCE ms | MCE / CE |", "|---:|---:|---:|---:|"]
    for row in figures["mce"]["rows"]:
        lines.append(f"| {row['s']} | {row['ce']['ms']:.2f} | {row['mce']['ms']:.2f} | "
                     f"{row['mce']['ms'] / row['ce']['ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main(out):
    out = Path(out)
    figures = {name: json.loads((out / f"{name}.json").read_text())
               for name in ("step_270m", "step_10b_a1b_6layers", "head", "mce")}
    figures["gpu"] = (out / "gpu.txt").read_text().strip().replace("\n", "; ")
    (out / "gpu.json").write_text(json.dumps(figures, indent=1))
    text = tables(figures)
    (out / "gpu.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main(sys.argv[1])
