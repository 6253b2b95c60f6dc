"""Steering a run: --help, tools/plan.py, stopping on a signal, branching from a checkpoint, one run per out_dir, a full disk,
samples, experiment trackers, the console line."""

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import resume
import data
import config as train_config
import model
import train
from cli import UserError
from conftest import read_log, settings

ROOT = Path(__file__).resolve().parents[1]


KEYS = ("step", "phase", "loss", "grad_norm", "positions", "data_tokens", "lr")


def same_steps(log, reference):
    return [{k: r[k] for k in KEYS} for r in log] == [{k: r[k] for k in KEYS} for r in reference]


# -----------------------------------------------------------------------------
# --help and tools/plan.py

@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_setting_with_its_default_and_meaning_and_exits_0(flag):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), flag], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0 and not result.stderr, result.stderr
    out = result.stdout
    for title in ("\n# run\n", "\n# Token Superposition Training (tst.py)\n", "\n# model: ModelConfig's fields"):
        assert title in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and not
             line.startswith("  #")}
    assert set(train_config.DEFAULTS) <= set(lines)
    for key, default in train_config.DEFAULTS.items():
        assert repr(default) in lines[key], key
    assert "peak learning rate" in lines["lr"] and "bag size" in lines["s"] and "top_k" in lines
    assert all(len(line.split(maxsplit=2)) == 3 for key, line in lines.items()), "a setting without a meaning"


def plan(argv, capsys):
    spec = importlib.util.spec_from_file_location("plan", ROOT / "tools" / "plan.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(argv) is None
    return capsys.readouterr().out


def test_plan_of_the_papers_270m_pair_says_what_the_data_folder_must_hold(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/dclm_llama3 here
    base = plan([str(ROOT / "config" / "270m_baseline.py"), "--processes=8"], capsys)
    tst_run = plan([str(ROOT / "config" / "270m_tst.py"), "--processes=8"], capsys)
    assert "267,225,408 parameters" in base and "1.585 GFLOP per position" in base
    assert "1,024 rows x 2048 positions = 2,097,152 positions per step (8 process(es) x 16 rows x 8 micro-step" in base
    assert "41,943,040,000 data tokens" in base and "must hold 41,943,040,000 train tokens (41.9B)" in base
    assert "must hold 104,857,600,000 train tokens (104.9B)" in tst_run
    assert re.search(r"steps 0-5,999 \(6,000, bags of s=6 .*\): 12,582,912,000 positions, 75,497,472,000 data", tst_run)
    assert "steps 6,000-19,999 (14,000, next-token training)" in tst_run
    assert "DDP over 8 processes" in tst_run


def test_plan_of_every_config_runs_offline_on_the_meta_device(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in sorted((ROOT / "config").glob("*.py")):
        out = plan([str(path)], capsys)
        assert "parameters" in out and "memory per device" in out and "total:" in out, path.name
    moe = plan([str(ROOT / "config" / "10b_a1b_tst.py"), "--processes=64"], capsys)
    assert "10,058,576,896 parameters" in moe and "998,880,256 active per position" in moe
    assert "FSDP2 over 64 processes" in moe


@pytest.mark.parametrize("flag", ["--processes=abc", "--processes=0", "--processes=-2", "--processes"])
def test_a_plan_for_a_nonsense_process_count_is_one_line(flag, capsys):
    with pytest.raises(UserError, match=f"^{flag}: write --processes=N, N >= 1"):
        plan([str(ROOT / "config" / "tiny_tst.py"), flag], capsys)


def test_plan_reads_the_epochs_of_a_prepared_folder(data_dir, capsys):
    out = plan(settings(data_dir, "unused"), capsys)
    meta = data.load_meta(data_dir)
    tokens = 3 * 4 * 16 * 4 + 7 * 4 * 16  # 3 steps of s=4 bags, 7 next-token steps
    assert f"holds {meta['train_tokens']:,} train tokens: the run reads {tokens / meta['train_tokens']:.2f} epochs" in out
    assert not Path("unused").exists()  # a plan writes nothing


def test_the_plans_memory_estimate_is_near_the_one_gpu_measurement():
    """The only measurement there is: the 270M step at 8 x 2048 positions with the old full-logits loss, compiled,
    peaked at 40.4 GiB on an H100. The plan's parts for that step (states, activations, whole logits) come within
    20% of it."""
    cfg = model.NAMED_SHAPES["270m"]
    n = cfg.num_params()
    positions = 8 * 2048
    states = 16 * n
    full_logits = positions * cfg.vocab_size * (2 + 3 * 4)
    estimate = (states + cfg.activation_bytes(positions, 2) + full_logits) / 2**30
    assert abs(estimate - 40.4) / 40.4 < 0.2, estimate


# -----------------------------------------------------------------------------
# Stopping: SIGTERM (a cluster's notice) and Ctrl-C save the step reached and say how to continue

def start(args, cwd, torchrun=False):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    script = [str(ROOT / "train.py")] + (["--"] if torchrun else [])
    return subprocess.Popen(launcher + script + args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for_steps(out_dir, n, process, timeout=120):
    log = Path(out_dir) / "log.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not get to step {n}: {process.communicate()}")


def torchrun_train(args):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "train.py"), "--", *args],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("signum,torchrun", [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGTERM, True)],
                         ids=["SIGTERM", "Ctrl-C", "SIGTERM-torchrun"])
