"""compare.py on hand-made run folders: the table's numbers checked by hand, the plots, the sweep's commands."""

import json
import math
import subprocess
from pathlib import Path

import pytest

import compare

POSITIONS = 1000  # per step, in every run


def fake_run(folder, s, r, vals, eval_interval=100, steps=None, dt=0.5, finish=True, positions=POSITIONS):
    """A run folder as train.py leaves it: val_loss vals[i] after (i+1)*eval_interval steps; phase 1 reads s data
    tokens per position. steps < max_steps makes a run still training (finish=False: a half-written last line)."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    max_steps = eval_interval * len(vals)
    config = dict(s=s, r=r, tst_mode="full", weights="uniform", max_steps=max_steps, seq_len=8,
                  eval_interval=eval_interval)
    (folder / "config.json").write_text(json.dumps(config))
    switch = 0 if s == 1 else math.floor(r * max_steps)
    lines, data_tokens = [], 0
    for step in range(max_steps if steps is None else steps):
        phase = 1 if step < switch else 2
        data_tokens += positions * (s if phase == 1 else 1)
        record = dict(step=step, phase=phase, loss=9.9, positions=positions * (step + 1), data_tokens=data_tokens,
                      dt=dt)
        if (step + 1) % eval_interval == 0:
            record["val_loss"] = vals[(step + 1) // eval_interval - 1]
        lines.append(json.dumps(record) + "\n")
    text = "".join(lines) + ("" if finish else '{"step": 9999, "pha')
    (folder / "log.jsonl").write_text(text)
    return folder


@pytest.fixture
def runs(tmp_path):
    """The brief's example: a 400-step baseline, and two 200-step TST runs (s=4, r=0.25: 50 phase-1 steps)."""
    return dict(
        base=fake_run(tmp_path / "base", 1, 0.0, [3.0, 2.5, 2.2, 2.0]),
        tst=fake_run(tmp_path / "tst", 4, 0.25, [2.6, 2.2], dt=0.25),
        better=fake_run(tmp_path / "better", 4, 0.25, [2.6, 1.9]),
    )


def load(*folders):
    loaded = [compare.load_run(f) for f in folders]
    baseline = compare.find_baseline(loaded)
    return {run["name"]: run for run in compare.compare(loaded, baseline)}, baseline


def test_final_loss_data_tokens_positions_and_wall_clock(runs):
    table, _ = load(runs["base"], runs["tst"])
    tst = table["tst"]
    assert tst["final_val"] == 2.2 and tst["steps"] == 200
    assert tst["data_tokens"] == 50 * 1000 * 4 + 150 * 1000  # 50 steps of bags, 150 of tokens
    assert tst["positions"] == 200 * 1000  # the same as a baseline's 200 steps: equal FLOPs
    assert tst["wall"] == pytest.approx(200 * 0.25)
    assert tst["switch"] == 50 and table["base"]["switch"] is None
    assert table["base"]["data_tokens"] == table["base"]["positions"] == 400 * 1000
    assert table["base"]["wall"] == pytest.approx(400 * 0.5)


def test_equal_loss_speedup_is_the_first_baseline_evaluation_at_or_below_the_final_loss(runs):
    table, _ = load(runs["base"], runs["tst"])
    # baseline 3.0, 2.5, 2.2, 2.0 after 100..400 steps; TST ends at 2.2 after 200: 300 / 200
    assert table["tst"]["crossing"] == 300
    assert table["tst"]["speedup"] == 1.5
    assert table["tst"]["delta"] == pytest.approx(2.2 - 2.0)


def test_a_baseline_that_never_gets_there_gives_a_lower_bound(runs):
    table, _ = load(runs["base"], runs["better"])
    assert table["better"]["crossing"] is None
    assert table["better"]["speedup"] == 400 / 200  # "> 2.00x": the baseline's steps / TST's
    assert table["better"]["delta"] == pytest.approx(1.9 - 2.0)


