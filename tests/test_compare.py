"""tools/compare.py on hand-made run folders: the table's numbers checked by hand, seeds averaged, the plots, the
sweep's commands, and the errors a user sees."""

import json
import math
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

import cli
from cli import UserError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import compare  # noqa: E402

POSITIONS = 1000  # per step, in every run


def fake_run(folder, s, r, vals, eval_interval=100, steps=None, dt=0.5, finish=True, positions=POSITIONS,
             schedule=(), at_boundaries=(), **settings):
    """A run folder as train.py leaves it: val_loss vals[i] after (i+1)*eval_interval steps, and at_boundaries[j]
    at the j-th stage boundary (train.py evaluates there too); phase 1 reads s data tokens per position.
    steps < max_steps makes a run still training (finish=False: a half-written last line). A schedule
    [(end_fraction, s), ...] writes a newer log, with each step's bag size "s"; settings go to config.json."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    max_steps = eval_interval * len(vals)
    config = dict(s=s, r=r, tst_mode="full", max_steps=max_steps, seq_len=8, max_seq_len=8, seed=1337,
                  eval_interval=eval_interval, eval_tokens=64, data_dir="data/x", tokenizer="bytes",
                  out_dir=str(folder))
    config.update(settings)
    if schedule:
        config["s_schedule"] = [list(stage) for stage in schedule]
    stages = list(schedule) or ([] if s == 1 else [(r, s)])
    boundaries = dict(zip([math.floor(end * max_steps) for end, _ in stages], at_boundaries))
    (folder / "config.json").write_text(json.dumps(config))
    lines, data_tokens = [], 0
    for step in range(max_steps if steps is None else steps):
        bag = next((size for end, size in stages if step < math.floor(end * max_steps)), 1)
        phase = 1 if bag > 1 else 2
        data_tokens += positions * bag
        record = dict(step=step, phase=phase, loss=9.9, positions=positions * (step + 1), data_tokens=data_tokens,
                      dt=dt)
        if schedule:
            record["s"] = bag
        if (step + 1) % eval_interval == 0:
            record["val_loss"] = vals[(step + 1) // eval_interval - 1]
        elif step + 1 in boundaries:
            record["val_loss"] = boundaries[step + 1]
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


@pytest.fixture
def tables_only(monkeypatch):
    """No matplotlib: compare.main prints its table and skips the plots, which take a second."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail


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
    assert tst["boundaries"] == [50] and table["base"]["boundaries"] == []  # the switch to phase 2
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