def test_a_signal_saves_the_step_reached_and_resume_repeats_the_uninterrupted_run(data_dir, tmp_path, signum,
                                                                                    torchrun):
    many = dict(max_steps=60, ckpt_interval=1000, eval_interval=1000, r=0.1)  # the switch at step 6
    full = tmp_path / "full"
    if torchrun:
        many.update(batch_size=2)
        torchrun_train(settings(data_dir, full, **many))
    else:
        train.main(settings(data_dir, full, **many))
    run = tmp_path / "run"
    process = start(settings(data_dir, run, **many), tmp_path, torchrun)
    wait_for_steps(run, 20, process)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode != 0, (out, err)
    if not torchrun:
        assert process.returncode == 128 + signum and "Traceback" not in err, err
    found = re.search(r"stopped by (SIG\w+) after step (\d+): saved (\S+); continue with: (.*)", out)
    assert found, out + err
    step = int(found.group(2))
    assert found.group(1) == signum.name and 20 <= step < 59
    assert Path(found.group(3)).name == f"ckpt_{step + 1:07d}.pt" and "--resume=True" in found.group(4)
    assert [r["step"] for r in read_log(run)] == list(range(step + 1))
    if torchrun:
        assert re.match(r"torchrun --nproc_per_node=2 \S*train.py -- ", found.group(4)), found.group(4)
        torchrun_train(settings(data_dir, run, resume=True, **many))
    else:
        train.main(settings(data_dir, run, resume=True, **many))
    assert same_steps(read_log(run), read_log(full))


# A signal during an evaluation: the evaluation is abandoned, the step just finished is saved, and no further step runs

EVAL_SIGNAL = dict(max_steps=12, eval_interval=5, eval_tokens=512, ckpt_interval=100)  # evaluations after steps 2 (the
# switch), 4, 9 and 11, of 32 rows: 8 forwards of 4 rows in one process, 4 on each of 2


def signal_in_evaluation(signum, at, rank=0):
    """Code that defines counted, a model.chunked_loss whose evaluation forward number `at` (from the first) of this
    process (of rank `rank`) sends it `signum`, and forwards, their count."""
    return f"""
import os, signal, torch, model
forwards, real_loss = [0], model.chunked_loss
def counted(*args):
    if not torch.is_grad_enabled() and int(os.environ.get("RANK", 0)) == {rank}:  # an evaluation's forward
        forwards[0] += 1
        if forwards[0] == {at}:
            os.kill(os.getpid(), {int(signum)})
    return real_loss(*args)
"""


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """The log of the run that the runs interrupted during an evaluation must repeat."""
    full = tmp_path_factory.mktemp("full")
    train.main(settings(data_dir, full, **EVAL_SIGNAL))
    return read_log(full)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_during_an_evaluation_abandons_it_and_saves_the_step_just_finished(data_dir, tmp_path, capsys,
                                                                                    monkeypatch, signum, uninterrupted):
    run = tmp_path / "run"
    patch = {}
    exec(signal_in_evaluation(signum, at=9), patch)  # the first forward of the evaluation after step 4
    monkeypatch.setattr(model, "chunked_loss", patch["counted"])
    started = time.time()
    with pytest.raises(SystemExit) as stopped:
        train.main(settings(data_dir, run, **EVAL_SIGNAL))
    assert stopped.value.code == 128 + signum and time.time() - started < 60
    assert patch["forwards"] == [9]  # the evaluation's other 7 forwards were not run, nor any later step
    out = capsys.readouterr().out
    assert re.search(rf"stopped by {signum.name} after step 4: saved \S+ckpt_0000005.pt; continue with: python \S*"
                     rf"train.py .*--resume=True", out), out
    log = read_log(run)
    assert [r["step"] for r in log] == [0, 1, 2, 3, 4] and "val_loss" in log[2] and "val_loss" not in log[4]
    assert (run / "ckpt.pt").resolve().name == "ckpt_0000005.pt"
    monkeypatch.undo()
    train.main(settings(data_dir, run, resume=True, **EVAL_SIGNAL))
    assert same_steps(read_log(run), uninterrupted)
    assert [r.get("val_loss") for r in read_log(run)[5:]] == [r.get("val_loss") for r in uninterrupted[5:]]