def test_the_printed_table(runs, tmp_path, capsys):
    compare.main([str(runs["base"]), str(runs["tst"]), str(runs["better"]), "--out", str(tmp_path / "plots")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["run", "s", "r", "mode", "steps"]
    assert lines[1].split() == ["base", "1", "0", "baseline", "400", "2.0000", "400,000", "400,000", "200", "-", "-"]
    assert lines[2].split() == ["tst", "4", "0.25", "full", "200", "2.2000", "350,000", "200,000", "50", "+0.2000",
                                "1.50x"]
    assert lines[3].split()[-3:] == ["-0.1000", ">", "2.00x"]


def test_markdown_table(runs, tmp_path, capsys):
    compare.main([str(runs["tst"]), str(runs["base"]), "--markdown", "--out", str(tmp_path / "plots")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("| run | s | r | mode | steps | final val | data tokens | positions | wall (s) | Δ val "
                        "| speed-up |")
    assert lines[1] == "|:---|---:|---:|:---|---:|---:|---:|---:|---:|---:|---:|"
    assert lines[2].startswith("| base | 1 | 0 | baseline | 400 | 2.0000 |")  # the baseline comes first
    assert lines[3] == "| tst | 4 | 0.25 | full | 200 | 2.2000 | 350,000 | 200,000 | 50 | +0.2000 | 1.50x |"


def test_runs_with_other_positions_per_step_are_flagged(runs, tmp_path, capsys):
    wide = fake_run(tmp_path / "wide", 4, 0.25, [2.6, 2.2], positions=2 * POSITIONS)
    load(runs["base"], wide)
    assert "warning: wide processes 2,000 positions per step, the baseline 1,000" in capsys.readouterr().err


def test_a_run_still_training_is_read_up_to_its_last_complete_line(tmp_path):
    running = fake_run(tmp_path / "running", 4, 0.25, [2.6, 2.3, 2.1, 2.0], steps=250, finish=False)
    run = compare.load_run(running)
    assert run["steps"] == 250 and run["max_steps"] == 400
    assert run["final_val"] == 2.3  # the last evaluation, after 200 steps
    assert run["switch"] == 100
    base = compare.load_run(fake_run(tmp_path / "base", 1, 0.0, [3.0, 2.5, 2.2, 2.0]))
    rows = compare.compare([base, run], base)
    assert rows[1]["speedup"] == 300 / 200  # N is the steps at the run's last evaluation, not 250
    assert "250/400" in compare.table(rows, base)


def test_baseline_detection(runs, tmp_path):
    also_baseline = fake_run(tmp_path / "s4_r0", 4, 0.0, [2.9, 2.4])  # r = 0: no superposition phase
    assert load(runs["tst"], also_baseline)[1]["name"] == "s4_r0"
    with pytest.raises(ValueError, match="several baselines.*--baseline"):
        load(runs["base"], also_baseline)
    with pytest.raises(ValueError, match=r"no baseline among .*tst, .*better.*--baseline"):
        load(runs["tst"], runs["better"])


def test_an_explicit_baseline_is_compared_against_and_listed_first(runs, tmp_path, capsys):
    compare.main([str(runs["better"]), str(runs["tst"]), "--baseline", str(runs["tst"]), "--out", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:4] == ["tst", "4", "0.25", "baseline"]
    # tst reads 2.6 and 2.2 and never gets to better's 1.9: the bound is its 200 steps / better's 200
    assert lines[2].split()[-3:] == ["-0.3000", ">", "1.00x"]


def test_a_folder_without_the_files_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no config\.json"):
        compare.load_run(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"empty: no log\.jsonl"):
        compare.load_run(tmp_path / "empty")
    young = fake_run(tmp_path / "young", 1, 0.0, [3.0], steps=50)
    with pytest.raises(ValueError, match="young: no evaluation in log.jsonl yet"):
        compare.load_run(young)


def test_help_defines_the_speedup(capsys):
    with pytest.raises(SystemExit):
        compare.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "k is the first baseline evaluation (k = step + 1 steps done) with val_loss <= L. speed-up = k / N" in text
    assert '"> K/N", K the baseline\'s steps, a lower bound' in text


def test_the_three_plots(runs, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is optional (pip install matplotlib)")
    out = tmp_path / "plots"
    compare.main([str(runs["base"]), str(runs["tst"]), str(runs["better"]), "--out", str(out)])
    names = ["val_loss_vs_steps.png", "val_loss_vs_data_tokens.png", "equal_loss.png"]
    for name in names:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().err.split() == [word for name in names for word in ("wrote", str(out / name))]


def test_without_matplotlib_the_table_still_prints(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # makes `import matplotlib` fail
    compare.main([str(runs["base"]), str(runs["tst"]), "--out", str(tmp_path / "plots")])
    captured = capsys.readouterr()
    assert "1.50x" in captured.out
    assert "plots skipped" in captured.err and "pip install matplotlib" in captured.err
    assert not (tmp_path / "plots").exists()


# -----------------------------------------------------------------------------
# The sweep: in a scratch folder with its own config/, so relative paths stay out of the checkout

@pytest.fixture
def scratch(tmp_path, monkeypatch):
    (tmp_path / "config").mkdir()
    for name in ("tiny_tst.py", "270m_tst.py"):
        (tmp_path / "config" / name).write_text("s = 4\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(compare.subprocess, "run", lambda cmd: pytest.fail(f"a test started training: {cmd}"))
    return tmp_path


def test_sweep_dry_run_prints_every_command(scratch, capsys):
    root = scratch / "sweep"
    compare.main(["sweep", "--config", "config/tiny_tst.py", "--s", "2", "4", "--r", "0.2", "0.3", "--set",
                  "max_steps=2000", "eval_interval=250", "--out_root", str(root), "--dry_run"])
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    extra = "--max_steps=2000 --eval_interval=250"
    assert lines == [
        f"python train.py config/tiny_tst.py --s=1 --r=0 --out_dir={root}/baseline {extra}",
        f"python train.py config/tiny_tst.py --s=2 --r=0.2 --out_dir={root}/s2_r0.2 {extra}",
        f"python train.py config/tiny_tst.py --s=2 --r=0.3 --out_dir={root}/s2_r0.3 {extra}",
        f"python train.py config/tiny_tst.py --s=4 --r=0.2 --out_dir={root}/s4_r0.2 {extra}",
        f"python train.py config/tiny_tst.py --s=4 --r=0.3 --out_dir={root}/s4_r0.3 {extra}",
    ]
    assert not root.exists()


def test_sweep_torchrun_commands_put_the_script_arguments_after_a_double_dash(scratch, capsys):
    compare.main(["sweep", "--config", "config/270m_tst.py", "--s", "6", "--r", "0.3", "--torchrun", "8"])
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert lines == [
        "torchrun --nproc_per_node=8 train.py -- config/270m_tst.py --s=1 --r=0 --out_dir=runs/sweep/baseline",
        "torchrun --nproc_per_node=8 train.py -- config/270m_tst.py --s=6 --r=0.3 --out_dir=runs/sweep/s6_r0.3",
    ]


def test_an_interrupted_sweep_skips_finished_runs_and_resumes_the_rest(scratch, monkeypatch, capsys):
    root = scratch / "sweep"
    fake_run(root / "s2_r0.3", 2, 0.3, [2.6, 2.1])  # finished
    fake_run(root / "s4_r0.3", 4, 0.3, [2.6, 2.1], steps=150)  # killed after its checkpoint at step 100
    (root / "s4_r0.3" / "ckpt.pt").write_text("")
    launched = []

    def train(cmd):  # stands in for train.py: leaves a finished run in its out_dir
        launched.append(cmd[2:])
        out = Path(next(a for a in cmd if a.startswith("--out_dir="))[len("--out_dir="):])
        s = int(next(a for a in cmd if a.startswith("--s="))[4:])
        if out.exists():
            (out / "config.json").unlink()
            (out / "log.jsonl").unlink()
            (out / "ckpt.pt").unlink()
            out.rmdir()
        fake_run(out, s, 0.0 if s == 1 else 0.3, [2.8, 2.2] if s == 1 else [2.6, 2.0])
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(compare.subprocess, "run", train)
    compare.main(["sweep", "--config", "config/tiny_tst.py", "--s", "2", "4", "--r", "0.3", "--out_root", str(root)])
    assert launched == [
        ["config/tiny_tst.py", "--s=1", "--r=0", f"--out_dir={root}/baseline"],
        ["config/tiny_tst.py", "--s=4", "--r=0.3", f"--out_dir={root}/s4_r0.3", "--resume=True"],
    ]
    assert "# finished: " + str(root / "s2_r0.3") in capsys.readouterr().out


def test_a_partial_run_without_a_checkpoint_stops_the_sweep_before_anything_runs(scratch):
    root = scratch / "sweep"
    fake_run(root / "s4_r0.3", 4, 0.3, [2.6, 2.1], steps=50)
    with pytest.raises(ValueError, match="s4_r0.3 holds an unfinished log.jsonl but no checkpoint"):
        compare.main(["sweep", "--config", "config/tiny_tst.py", "--s", "4", "--r", "0.3", "--out_root", str(root)])


def test_sweep_summary_is_a_grid_of_final_loss_by_s_and_r(scratch, capsys):
    root = scratch / "sweep"
    fake_run(root / "baseline", 1, 0.0, [3.0, 2.5, 2.2, 2.0])
    finals = {(2, 0.2): 2.05, (2, 0.3): 2.04, (8, 0.2): 1.97, (8, 0.3): 2.01}
    for (s, r), final in finals.items():
        fake_run(root / f"s{s}_r{r:g}", s, r, [2.6, final])
    compare.main(["sweep", "--config", "config/tiny_tst.py", "--s", "2", "8", "--r", "0.2", "0.3",
                  "--out_root", str(root)])
    text = (root / "summary.md").read_text()
    assert text in capsys.readouterr().out
    lines = text.splitlines()
    grid = lines[lines.index("| s \\ r | 0.2 | 0.3 |"):][:5]
    assert grid == ["| s \\ r | 0.2 | 0.3 |",
                    "|---:|---:|---:|",
                    "| 1 (baseline) | 2.0000 | 2.0000 |",
                    "| 2 | 2.0500 (+0.0500) | 2.0400 (+0.0400) |",
                    "| 8 | 1.9700 (-0.0300) | 2.0100 (+0.0100) |"]
    # then every run's row; s8_r0.2 (200 steps at 1.97) beats the 400-step baseline: > 400/200
    assert "| s8_r0.2 | 8 | 0.2 | full | 200 | 1.9700 |" in text and text.count("> 2.00x") == 1


def test_sweep_rejects_what_it_sets_itself(scratch):
    with pytest.raises(ValueError, match="the sweep sets out_dir itself"):
        compare.main(["sweep", "--config", "config/tiny_tst.py", "--s", "4", "--r", "0.3", "--set", "out_dir=x",
                      "--dry_run"])
    with pytest.raises(ValueError, match="s >= 2 and 0 < r < 1"):
        compare.main(["sweep", "--config", "config/tiny_tst.py", "--s", "1", "--r", "0.3", "--dry_run"])