def test_the_printed_table(runs, tmp_path, capsys, tables_only):
    compare.main([str(runs["base"]), str(runs["tst"]), str(runs["better"]), "--out", str(tmp_path / "plots")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["run", "s", "r", "mode", "steps"]
    assert lines[1].split() == ["base", "1", "0", "baseline", "400", "2.0000", "400,000", "400,000", "200", "-", "-"]
    assert lines[2].split() == ["tst", "4", "0.25", "full", "200", "2.2000", "350,000", "200,000", "50", "+0.2000",
                                "1.50x"]
    assert lines[3].split()[-3:] == ["-0.1000", ">", "2.00x"]


def test_markdown_table(runs, tmp_path, capsys, tables_only):
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


def test_runs_of_different_tokenizers_are_refused(runs, tmp_path):
    # a loss per GPT-2 token (about 4 bytes of English) against a loss per byte: a Δ of +4.49 that means nothing
    gpt2 = fake_run(tmp_path / "gpt2", 4, 0.25, [6.8, 6.5], tokenizer="gpt2")
    with pytest.raises(UserError, match=re.escape(f"these runs use different tokenizers ({runs['base']}, "
                                                  f"{runs['tst']}: bytes; {gpt2}: gpt2): a loss per token is not "
                                                  f"comparable across tokenizers")):
        load(runs["base"], runs["tst"], gpt2)


def test_runs_evaluated_on_other_held_out_rows_are_flagged(runs, tmp_path, capsys):
    # data.validation_rows(data_dir, seq_len, eval_tokens // seq_len): other settings, other rows of text
    longer = fake_run(tmp_path / "longer", 4, 0.25, [2.6, 2.2], seq_len=16, eval_tokens=128)
    elsewhere = fake_run(tmp_path / "elsewhere", 4, 0.25, [2.6, 2.2], data_dir="data/y")
    load(runs["base"], runs["tst"], longer, elsewhere)
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: longer is evaluated on other held-out rows than the baseline, seq_len=16 (the "
                   "baseline's 8), eval_tokens=128 (the baseline's 64): Δ val mixes how hard those rows are with how "
                   "well it trained",
                   "warning: elsewhere is evaluated on other held-out rows than the baseline, data_dir='data/y' (the "
                   "baseline's 'data/x'): Δ val mixes how hard those rows are with how well it trained"]


def test_a_run_still_training_is_read_up_to_its_last_complete_line(tmp_path):
    running = fake_run(tmp_path / "running", 4, 0.25, [2.6, 2.3, 2.1, 2.0], steps=250, finish=False)
    run = compare.load_run(running)
    assert run["steps"] == 250 and run["max_steps"] == 400
    assert run["final_val"] == 2.3  # the last evaluation, after 200 steps
    assert run["boundaries"] == [100]
    base = compare.load_run(fake_run(tmp_path / "base", 1, 0.0, [3.0, 2.5, 2.2, 2.0]))
    rows = compare.compare([base, run], base)
    assert rows[1]["speedup"] == 300 / 200  # N is the steps at the run's last evaluation, not 250
    assert "250/400" in compare.table(rows, base)


def test_baseline_detection(runs, tmp_path):
    also_baseline = fake_run(tmp_path / "s4_r0", 4, 0.0, [2.9, 2.4])  # r = 0: no superposition phase
    assert load(runs["tst"], also_baseline)[1]["name"] == "s4_r0"
    with pytest.raises(UserError, match="several baselines.*--baseline RUN_DIR, or average seeds with --by_seed"):
        load(runs["base"], also_baseline)
    with pytest.raises(UserError, match=r"no baseline among .*tst, .*better.*--baseline"):
        load(runs["tst"], runs["better"])


def test_an_explicit_baseline_is_compared_against_and_listed_first(runs, tmp_path, capsys, tables_only):
    compare.main([str(runs["better"]), str(runs["tst"]), "--baseline", str(runs["tst"]), "--out", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:4] == ["tst", "4", "0.25", "baseline"]
    # tst reads 2.6 and 2.2 and never gets to better's 1.9: the bound is its 200 steps / better's 200
    assert lines[2].split()[-3:] == ["-0.3000", ">", "1.00x"]


def test_a_folder_without_the_files_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: no config\.json"):
        compare.load_run(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"empty: no log\.jsonl"):
        compare.load_run(tmp_path / "empty")
    young = fake_run(tmp_path / "young", 1, 0.0, [3.0], steps=50)
    with pytest.raises(UserError, match="young: no evaluation in log.jsonl yet"):
        compare.load_run(young)
    broken = fake_run(tmp_path / "broken", 1, 0.0, [3.0])
    (broken / "log.jsonl").write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(UserError, match=r"broken/log.jsonl, line 2: not a JSON line"):
        compare.load_run(broken)


@pytest.mark.parametrize("text, problem", [
    ('{"s": 4, "max_st', r"JSONDecodeError: Unterminated string"),  # cut by a full disk
    ('[{"max_steps": 400}]', "it has no max_steps"),  # a JSON list
    ('{"s": 4, "r": 0.25}', "it has no max_steps"),
])
def test_a_damaged_config_json_is_one_line_in_the_table_and_in_a_sweep(tmp_path, text, problem, capsys):
    run = fake_run(tmp_path / "sweep" / "s4_r0.25", 4, 0.25, [2.6, 2.2], steps=150)
    (run / "config.json").write_text(text)
    with pytest.raises(SystemExit) as stopped:
        cli.run(compare.main, [str(run)])
    err = capsys.readouterr().err
    assert stopped.value.code == 1 and len(err.splitlines()) == 1
    assert re.match(rf"error: {re.escape(str(run / 'config.json'))} is damaged \({problem}.*\): train.py writes it",
                    err), err
    with pytest.raises(UserError, match=re.escape(f"{run / 'config.json'} is damaged")):  # a sweep resuming it
        compare.run_state(run)


def test_a_baseline_is_a_run_whose_log_has_no_phase_1_step(tmp_path):
    # train.py's newer defaults are s = 1: a TST config may set only s_schedule, and its log tells
    staged = compare.load_run(fake_run(tmp_path / "staged", 1, 0.0, [2.6, 2.1], schedule=[(0.15, 8), (0.3, 4)]))
    assert not staged["is_baseline"]
    # and a config that names s = 4 but whose log never left phase 2 is a baseline
    assert compare.load_run(fake_run(tmp_path / "flat", 4, 0.0, [2.6, 2.1]))["is_baseline"]


def test_the_stages_of_a_schedule_are_read_from_the_log(tmp_path):
    staged = compare.load_run(fake_run(tmp_path / "staged", 1, 0.0, [2.6, 2.1], schedule=[(0.15, 8), (0.3, 4)]))
    assert staged["boundaries"] == [30, 60]  # s = 8 for steps 0-29, s = 4 for 30-59, then next-token
    assert staged["data_tokens"] == 30 * 1000 * 8 + 30 * 1000 * 4 + 140 * 1000
    assert (staged["s"], staged["r"]) == ("8,4", 0.3)


def seeds(folder, s, r, finals, **settings):
    """One run per final val loss, seeds 1337, 2, 3, ...; named FOLDER, FOLDER_seed2, ..."""
    for seed, final in zip([1337, 2, 3], finals):
        name = folder.name + ("" if seed == 1337 else f"_seed{seed}")
        fake_run(folder.with_name(name), s, r, [2.8, final] if s == 1 else [2.6, final], seed=seed, **settings)
    return [str(folder.with_name(folder.name + suffix)) for suffix in ["", "_seed2", "_seed3"][:len(finals)]]


def test_by_seed_averages_runs_that_differ_only_by_seed(tmp_path, capsys, tables_only):
    base = seeds(tmp_path / "base", 1, 0.0, [2.0, 2.2])
    tst = seeds(tmp_path / "tst", 4, 0.25, [1.9, 2.0, 2.1])
    other_lr = seeds(tmp_path / "lr", 4, 0.25, [1.5], lr=1e-3)  # another setting: another configuration
    compare.main([*tst, *base, *other_lr, "--by_seed", "--markdown", "--out", str(tmp_path / "plots")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| configuration | s | r | mode | n | steps | final val | Δ val |"
    # base: mean 2.1, sd sqrt((0.1² + 0.1²) / 1) = 0.1414; tst: mean 2.0, sd sqrt((0.1² + 0 + 0.1²) / 2) = 0.1
    assert lines[2:] == ["| base | 1 | 0 | baseline | 2 | 200 | 2.1000 ± 0.1414 | - |",
                         "| tst | 4 | 0.25 | full | 3 | 200 | 2.0000 ± 0.1000 | -0.1000 |",
                         "| lr | 4 | 0.25 | full | 1 | 200 | 1.5000 | -0.6000 |"]


def test_a_resumed_seed_is_still_the_same_configuration(tmp_path):
    runs = [compare.load_run(f) for f in seeds(tmp_path / "tst", 4, 0.25, [1.9, 2.0])]
    config = json.loads((runs[1]["folder"] / "config.json").read_text())
    (runs[1]["folder"] / "config.json").write_text(json.dumps({**config, "resume": True, "ckpt_interval": 7}))
    assert len(compare.seed_groups([compare.load_run(run["folder"]) for run in runs])) == 1
    for setting in ({"tst_mode": "input"}, {"bag_loss": "sum_to_one"}, {"init_from": "out/other/ckpt.pt"}):
        (runs[1]["folder"] / "config.json").write_text(json.dumps({**config, **setting}))
        assert len(compare.seed_groups([compare.load_run(run["folder"]) for run in runs])) == 2, setting


def test_logging_and_samples_do_not_make_another_configuration(tmp_path):
    runs = [compare.load_run(f) for f in seeds(tmp_path / "tst", 4, 0.25, [1.9, 2.0])]
    config = json.loads((runs[1]["folder"] / "config.json").read_text())
    (runs[1]["folder"] / "config.json").write_text(json.dumps({
        **config, "wandb_project": "tst", "wandb_run_name": "seed 2", "tensorboard": True, "sample_interval": 50,
        "sample_prompt": "def ", "sample_tokens": 64, "sample_temperature": 0.8}))
    assert len(compare.seed_groups([compare.load_run(run["folder"]) for run in runs])) == 1


def test_the_mode_column_names_a_bag_loss_other_than_mce(runs, tmp_path, capsys, tables_only):
    fake_run(tmp_path / "sum", 4, 0.25, [2.6, 2.1], bag_loss="sum_to_one")
    fake_run(tmp_path / "sum_reinit", 4, 0.25, [2.6, 2.1], bag_loss="sum_to_one", reinit_at_switch=True)
    fake_run(tmp_path / "mce", 4, 0.25, [2.6, 2.1], bag_loss="mce")
    compare.main([str(runs["base"])] + [str(tmp_path / name) for name in ("sum", "sum_reinit", "mce")]
                 + ["--markdown", "--out", str(tmp_path / "plots")])
    modes = [line.split(" | ")[3] for line in capsys.readouterr().out.splitlines()[2:]]
    assert modes == ["baseline", "full, sum_to_one", "full+reinit, sum_to_one", "full"]


def test_seeds_of_several_baseline_configurations_need_a_choice(tmp_path):
    runs = [compare.load_run(f) for f in seeds(tmp_path / "base", 1, 0.0, [2.0, 2.2])
            + seeds(tmp_path / "wide", 1, 0.0, [2.0], dim=256)]
    with pytest.raises(UserError, match="several baselines .*choose one with --baseline RUN_DIR$"):
        compare.find_baseline(runs, by_seed=True)
    assert compare.find_baseline(runs[:2], by_seed=True) is runs[0]


def split_eval(run, loss, task="heldout_val_all"):
    """eval.py's results for the run's last checkpoint: the held-out loss over the whole val split (eval.py
    --loss_tokens all), or with task heldout_val over the rows train.py evaluates."""
    steps = json.loads((run / "config.json").read_text())["max_steps"]
    results = [{"task": task, "metric": metric, "value": value, "n": 1000, "step": steps}
               for metric, value in [("loss", loss), ("ppl", math.exp(loss))]]
    (run / f"eval_step{steps}.json").write_text(json.dumps({"step": steps, "results": results}))


def test_the_whole_split_loss_is_a_column_beside_the_in_training_one(runs, tmp_path, capsys, tables_only):
    split_eval(runs["tst"], 2.1234)
    compare.main([str(runs["base"]), str(runs["tst"]), "--markdown", "--out", str(tmp_path / "plots")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| run | s | r | mode | steps | final val | full-split val | data tokens |")
    assert lines[2].startswith("| base | 1 | 0 | baseline | 400 | 2.0000 | - | 400,000 |")
    assert lines[3].startswith("| tst | 4 | 0.25 | full | 200 | 2.2000 | 2.1234 | 350,000 |")


def test_a_loss_over_part_of_the_split_is_not_the_whole_split(runs):
    split_eval(runs["tst"], 2.1234, task="heldout_val")  # eval.py's default: train.py's evaluation rows
    assert compare.load_run(runs["tst"])["full_split_val"] is None
    split_eval(runs["better"], 2.1234)
    (runs["better"] / "eval_step200.json").rename(runs["better"] / "eval_step100.json")  # not the last step
    assert compare.load_run(runs["better"])["full_split_val"] is None


def test_user_mistakes_print_one_line_and_bugs_keep_their_traceback(tmp_path, monkeypatch, capsys):
    def compare_py(*args):  # as `python tools/compare.py ARGS` runs it, in this process
        monkeypatch.setattr(sys, "argv", ["tools/compare.py", *map(str, args)])
        runpy.run_path(str(ROOT / "tools" / "compare.py"), run_name="__main__")

    with pytest.raises(SystemExit) as stopped:
        compare_py(tmp_path / "nowhere")
    assert stopped.value.code == 1
    assert capsys.readouterr().err == (f"error: {tmp_path / 'nowhere'}: no config.json; a run folder is a train.py "
                                       f"out_dir (config.json and log.jsonl)\n")
    # a log without the positions of each step is not train.py's (a fork without TST logs no phase, but positions):
    # compare.py's own assumption fails, with its traceback
    run = fake_run(tmp_path / "odd", 1, 0.0, [3.0])
    (run / "log.jsonl").write_text('{"step": 0, "val_loss": 3.0, "data_tokens": 1}\n')
    with pytest.raises(KeyError, match="positions"):
        compare_py(run)


def test_the_table_needs_neither_numpy_nor_torch_nor_tiktoken(runs, tmp_path):
    # run as a script from another folder, with matplotlib (which brings numpy itself) hidden
    (tmp_path / "hide" / "matplotlib").mkdir(parents=True)
    (tmp_path / "hide" / "matplotlib" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    result = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "tools" / "compare.py"), str(runs["base"]),
                             str(runs["tst"])], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path / "hide")},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1.50x" in result.stdout and "plots skipped" in result.stderr
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "cli" in imported and not imported & {"numpy", "torch", "tiktoken", "tst", "data"}


def test_the_three_plots_and_the_note_when_they_replace_earlier_ones(runs, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is optional (pip install matplotlib)")
    out = tmp_path / "plots"
    names = ["val_loss_vs_steps.png", "val_loss_vs_data_tokens.png", "equal_loss.png"]
    wrote = [f"wrote {out / name}" for name in names]
    compare.main([str(runs["base"]), str(runs["tst"]), str(runs["better"]), "--out", str(out)])
    for name in names:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().err.splitlines() == wrote
    compare.main([str(runs["base"]), str(runs["tst"]), "--out", str(out)])  # another comparison, the same folder
    assert capsys.readouterr().err.splitlines() == [f"replacing the earlier plots in {out}: {', '.join(names)}",
                                                    *wrote]


@pytest.fixture
def drawn(monkeypatch):
    """The figures compare.plot saves, [equal FLOPs, equal data, equal loss], kept open to be looked at."""
    plt = pytest.importorskip("matplotlib.pyplot", reason="matplotlib is optional (pip install matplotlib)")
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)
    yield figures
    for fig in figures:
        close(fig)


def inside(ax, x, y):
    (left, right), (bottom, top) = ax.get_xlim(), ax.get_ylim()
    return left <= x <= right and bottom <= y <= top


def marked(ax, marker):
    """The points drawn with this marker: "D" a change of stage, "^" a point above the zoomed panel."""
    return [tuple(xy) for line in ax.get_lines() if line.get_marker() == marker for xy in line.get_xydata()]


def test_the_plots_show_every_evaluation_and_zoom_on_the_end(tmp_path, drawn):
    # the README's quick start: the old zoom cut off 6 of TST's 7 evaluations and the baseline's after 200 steps
    base = fake_run(tmp_path / "base", 1, 0.0, [2.74, 2.84, 2.49, 2.60, 2.43, 2.31])
    tst = fake_run(tmp_path / "tst", 4, 0.3, [3.60, 3.31, 3.10, 2.95, 2.89, 2.87], at_boundaries=[3.34])
    compare.main([str(base), str(tst), "--out", str(tmp_path / "plots")])
    base_tokens = [k * 1000 for k in range(100, 700, 100)]
    tst_steps = [100, 180, 200, 300, 400, 500, 600]  # train.py evaluates at the switch, after 180 steps
    tst_tokens = [k * 4000 if k <= 180 else 720_000 + (k - 180) * 1000 for k in tst_steps]
    tst_vals = [3.60, 3.34, 3.31, 3.10, 2.95, 2.89, 2.87]
    for fig, base_x, tst_x in [(drawn[0], range(100, 700, 100), tst_steps), (drawn[1], base_tokens, tst_tokens)]:
        whole, end = fig.axes
        base_points = list(zip(base_x, [2.74, 2.84, 2.49, 2.60, 2.43, 2.31]))
        tst_points = list(zip(tst_x, tst_vals))
        assert all(inside(whole, x, y) for x, y in base_points + tst_points)
        # the zoom: from the second half of each run's last stage on (the baseline: 300 steps on; TST: 390 on)
        assert all(inside(end, x, y) for x, y in base_points[2:] + tst_points[4:])
        top = end.get_ylim()[1]
        assert top < 3.10 and marked(end, "^") == [(tst_x[3], top)]  # where TST comes in from above
        assert marked(whole, "D") == [(tst_x[1], 3.34)]  # the switch, on TST's curve
    whole, end = drawn[2].axes  # equal loss: the baseline is at TST's final 2.87 after 100 steps already
    assert all(inside(whole, k, v) for k, v in zip(range(100, 700, 100), [2.74, 2.84, 2.49, 2.60, 2.43, 2.31]))
    assert inside(end, 100, 2.87) and inside(end, 600, 2.87) and inside(end, 600, 2.31)
    assert [text.get_text() for text in end.texts] == ["0.17x"]


def long_run(folder, s, r, gain, steps=8000, every=250):
    """A realistic long run: the baseline from 5.5 after 250 steps to 1.37 after 8,000 (a power law, then the
    decay); TST slowly falls through phase 1 (its val_loss is on token input) and ends gain below the baseline."""
    def baseline(k):
        return 1.3 + 4.2 * (k / every) ** -0.9 - 0.12 * max(0.0, (k - 0.9 * steps) / (0.1 * steps))

    switch = math.floor(r * steps)

    def val(k):
        return 5.6 - 1.6 * k / switch if k <= switch else baseline(k) - gain + 0.9 * math.exp(-(k - switch) / 250)

    curve = baseline if s == 1 else val
    return fake_run(folder, s, r, [curve(k) for k in range(every, steps + 1, every)], eval_interval=every,
                    at_boundaries=[curve(switch)] if s > 1 else [])


def test_hundredths_at_the_end_of_long_runs_stay_readable(tmp_path, drawn):
    folders = [long_run(tmp_path / "base", 1, 0.0, 0), long_run(tmp_path / "s4", 4, 0.3, 0.03),
               long_run(tmp_path / "s8", 8, 0.3, -0.01), long_run(tmp_path / "s4_r0.1", 4, 0.1, 0.015)]
    compare.main([*map(str, folders), "--out", str(tmp_path / "plots")])
    runs = [compare.load_run(folder) for folder in folders]
    # after 8,000 steps the baseline is at 1.37, the others 0.03 below, 0.01 above and 0.015 below it
    ends = [[(8000, run["final_val"]) for run in runs], [run["evals"][-1][1:] for run in runs],
            [(8000, run["final_val"]) for run in runs]]
    for fig, points in zip(drawn, ends):
        end = fig.axes[1]
        bottom, top = end.get_ylim()
        assert all(inside(end, x, y) for x, y in points)
        assert 0.01 / (top - bottom) > 0.02  # a hundredth is over 2% of the zoom's height: 10 pixels or more
    for fig, which in zip(drawn[:2], (0, 1)):
        whole, end = fig.axes
        assert all(inside(whole, e[which], e[2]) for run in runs for e in run["evals"])
        switches = [(e[which], e[2]) for run in runs for e in run["evals"] if e[0] in (800, 2400)]
        assert sorted(marked(whole, "D")) == sorted(switches) and len(switches) == 3


def training_loss(folder, loss):
    """Rewrites the training loss a run logged at each step: loss(steps done, phase)."""
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    (folder / "log.jsonl").write_text("".join(json.dumps({**r, "loss": loss(r["step"] + 1, r["phase"])}) + "\n"
                                              for r in records))


def dashed(ax):
    return [line for line in ax.get_lines() if line.get_linestyle() == "--"]


def test_seeds_are_drawn_once_as_their_mean_in_a_band_from_min_to_max(tmp_path, drawn):
    base = fake_run(tmp_path / "base", 1, 0.0, [3.0, 2.5, 2.2, 2.0])
    tst = [fake_run(tmp_path / f"tst_seed{seed}", 4, 0.25, vals, seed=seed)
           for seed, vals in [(1, [3.0, 2.6]), (2, [3.2, 2.1]), (3, [3.1, 2.5])]]
    for folder, loss in zip(tst, [2.0, 2.3, 2.9]):
        training_loss(folder, lambda k, phase, loss=loss: 9.0 if phase == 1 else loss)
    compare.main([str(base), *map(str, tst), "--out", str(tmp_path / "plots")])  # averaged even without --by_seed
    mean, low, high = [3.1, 2.4], [3.0, 2.1], [3.2, 2.6]
    # 50 steps of 4,000 data tokens, then 1,000 a step
    for fig, xs in [(drawn[0], [100, 200]), (drawn[1], [250_000, 350_000])]:
        for ax in fig.axes:
            solid = {line.get_label(): line for line in ax.get_lines() if line.get_linestyle() == "-"}
            assert list(solid) == ["base (baseline)", "tst (s=4, r=0.25), mean of 3 seeds (band: their min to max)"]
            line = solid["tst (s=4, r=0.25), mean of 3 seeds (band: their min to max)"]
            assert list(line.get_xdata()) == xs and list(line.get_ydata()) == pytest.approx(mean)
            [band] = ax.collections  # the single seed of the baseline has none
            assert set(map(tuple, band.get_paths()[0].vertices)) == set(zip(xs + xs, low + high))
        # the training loss: the mean over the seeds (2.0, 2.3, 2.9), from the first evaluation on
        base_train, tst_train = dashed(fig.axes[0])
        assert list(tst_train.get_ydata()) == pytest.approx([2.4] * 101) and tst_train.get_xdata()[0] == xs[0]
    whole, end = drawn[2].axes  # equal loss: the baseline is at the mean, 2.4, after 300 steps (the seeds: 1x, 2x, 1x)
    assert not whole.collections and [text.get_text() for text in end.texts] == ["1.50x"]
    assert whole.get_lines()[1].get_label() == "tst (s=4, r=0.25), mean of 3 seeds: 2.4000 at 200 steps"


def test_the_training_loss_is_dashed_smoothed_and_left_out_in_phase_1(tmp_path, drawn):
    base = fake_run(tmp_path / "base", 1, 0.0, [3.0] * 10, eval_interval=20)
    tst = fake_run(tmp_path / "tst", 4, 0.25, [2.9] * 10, eval_interval=20)  # phase 1: steps 1 to 50 done
    training_loss(base, lambda k, phase: 5.0)
    training_loss(tst, lambda k, phase: 100.0 if phase == 1 else k / 100)  # phase 1 logs the bag loss, MCE
    compare.main([str(base), str(tst), "--out", str(tmp_path / "plots")])
    base_train, tst_train = dashed(drawn[0].axes[0])
    assert list(base_train.get_xdata()) == list(range(20, 201))  # every step from the first evaluation on
    assert list(base_train.get_ydata()) == pytest.approx([5.0] * 181)
    assert list(tst_train.get_xdata()) == list(range(51, 201))  # phase 2 only
    # the mean of 101 steps centred on each: k / 100 inside, steps 51-101 at the first, 150-200 at the last
    ys = tst_train.get_ydata()
    assert (ys[0], ys[50], ys[-1]) == pytest.approx((76 / 100, 101 / 100, 175 / 100))
    assert dashed(drawn[1].axes[0])[1].get_xdata()[0] == 201_000  # by data tokens: 50 steps of 4,000, then 1,000
    legend = [text.get_text() for text in drawn[0].axes[0].get_legend().get_texts()]
    assert any("training loss, mean of 101 logged steps" in text and "bag loss, MCE" in text for text in legend)


def test_smoothing_is_a_centred_moving_mean_with_fewer_points_at_the_ends():
    smoothed = compare.smoothed([(1, 10, 1.0), (2, 20, 2.0), (3, 30, 6.0), (4, 40, 3.0)], half=1)
    assert [point[:2] for point in smoothed] == [(1, 10), (2, 20), (3, 30), (4, 40)]
    assert [loss for *_, loss in smoothed] == pytest.approx([1.5, 3.0, 11 / 3, 4.5])


def test_a_seed_still_training_ends_its_configurations_line_and_reruns_of_a_seed_are_not_seeds(tmp_path, runs):
    base = compare.load_run(fake_run(tmp_path / "b", 1, 0.0, [3.0, 2.5, 2.2, 2.0]))
    done = compare.load_run(fake_run(tmp_path / "t", 4, 0.25, [2.8, 2.5, 2.3, 2.1], seed=1))
    running = compare.load_run(fake_run(tmp_path / "t_seed2", 4, 0.25, [3.0, 2.2, 2.0, 1.9], seed=2, steps=250))
    baseline, tst = compare.lines(compare.compare([base, done, running], base), by_seed=False)
    assert [k for k, _, _ in tst["evals"]] == [100, 200] and tst["band"] == [[2.8, 2.2], [3.0, 2.5]]
    assert [v for *_, v in tst["evals"]] == pytest.approx([2.9, 2.35])
    assert tst["train"][0][0] == 101 and tst["train"][-1][0] == 250  # phase 2, as far as both seeds got
    assert tst["crossing"] == 300 and tst["speedup"] == 300 / 200  # the mean's: the baseline is at 2.2 after 300
    assert baseline["band"] is None and baseline["seeds"] == 1
    # tst and better differ in nothing but their folder: reruns of one seed, two lines unless --by_seed
    loaded = [compare.load_run(runs[name]) for name in ("base", "tst", "better")]
    loaded = compare.compare(loaded, loaded[0])
    assert len(compare.lines(loaded, by_seed=False)) == 3 and len(compare.lines(loaded, by_seed=True)) == 2


def test_without_matplotlib_the_table_still_prints(runs, tmp_path, tables_only, capsys):
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


def commands(capsys):
    return [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]


def test_sweep_dry_run_prints_every_command(scratch, capsys):
    root = scratch / "sweep"
    compare.main(["sweep", "--config", "config/tiny_tst.py", "--s", "2", "4", "--r", "0.2", "0.3", "--set",
                  "max_steps=2000", "eval_interval=250", "--out_root", str(root), "--dry_run"])
    extra = "--max_steps=2000 --eval_interval=250"
    assert commands(capsys) == [
        f"python train.py config/tiny_tst.py --s=1 --r=0 --out_dir={root}/baseline {extra}",
        f"python train.py config/tiny_tst.py --s=2 --r=0.2 --tst_mode=full --out_dir={root}/s2_r0.2 {extra}",
        f"python train.py config/tiny_tst.py --s=2 --r=0.3 --tst_mode=full --out_dir={root}/s2_r0.3 {extra}",
        f"python train.py config/tiny_tst.py --s=4 --r=0.2 --tst_mode=full --out_dir={root}/s4_r0.2 {extra}",
        f"python train.py config/tiny_tst.py --s=4 --r=0.3 --tst_mode=full --out_dir={root}/s4_r0.3 {extra}",
    ]
    assert not root.exists()


def test_sweep_of_the_ablations_and_seeds(scratch, capsys):
    compare.main(["sweep", "--config", "config/tiny_tst.py", "--s", "2", "--r", "0.25", "--modes", "input", "output",
                  "full", "--reinit", "--seeds", "1337", "2", "--out_root", "ab", "--dry_run"])
    train = "python train.py config/tiny_tst.py"
    assert commands(capsys) == [
        f"{train} --s=1 --r=0 --seed=1337 --out_dir=ab/baseline_seed1337",
        f"{train} --s=2 --r=0.25 --tst_mode=input --seed=1337 --out_dir=ab/s2_r0.25_input_seed1337",
        f"{train} --s=2 --r=0.25 --tst_mode=output --seed=1337 --out_dir=ab/s2_r0.25_output_seed1337",
        f"{train} --s=2 --r=0.25 --tst_mode=full --seed=1337 --out_dir=ab/s2_r0.25_seed1337",
        f"{train} --s=2 --r=0.25 --tst_mode=full --reinit_at_switch=True --seed=1337 "
        f"--out_dir=ab/s2_r0.25_reinit_seed1337",
        f"{train} --s=1 --r=0 --seed=2 --out_dir=ab/baseline_seed2",
        f"{train} --s=2 --r=0.25 --tst_mode=input --seed=2 --out_dir=ab/s2_r0.25_input_seed2",
        f"{train} --s=2 --r=0.25 --tst_mode=output --seed=2 --out_dir=ab/s2_r0.25_output_seed2",
        f"{train} --s=2 --r=0.25 --tst_mode=full --seed=2 --out_dir=ab/s2_r0.25_seed2",
        f"{train} --s=2 --r=0.25 --tst_mode=full --reinit_at_switch=True --seed=2 "
        f"--out_dir=ab/s2_r0.25_reinit_seed2",
    ]


def test_sweep_torchrun_commands_put_the_script_arguments_after_a_double_dash(scratch, capsys):
    compare.main(["sweep", "--config", "config/270m_tst.py", "--s", "6", "--r", "0.3", "--torchrun", "8"])
    assert commands(capsys) == [
        "torchrun --nproc_per_node=8 train.py -- config/270m_tst.py --s=1 --r=0 --out_dir=runs/sweep/baseline",
        "torchrun --nproc_per_node=8 train.py -- config/270m_tst.py --s=6 --r=0.3 --tst_mode=full "
        "--out_dir=runs/sweep/s6_r0.3",
    ]


def test_the_full_split_evaluations_of_a_dry_run(scratch, capsys):
    root = scratch / "sweep"
    fake_run(root / "baseline", 1, 0.0, [2.8, 2.2])
    split_eval(root / "baseline", 2.1)  # already scored on the whole split
    fake_run(root / "s2_r0.3", 2, 0.3, [2.6, 2.0])  # finished, scored on part of it
    split_eval(root / "s2_r0.3", 2.1, task="heldout_val")
    compare.main(["sweep", "--config", "config/tiny_tst.py", "--s", "2", "4", "--r", "0.3", "--out_root", str(root),
                  "--full_split_eval", "--dry_run"])
    assert commands(capsys) == [
        f"python train.py config/tiny_tst.py --s=4 --r=0.3 --tst_mode=full --out_dir={root}/s4_r0.3",
        f"python eval.py --ckpt {root}/s2_r0.3/ckpt.pt --loss_tokens all",
        f"python eval.py --ckpt {root}/s4_r0.3/ckpt.pt --loss_tokens all",
    ]


def stand_in(launched):
    """subprocess.run for train.py (leaves a finished run in its out_dir: val 2.8, 2.2 for a baseline, 2.6 then
    2.0 + seed / 1000 for TST) and eval.py (scores the run's whole val split: 1.9 for a baseline, 1.8 + seed / 1000
    for TST)."""
    def run(cmd):
        launched.append([Path(cmd[1]).name] + cmd[2:])
        if cmd[1].endswith("eval.py"):
            config = json.loads((Path(cmd[3]).parent / "config.json").read_text())
            split_eval(Path(cmd[3]).parent, 1.9 if config["s"] == 1 else 1.8 + config["seed"] / 1000)
            return subprocess.CompletedProcess(cmd, 0)
        settings = dict(a[2:].split("=", 1) for a in cmd[3:])
        out, s, seed = Path(settings["out_dir"]), int(settings["s"]), int(settings.get("seed", 1337))
        if out.exists():
            for name in ("config.json", "log.jsonl", "ckpt.pt"):
                (out / name).unlink()
            out.rmdir()
        fake_run(out, s, 0.0 if s == 1 else 0.3, [2.8, 2.2] if s == 1 else [2.6, 2.0 + seed / 1000], seed=seed,
                 tst_mode=settings.get("tst_mode", "full"), reinit_at_switch=settings.get("reinit_at_switch") == "True")
        return subprocess.CompletedProcess(cmd, 0)
    return run


def test_an_interrupted_sweep_skips_finished_runs_and_resumes_the_rest(scratch, monkeypatch, capsys):
    root = scratch / "sweep"
    fake_run(root / "s2_r0.3", 2, 0.3, [2.6, 2.1])  # finished
    fake_run(root / "s4_r0.3", 4, 0.3, [2.6, 2.1], steps=150)  # killed after its checkpoint at step 100
    (root / "s4_r0.3" / "ckpt.pt").write_text("")
    launched = []
    monkeypatch.setattr(compare.subprocess, "run", stand_in(launched))
    compare.main(["sweep", "--config", "config/tiny_tst.py", "--s", "2", "4", "--r", "0.3", "--out_root", str(root)])
    assert launched == [
        ["train.py", "config/tiny_tst.py", "--s=1", "--r=0", f"--out_dir={root}/baseline"],
        ["train.py", "config/tiny_tst.py", "--s=4", "--r=0.3", "--tst_mode=full", f"--out_dir={root}/s4_r0.3",
         "--resume=True"],
    ]
    assert "# finished: " + str(root / "s2_r0.3") in capsys.readouterr().out


def test_a_partial_run_without_a_checkpoint_stops_the_sweep_before_anything_runs(scratch):
    root = scratch / "sweep"
    fake_run(root / "s4_r0.3", 4, 0.3, [2.6, 2.1], steps=50)
    with pytest.raises(UserError, match="s4_r0.3 holds an unfinished log.jsonl but no checkpoint"):
        compare.main(["sweep", "--config", "config/tiny_tst.py", "--s", "4", "--r", "0.3", "--out_root", str(root)])


def test_a_failed_training_run_stops_the_sweep(scratch, monkeypatch):
    monkeypatch.setattr(compare.subprocess, "run", lambda cmd: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(UserError, match="train.py stopped on sweep/baseline .*run the sweep again"):
        compare.main(["sweep", "--config", "config/tiny_tst.py", "--s", "4", "--r", "0.3", "--out_root", "sweep"])


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


def test_sweep_summary_of_seeds_and_modes_with_the_whole_split(scratch, monkeypatch):
    root = scratch / "sweep"
    launched = []
    monkeypatch.setattr(compare.subprocess, "run", stand_in(launched))
    compare.main(["sweep", "--config", "config/tiny_tst.py", "--s", "2", "--r", "0.3", "--modes", "full", "input",
                  "--reinit", "--seeds", "1", "3", "--out_root", str(root), "--full_split_eval"])
    assert [cmd[0] for cmd in launched] == ["train.py"] * 8 + ["eval.py"] * 8  # all training first
    lines = (root / "summary.md").read_text().splitlines()
    # each TST configuration: 2.001 and 2.003 -> mean 2.002, sd 0.002 / sqrt(2) = 0.0014; baseline 2.2 twice
    table = lines[lines.index("| configuration | s | r | mode | n | steps | final val | full-split val | Δ val "
                              "| Δ full-split |"):]
    # the whole split: 1.801 and 1.803 -> 1.8020 ± 0.0014, 0.098 below the baseline's 1.9
    tst = "| 2 | 200 | 2.0020 ± 0.0014 | 1.8020 ± 0.0014 | -0.1980 | -0.0980 |"
    assert table[2:6] == ["| baseline | 1 | 0 | baseline | 2 | 200 | 2.2000 ± 0.0000 | 1.9000 ± 0.0000 | - | - |",
                          f"| s2_r0.3 | 2 | 0.3 | full {tst}",
                          f"| s2_r0.3_input | 2 | 0.3 | input {tst}",
                          f"| s2_r0.3_reinit | 2 | 0.3 | full+reinit {tst}"]
    assert not any(line.startswith("| s \\ r |") for line in lines)  # one (s, r): no grid
    launched.clear()
    compare.main(["sweep", "--config", "config/tiny_tst.py", "--s", "2", "--r", "0.3", "--modes", "full", "input",
                  "--reinit", "--seeds", "1", "3", "--out_root", str(root), "--full_split_eval"])
    assert launched == []  # everything trained and scored: the summary only


def test_sweep_rejects_bad_arguments(scratch):
    def sweep(*args):
        compare.main(["sweep", "--config", "config/tiny_tst.py", "--s", "4", "--r", "0.3", *args, "--dry_run"])

    for setting, option in [("out_dir", "--out_root"), ("seed", "--seeds"), ("tst_mode", "--modes"),
                            ("reinit_at_switch", "--reinit")]:
        with pytest.raises(UserError, match=f"--set {setting}=x: the sweep sets {setting} itself; use {option}"):
            sweep("--set", f"{setting}=x")
    with pytest.raises(UserError, match="--set lr: write KEY=VALUE"):
        sweep("--set", "lr")
    with pytest.raises(UserError, match="--seeds 1 2 1: a seed is repeated"):
        sweep("--seeds", "1", "2", "1")
    with pytest.raises(UserError, match="--torchrun 0: the number of processes per node must be >= 1"):
        sweep("--torchrun", "0")
    with pytest.raises(UserError, match=r"--s 1 --r 0.3: TST needs s >= 2 and 0 < r < 1"):
        compare.main(["sweep", "--config", "config/tiny_tst.py", "--s", "1", "--r", "0.3", "--dry_run"])


def test_the_sweep_offers_the_modes_of_tst(scratch, capsys):
    tst = pytest.importorskip("tst")  # the one list of modes (tst.py imports torch)
    with pytest.raises(SystemExit):
        compare.main(["sweep", "--config", "config/tiny_tst.py", "--s", "4", "--r", "0.3", "--modes", "sideways"])
    err = capsys.readouterr().err
    assert "invalid choice: 'sideways'" in err and all(f"'{mode}'" in err for mode in tst.MODES)
