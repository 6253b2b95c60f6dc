"""train.py at its seams: the phase switch, token accounting, exact resume, DDP, bad settings."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import train
import tst

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small byte-level corpus made here: text files -> shards."""
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        words = " ".join(f"w{(i * 7 + k * k) % 53}" for k in range(400))
        (folder / f"doc{i:02d}.txt").write_text(f"document {i}: {words}\n")
    out = folder / "shards"
    data.prepare(str(folder / "*.txt"), "bytes", out, val_tokens=4000, num_proc=1)
    return out


def settings(data_dir, out_dir, **overrides):
    base = dict(data_dir=data_dir, out_dir=out_dir, dim=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=64,
                max_seq_len=16, seq_len=16, batch_size=4, max_steps=10, warmup_steps=2, lr=1e-2, s=4, r=0.3,
                eval_interval=5, eval_iters=2, log_interval=100, ckpt_interval=1, keep_last=20)
    base.update(overrides)
    return [f"--{k}={v}" for k, v in base.items()]


def read_log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def test_both_phases_end_to_end_with_exact_accounting(data_dir, tmp_path):
    train.main(settings(data_dir, tmp_path / "run"))
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == list(range(10))
    assert [r["phase"] for r in log] == [1, 1, 1] + [2] * 7  # floor(0.3 * 10) = 3 superposition steps
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    rows, T, s = 4, 16, 4
    for r in log:
        assert r["positions"] == (r["step"] + 1) * rows * T  # the transformer always sees T positions per row
    # phase 1 reads s data tokens per position (rows of s*T + 1), phase 2 one (rows of T + 1)
    assert [r["data_tokens"] for r in log] == [rows * T * (s * min(k + 1, 3) + max(0, k + 1 - 3)) for k in range(10)]
    val_phases = {r["phase"] for r in log if "val_loss" in r}
    assert val_phases == {1, 2}  # the held-out next-token loss is logged in both phases
    assert (tmp_path / "run" / "ckpt_0000003.pt").exists()  # the switch checkpoint
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["s"] == 4 and config["vocab_size"] == 257


def test_flops_are_counted_from_positions(data_dir, tmp_path):
    model = train.main(settings(data_dir, tmp_path / "run", max_steps=4))
    per_position = model.cfg.flops_per_position(16)
    for r in read_log(tmp_path / "run"):
        assert r["flops"] == r["positions"] * per_position


def test_s_1_and_r_0_are_exactly_the_baseline(data_dir, tmp_path):
    train.main(settings(data_dir, tmp_path / "s1", s=1, max_steps=4))
    train.main(settings(data_dir, tmp_path / "r0", r=0.0, max_steps=4))
    s1, r0 = read_log(tmp_path / "s1"), read_log(tmp_path / "r0")
    assert {r["phase"] for r in s1} == {2}
    assert [r["data_tokens"] for r in s1] == [r["positions"] for r in s1]
    keys = ("phase", "loss", "grad_norm", "data_tokens", "val_loss")
    assert [{k: r.get(k) for k in keys} for r in s1] == [{k: r.get(k) for k in keys} for r in r0]


def resume_from(data_dir, full_dir, step, new_dir, **overrides):
    """A run killed after saving checkpoint `step`: its folder holds that checkpoint and the log so far."""
    new_dir.mkdir()
    shutil.copy(full_dir / f"ckpt_{step:07d}.pt", new_dir / f"ckpt_{step:07d}.pt")
    (new_dir / "ckpt.pt").symlink_to(f"ckpt_{step:07d}.pt")
    shutil.copy(full_dir / "log.jsonl", new_dir / "log.jsonl")  # with lines past the checkpoint, to be dropped
    (new_dir / "ckpt_9999999.tmp").write_bytes(b"half-written")  # what a kill mid-save leaves: ignored
    train.main(settings(data_dir, new_dir, resume=True, **overrides))
    return read_log(new_dir)


@pytest.mark.parametrize("step", [2, 4], ids=["mid-phase-1", "after-the-switch"])
def test_resume_reproduces_the_uninterrupted_run_exactly(data_dir, tmp_path, step):
    full = tmp_path / "full"
    train.main(settings(data_dir, full, reinit_at_switch=True))  # the switch draws random numbers: RNG is restored
    expected = read_log(full)
    resumed = resume_from(data_dir, full, step, tmp_path / "resumed", reinit_at_switch=True)
    keys = ("step", "phase", "loss", "grad_norm", "positions", "data_tokens", "lr")
    assert [{k: r[k] for k in keys} for r in resumed] == [{k: r[k] for k in keys} for r in expected]
    final_full = torch.load(full / "ckpt.pt", weights_only=False)["model"]
    final_resumed = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=False)["model"]
    assert all(torch.equal(final_full[k], final_resumed[k]) for k in final_full)


def test_checkpoints_keep_the_last_k_and_the_switch(data_dir, tmp_path):
    train.main(settings(data_dir, tmp_path / "run", keep_last=2))
    names = sorted(p.name for p in (tmp_path / "run").glob("ckpt_*.pt"))
    assert names == ["ckpt_0000003.pt", "ckpt_0000009.pt", "ckpt_0000010.pt"]
    assert (tmp_path / "run" / "ckpt.pt").resolve().name == "ckpt_0000010.pt"