def run_script(tmp_path, code, args):
    """train.py under torchrun (2 processes on CPU), `code` run first in each process -> the finished process."""
    script = tmp_path / "wrapped_train.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n{code}\nimport cli, train\n"
                      f"cli.run(train.main)\n")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), "--", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_signal_to_one_rank_during_an_fsdp_evaluation_stops_every_rank_after_that_step(data_dir, tmp_path):
    """Every rank abandons the evaluation at the same batch (FSDP gathers weights in every forward) and saves the step
    (a collective); the resumed run's exactness is the one-process test's above."""
    fsdp = dict(EVAL_SIGNAL, fsdp=True)
    run = tmp_path / "run"
    started = time.time()
    code = signal_in_evaluation(signal.SIGTERM, at=5, rank=0) + "model.chunked_loss = counted\n"
    result = run_script(tmp_path, code, settings(data_dir, run, **fsdp))
    assert result.returncode != 0 and time.time() - started < 120, result.stderr[-3000:]
    found = re.search(r"stopped by SIGTERM after step 4: saved (\S+); continue with: torchrun --nproc_per_node=2 \S*"
                      r"train.py -- .*--resume=True", result.stdout)
    assert found, result.stdout + result.stderr[-3000:]
    assert Path(found.group(1)).name == "ckpt_0000005.pt" and (run / "ckpt_0000005.pt" / "train_state.pt").exists()
    log = read_log(run)
    assert [r["step"] for r in log] == [0, 1, 2, 3, 4] and "val_loss" not in log[4]
    assert not re.search(r"\[rank\d\]: *Traceback", result.stderr), result.stderr[-3000:]  # none of a worker's


# A process of a torchrun job killed (SIGKILL: the OOM killer, a node's failure): the survivor says so in one line

KILL = """
import os, signal, torch.distributed.checkpoint as dcp
import train
dies = int(os.environ["RANK"]) == {victim}
real_save, real_step = dcp.save, train.train_step

def save_and_die(state, checkpoint_id=None, **kwargs):  # under FSDP: dies with its shards of checkpoint 4 half-written
    if dies and checkpoint_id.name == "ckpt_0000004.tmp":
        checkpoint_id.mkdir(exist_ok=True)
        (checkpoint_id / "__{victim}_0.distcp").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(state, checkpoint_id=checkpoint_id, **kwargs)

def step_and_die(run, step, *args):  # otherwise: dies at the start of step 4
    if dies and step == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(run, step, *args)
dcp.save, train.train_step = save_and_die, step_and_die
"""


@pytest.mark.parametrize("victim,fsdp,step,newest", [(1, True, 3, 3), (0, False, 4, 4)],
                         ids=["rank 1 writing its shards (FSDP)", "rank 0 in a step (DDP)"])
def test_a_killed_rank_leaves_its_survivor_one_line_and_no_partial_checkpoint(data_dir, tmp_path, victim, fsdp, step,
                                                                               newest):
    run = tmp_path / "run"
    started = time.time()
    result = run_script(tmp_path, KILL.format(victim=victim), settings(data_dir, run, max_steps=8, fsdp=fsdp))
    assert result.returncode != 0 and time.time() - started < 120, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert re.fullmatch(rf"error: rank {victim} of 2 was lost during step {step} \(.+\); rank {1 - victim} stopped "
                        rf"without saving step {step}: the newest checkpoint is \S+ckpt_{newest:07d}.pt; continue "
                        rf"from it with: torchrun --nproc_per_node=2 \S*train.py -- .*--resume=True", errors[0]), \
        errors[0]
    assert not re.search(r"\[rank\d\]: *Traceback", result.stderr), result.stderr[-3000:]  # none of the survivor's
    assert not list(run.glob("*.tmp")) and (run / "ckpt.pt").resolve().name == f"ckpt_{newest:07d}.pt"