def test_a_corrupt_checkpoint_is_refused(data_dir, tmp_path):
    run = tmp_path / "run"
    train.main(settings(data_dir, run, max_steps=3))
    target = (run / "ckpt.pt").resolve()
    target.write_bytes(target.read_bytes()[:1000])  # truncated
    with pytest.raises(RuntimeError, match="corrupt or truncated"):
        train.main(settings(data_dir, run, max_steps=3, resume=True))


def test_a_checkpoint_of_other_settings_is_refused_with_the_differences(data_dir, tmp_path):
    run = tmp_path / "run"
    train.main(settings(data_dir, run, max_steps=3))
    with pytest.raises(RuntimeError, match=r"s: checkpoint 4, this run 6(.|\n)*lr: checkpoint 0.01, this run 0.02"):
        train.main(settings(data_dir, run, max_steps=3, resume=True, s=6, lr=0.02))


def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(data_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = tst.mce_loss

    def poisoned(logits, targets, weights):
        calls["n"] += 1
        loss = real(logits, targets, weights)
        return loss * float("nan") if calls["n"] > 5 else loss

    monkeypatch.setattr(tst, "mce_loss", poisoned)
    with pytest.raises(FloatingPointError, match="step 5"):
        train.main(settings(data_dir, tmp_path / "run", eval_interval=100))
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 5 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.parametrize("override,message", [
    ("--r=1.0", "r=1.0: the phase-1 fraction must be in"),
    ("--s=0", "s=0: the bag size must be >= 1"),
    ("--tst_mode=both", "tst_mode='both'"),
    ("--weights=square", "unknown bag weights 'square'"),
    ("--lr=fast", "lr='fast' is a str, but lr takes a float"),
    ("--bag_size=4", "unknown setting 'bag_size'"),
    ("--global_batch_tokens=1000", "global_batch_tokens=1000 is not a multiple of batch_size * seq_len"),
    ("--seq_len=4096", "seq_len=4096 exceeds max_seq_len=128"),
    ("--n_kv_heads=3", "multiple of n_kv_heads"),
    ("--warmup_steps=595", "warmup_steps=595: must fit before the decay"),
    ("--s", "write overrides as --key=value"),
])
def test_bad_settings_are_rejected_before_any_work(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("*", r"\*")):
        train.parse_config([str(ROOT / "config" / "tiny_tst.py"), override])


def test_config_files_and_overrides(tmp_path):
    c = train.parse_config([str(ROOT / "config" / "270m_tst.py"), "--max_steps=10000", "--lr=1e-3"])
    assert (c["dim"], c["n_layers"], c["n_heads"], c["n_kv_heads"], c["ffn_dim"]) == (576, 30, 9, 9, 1536)
    assert (c["s"], c["r"], c["max_steps"], c["lr"]) == (6, 0.3, 10000, 1e-3)
    assert c["global_batch_tokens"] == 2 * 2**20 and c["warmup_steps"] == 2000
    bad = tmp_path / "bad.py"
    bad.write_text("learning_rate = 1e-3\n")
    with pytest.raises(ValueError, match="bad.py: unknown setting 'learning_rate'"):
        train.parse_config([str(bad)])


@pytest.mark.parametrize("name", ["270m", "600m", "3b"])
def test_paper_configs_build_the_named_shapes(name):
    from model import NAMED_SHAPES, ModelConfig
    c = train.parse_config([str(ROOT / "config" / f"{name}_tst.py")])
    assert ModelConfig(**{k: c[k] for k in train.MODEL_KEYS}) == NAMED_SHAPES[name]


def test_every_config_parses():
    for path in sorted((ROOT / "config").glob("*.py")):
        train.parse_config([str(path)])


def test_a_row_longer_than_the_data_fails_early(data_dir, tmp_path):
    with pytest.raises(ValueError, match="do not fit the data"):
        train.main(settings(data_dir, tmp_path / "run", s=4096))  # rows of 65,537 tokens


def test_missing_data_names_the_command_to_prepare_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="python data.py --source dclm"):
        train.main(settings(tmp_path / "nothing", tmp_path / "run", data_source="dclm"))