# -----------------------------------------------------------------------------
# Branching: init_from

def test_a_branch_with_unchanged_settings_repeats_the_original_runs_later_steps(data_dir, tmp_path, capsys):
    original = tmp_path / "original"
    train.main(settings(data_dir, original, reinit_at_switch=True))  # the switch draws random numbers: RNG travels
    branch = tmp_path / "branch"
    train.main(settings(data_dir, branch, reinit_at_switch=True, init_from=original / "ckpt_0000002.pt"))
    assert "init_from" in capsys.readouterr().out
    assert same_steps(read_log(branch), read_log(original)[2:])
    a = torch.load(original / "ckpt.pt", weights_only=False)["model"]
    b = torch.load(branch / "ckpt.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_branch_prints_what_changed_and_refuses_what_changes_the_checkpoints_meaning(data_dir, tmp_path, capsys):
    original = tmp_path / "original"
    train.main(settings(data_dir, original, max_steps=4))
    train.main(settings(data_dir, tmp_path / "lower_lr", max_steps=8, lr=5e-3, init_from=original))  # a run dir
    out = capsys.readouterr().out
    assert "init_from" in out and "step 4" in out and "lr 0.01 -> 0.005" in out
    assert [r["step"] for r in read_log(tmp_path / "lower_lr")] == [4, 5, 6, 7]
    # a branch whose max_steps leaves nothing to train was a silent exit 0
    with pytest.raises(UserError, match=r"is at step 4, and max_steps=4 leaves nothing to train: --init_from=.*"
                                        r"--max_steps=N \(N > 4\)"):
        train.main(settings(data_dir, tmp_path / "nothing", max_steps=4, init_from=original))
    with pytest.raises(UserError, match=r"dim: checkpoint 32, this run 64.*keeps the model's shape and the tokenizer"):
        train.main(settings(data_dir, tmp_path / "wider", max_steps=4, dim=64, init_from=original / "ckpt.pt"))
    with pytest.raises(UserError, match="loader read other windows .*seed.*init_weights_only=True"):
        train.main(settings(data_dir, tmp_path / "reseeded", max_steps=4, seed=7, init_from=original / "ckpt.pt"))


def test_a_weights_only_branch_starts_at_step_0_from_the_checkpoints_weights(data_dir, tmp_path):
    original = tmp_path / "original"
    train.main(settings(data_dir, original, max_steps=4))
    warm = tmp_path / "warm"
    train.main(settings(data_dir, warm, max_steps=2, seed=7, init_from=original / "ckpt.pt", init_weights_only=True,
                        lr=1e-9, warmup_steps=0))
    log = read_log(warm)
    assert [r["step"] for r in log] == [0, 1] and log[0]["positions"] == 4 * 16
    a = torch.load(original / "ckpt.pt", weights_only=False)["model"]
    b = torch.load(warm / "ckpt.pt", weights_only=False)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # lr 1e-9: the weights barely move


def test_extending_a_finished_run_says_what_happens_to_the_learning_rate(data_dir, tmp_path, capsys):
    original = tmp_path / "original"
    train.main(settings(data_dir, original, max_steps=10, decay_frac=0.5))
    train.main(settings(data_dir, original, max_steps=10, decay_frac=0.5, resume=True))
    assert "is complete" in capsys.readouterr().out  # and it says how to extend it
    train.main(settings(data_dir, tmp_path / "longer", max_steps=20, decay_frac=0.5, init_from=original))
    out = capsys.readouterr().out
    assert re.search(r"max_steps 10 -> 20: the learning-rate schedule .* step 10 runs at lr 0\.01; the original's "
                     r"last step ran at 0\.002; the decay now starts at step 10", out), out
    assert [r["step"] for r in read_log(tmp_path / "longer")] == list(range(10, 20))


# -----------------------------------------------------------------------------
# One live run per out_dir

def test_a_second_run_in_a_live_runs_out_dir_is_refused_and_a_dead_runs_lock_is_not(data_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    held = resume.lock(run)  # as a live run holds it
    try:
        with pytest.raises(UserError, match=rf"out_dir={re.escape(str(run))} is in use by a live run \(pid "
                                            rf"{os.getpid()} on "):
            train.main(settings(data_dir, run, max_steps=2))
        with pytest.raises(UserError, match="in use by a live run"):
            train.main(settings(data_dir, run, max_steps=2, resume=True))
    finally:
        held.close()  # the live run ends; its lock file stays behind, stale
    assert (run / "run.lock").exists()
    train.main(settings(data_dir, run, max_steps=2))


# -----------------------------------------------------------------------------
# A full disk under FSDP

@pytest.fixture
def tiny_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("needs to mount a tmpfs (root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)])


def test_a_full_disk_under_fsdp_is_one_line_on_every_rank_and_leaves_nothing_behind(data_dir, tmp_path, tiny_disk):
    run = tiny_disk / "run"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "train.py"), "--", *settings(data_dir, run, fsdp=True, max_steps=4)],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert re.fullmatch(r"error: saving checkpoint \S+ckpt_0000001.pt \(step 1\) failed: no space left on device; "
                        r"this run has no checkpoint yet: free space and start it again", errors[0]), errors[0]
    # torchrun's launcher reports failed workers with a traceback of its own; the workers print none
    assert "CheckpointException" not in result.stderr and result.stderr.count("Traceback (most recent") <= 1
    assert "terminate called" not in result.stderr  # every rank exits cleanly, with status 1
    assert not list(run.glob("*.tmp")) and not list(run.glob("ckpt_*"))


# -----------------------------------------------------------------------------
# Samples, trackers, the console

def test_samples_are_printed_and_logged_and_change_nothing_else(data_dir, tmp_path, capsys):
    train.main(settings(data_dir, tmp_path / "plain"))
    train.main(settings(data_dir, tmp_path / "sampled", sample_interval=5, sample_prompt="document", sample_tokens=8,
                        sample_temperature=0.8))
    out = capsys.readouterr().out
    assert re.search(r"sample at step 4: 'document.*'", out)
    sampled = read_log(tmp_path / "sampled")
    assert [r["step"] for r in sampled if "sample" in r] == [2, 4, 9]  # every 5 steps, the switch, the end
    assert all(r["sample"].startswith("document") for r in sampled if "sample" in r)
    assert same_steps(sampled, read_log(tmp_path / "plain"))  # training's random numbers are untouched


class Recorder(types.ModuleType):
    """A stand-in for wandb: records its calls."""

    def __init__(self):
        super().__init__("wandb")
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))

    def log(self, record, step):
        self.calls.append(("log", step, record))

    def finish(self):
        self.calls.append(("finish",))


def test_every_log_record_goes_to_wandb_when_asked(data_dir, tmp_path, monkeypatch):
    wandb = Recorder()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    train.main(settings(data_dir, tmp_path / "run", wandb_project="tst-tests", wandb_run_name="tiny"))
    assert wandb.calls[0][0] == "init" and wandb.calls[0][1]["project"] == "tst-tests"
    assert wandb.calls[0][1]["name"] == "tiny" and wandb.calls[0][1]["config"]["lr"] == 1e-2
    logged = [call for call in wandb.calls if call[0] == "log"]
    log = read_log(tmp_path / "run")
    assert [step for _, step, _ in logged] == [r["step"] for r in log]
    for (_, _, record), line in zip(logged, log):
        assert record["loss"] == line["loss"] and record.get("val_loss") == line.get("val_loss")
    assert wandb.calls[-1] == ("finish",)


class FailingTracker(Recorder):
    """A stand-in for wandb whose servers go away at step 3."""

    def log(self, record, step):
        if step == 3:
            raise ConnectionError("api.wandb.ai is unreachable")
        super().log(record, step)


def test_a_tracker_that_fails_mid_run_saves_the_step_reached_and_says_how_to_continue(data_dir, tmp_path,
                                                                                      monkeypatch):
    wandb = FailingTracker()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"^wandb failed at step 3 \(ConnectionError: api.wandb.ai is unreachable\); "
                                        r"the run stopped after step 4: saved \S+ckpt_0000005.pt; continue with: "
                                        r"python \S*train.py .*--resume=True$"):
        train.main(settings(data_dir, run, ckpt_interval=100, wandb_project="tst-tests"))
    assert [r["step"] for r in read_log(run)] == [0, 1, 2, 3, 4]  # the step that failed to reach wandb, and one more
    assert (run / "ckpt.pt").resolve().name == "ckpt_0000005.pt"
    assert [call[1] for call in wandb.calls if call[0] == "log"] == [0, 1, 2]  # dropped after its failure
    train.main(settings(data_dir, run, ckpt_interval=100, wandb_project="tst-tests", resume=True))
    assert [r["step"] for r in read_log(run)] == list(range(10))