DISTRIBUTED_SCRIPT = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import train
destroy, dist.destroy_process_group = dist.destroy_process_group, lambda: None  # gather the weights first
model = train.main(sys.argv[1:])
state = {{k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}}
torch.save(state, os.path.join(os.environ["WEIGHTS_DIR"], f"rank{{os.environ['RANK']}}.pt"))
dist.barrier()
destroy()
# A gloo/FSDP worker thread sometimes aborts the process during interpreter teardown ("terminate called without
# an active exception"), after all work is done and saved: leave without that teardown.
os._exit(0)
"""


def torchrun(tmp_path, args):
    """Two processes under torchrun (gloo on CPU); returns each rank's final weights."""
    script = tmp_path / "distributed_run.py"
    script.write_text(DISTRIBUTED_SCRIPT.format(root=str(ROOT)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "--",  # everything after it is the script's: torchrun's parser would take --s and --r for its own options
           *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WEIGHTS_DIR": str(tmp_path)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return [torch.load(tmp_path / f"rank{i}.pt") for i in (0, 1)]


def test_ddp_two_processes_match_one_process_with_the_global_batch(data_dir, tmp_path):
    # 2 ranks x 2 rows x 2 micro-steps are the same global batch as 1 process x 8 rows: disjoint rows, none lost
    rank0, rank1 = torchrun(tmp_path, settings(data_dir, tmp_path / "ddp", max_steps=6, batch_size=2,
                                               global_batch_tokens=128))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # gradients were synchronised
    single = train.main(settings(data_dir, tmp_path / "single", max_steps=6, batch_size=8))
    ddp_log, single_log = read_log(tmp_path / "ddp"), read_log(tmp_path / "single")
    assert [r["phase"] for r in ddp_log] == [r["phase"] for r in single_log] == [1] + [2] * 5
    assert [r["data_tokens"] for r in ddp_log] == [r["data_tokens"] for r in single_log]
    for a, b in zip(ddp_log, single_log):
        assert abs(a["loss"] - b["loss"]) < 1e-4
    for k, v in single.state_dict().items():
        torch.testing.assert_close(rank0[k], v, atol=1e-4, rtol=1e-3)


def test_fsdp_matches_one_process_and_resumes_exactly_from_sharded_checkpoints(data_dir, tmp_path):
    fsdp = dict(fsdp=True, max_steps=6, batch_size=4)
    full = torchrun(tmp_path, settings(data_dir, tmp_path / "full", **fsdp))[0]
    assert (tmp_path / "full" / "ckpt_0000003.pt" / "train_state.pt").exists()  # a folder of shards
    single = train.main(settings(data_dir, tmp_path / "single", max_steps=6, batch_size=8))
    for a, b in zip(read_log(tmp_path / "full"), read_log(tmp_path / "single")):
        assert abs(a["loss"] - b["loss"]) < 1e-4
    for k, v in single.state_dict().items():
        torch.testing.assert_close(full[k], v, atol=1e-4, rtol=1e-3)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed_dir, symlinks=True)
    (resumed_dir / "ckpt.pt").unlink()
    (resumed_dir / "ckpt.pt").symlink_to("ckpt_0000003.pt")
    resumed = torchrun(tmp_path, settings(data_dir, resumed_dir, resume=True, **fsdp))[0]
    keys = ("step", "phase", "loss", "grad_norm", "data_tokens")
    assert [{k: r[k] for k in keys} for r in read_log(resumed_dir)] == \
        [{k: r[k] for k in keys} for r in read_log(tmp_path / "full")]
    assert all(torch.equal(full[k], resumed[k]) for k in full)


@pytest.mark.parametrize("mode,per_position", [("input", 4), ("output", 1)])
def test_ablation_modes_consume_the_right_data(data_dir, tmp_path, mode, per_position):
    train.main(settings(data_dir, tmp_path / "run", tst_mode=mode, weights="[1, 2, 3, 4]", max_steps=4))
    first = read_log(tmp_path / "run")[0]
    assert first["phase"] == 1 and first["data_tokens"] == per_position * first["positions"]


def switch_run(data_dir, run, **overrides):
    # two steps, the switch after the first, a learning rate too small to move anything
    train.main(settings(data_dir, run, max_steps=2, r=0.5, lr=1e-9, warmup_steps=0, **overrides))
    return [torch.load(run / f"ckpt_{k:07d}.pt", weights_only=False) for k in (1, 2)]


def test_reinit_at_switch_replaces_embedding_and_head_only(data_dir, tmp_path):
    for reinit in (False, True):
        before, after = switch_run(data_dir, tmp_path / str(reinit), reinit_at_switch=reinit)
        for key, state in before["model"].items():
            changed = not torch.allclose(state, after["model"][key], atol=1e-6)
            assert changed == (reinit and key in ("embed.weight", "lm_head.weight")), key


def test_reset_optimizer_at_switch_drops_the_moments(data_dir, tmp_path):
    for reset, steps_seen in ((False, 2), (True, 1)):
        _, after = switch_run(data_dir, tmp_path / str(reset), reset_optimizer_at_switch=reset)
        assert {int(v["step"]) for v in after["optimizer"]["state"].values()} == {steps_seen}


def test_a_fresh_run_refuses_a_folder_with_checkpoints(data_dir, tmp_path):
    train.main(settings(data_dir, tmp_path / "run", max_steps=2))
    with pytest.raises(FileExistsError, match="--resume=True, or give this run a new out_dir"):
        train.main(settings(data_dir, tmp_path / "run", max_steps=2))


def test_a_tied_model_stays_tied_after_its_meta_construction(data_dir, tmp_path):
    model = train.main(settings(data_dir, tmp_path / "run", max_steps=2, tie_embeddings=True))
    assert model.lm_head.weight is model.embed.weight
    assert model.cfg.num_params() == sum(p.numel() for p in model.parameters())