def test_tensorboard_gets_every_number_of_the_log(data_dir, tmp_path, monkeypatch):
    scalars = []

    class SummaryWriter:
        def __init__(self, folder):
            self.folder = folder

        def add_scalar(self, key, value, step):
            scalars.append((key, value, step))

        def close(self):
            scalars.append("closed")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    train.main(settings(data_dir, tmp_path / "run", tensorboard=True, max_steps=3))
    log = read_log(tmp_path / "run")
    assert ("loss", log[2]["loss"], 2) in scalars and ("val_loss", log[2]["val_loss"], 2) in scalars
    assert scalars[-1] == "closed"


@pytest.mark.parametrize("setting,module,message", [
    ("--wandb_project=x", "wandb", "wandb_project is set but wandb is not installed: pip install wandb"),
    ("--tensorboard=True", "torch.utils.tensorboard", "tensorboard=True but tensorboard is not installed"),
])
def test_a_tracker_that_is_not_installed_is_one_line_before_any_step(data_dir, tmp_path, setting, module, message):
    script = (f"import sys; sys.modules[{module!r}] = None; sys.argv[0] = 'train.py'; sys.path.insert(0, {str(ROOT)!r})"
              f"; import cli, train; cli.run(train.main)")
    result = subprocess.run([sys.executable, "-c", script, *settings(data_dir, tmp_path / "run"), setting],
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.strip().startswith(f"error: {message}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run" / "ckpt.pt").exists()


def test_the_console_shows_progress_and_a_baseline_has_no_phase(data_dir, tmp_path, capsys):
    train.main(settings(data_dir, tmp_path / "tst", log_interval=1))
    out = capsys.readouterr().out
    assert "global batch: 4 rows x 16 positions" in out and "global_batch_tokens=0" not in out  # one process
    assert re.search(r"step  0/10 \| phase 1: s=4, MCE \| loss \d\.\d{4} \|.* pos/s, .* data tok/s \| \d+ ms \| "
                     r"0:\d\d elapsed, ETA 0:\d\d", out), out
    assert "step  3/10 | phase 2 |" in out
    train.main(settings(data_dir, tmp_path / "baseline", s=1, r=0.0, log_interval=1))
    out = capsys.readouterr().out
    assert "step  3/10 | loss" in out and "phase" not in out
    assert "positions_per_sec" in read_log(tmp_path / "baseline")[0] and "tokens_per_sec" not in read_log(
        tmp_path / "baseline")[0]


def test_a_clean_ddp_run_warns_nothing_and_says_that_its_global_batch_grows_with_the_processes(data_dir, tmp_path):
    result = torchrun_train(settings(data_dir, tmp_path / "run", max_steps=2))
    assert "Warning" not in result.stderr, result.stderr  # DDP's own FutureWarning about broadcast_buffers was
    assert "global batch: 8 rows x 16 positions = 128 positions per step (2 process(es) x 1 micro-step(s) x 4 rows)" \
        in result.stdout
    assert ("global_batch_tokens=0: the global batch is 2 processes x the one-process batch (4 rows x 16 positions), "
            "so it grows with the process count; global_batch_tokens=N keeps it at N positions per step") \
        in result.stdout


def test_the_start_up_lines_include_the_notes_on_settings_that_quietly_train_a_baseline(data_dir, tmp_path, capsys,
                                                                                        monkeypatch):
    monkeypatch.setattr(train_config, "notes", lambda config: [f"note: s={config['s']} here"])
    train.main(settings(data_dir, tmp_path / "run", max_steps=1, warmup_steps=0))
    assert "\nnote: s=4 here\n" in capsys.readouterr().out
