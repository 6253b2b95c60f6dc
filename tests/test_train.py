"""train.py at its seams: the stage switches, token accounting, exact resume, DDP, bad settings, removing TST."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import config as train_config
import model
import train
from cli import UserError
from conftest import read_log, settings

ROOT = Path(__file__).resolve().parents[1]


def test_both_phases_end_to_end_with_exact_accounting(data_dir, tmp_path):
    train.main(settings(data_dir, tmp_path / "run"))
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == list(range(10))
    assert [r["phase"] for r in log] == [1, 1, 1] + [2] * 7  # floor(0.3 * 10) = 3 superposition steps
    assert [r["s"] for r in log] == [4, 4, 4] + [1] * 7
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


@pytest.mark.parametrize("damage", ["truncated", "64 bytes flipped"])
def test_a_damaged_checkpoint_is_refused_with_the_older_ones_to_fall_back_to(data_dir, tmp_path, damage):
    run = tmp_path / "run"
    train.main(settings(data_dir, run, max_steps=3))
    target = (run / "ckpt.pt").resolve()
    content = bytearray(target.read_bytes())
    if damage == "truncated":
        content = content[:1000]
    else:  # in the middle of the weights: the zip's directory is intact, torch.load would read it
        middle = len(content) // 2
        content[middle:middle + 64] = bytes(255 - b for b in content[middle:middle + 64])
    target.write_bytes(bytes(content))
    with pytest.raises(UserError, match=r"ckpt_0000003.pt is damaged .*older one \(ckpt_0000002.pt, ckpt_0000001.pt\)"):
        train.main(settings(data_dir, run, max_steps=3, resume=True))


def test_a_missing_ckpt_link_names_the_newest_checkpoint(data_dir, tmp_path):
    run = tmp_path / "run"
    train.main(settings(data_dir, run, max_steps=3))
    (run / "ckpt.pt").unlink()
    with pytest.raises(UserError, match=r"ckpt.pt is missing .* point it at the newest, ln -sfn ckpt_0000003.pt"):
        train.main(settings(data_dir, run, max_steps=3, resume=True))


def test_a_checkpoint_of_other_settings_is_refused_with_the_differences(data_dir, tmp_path):
    run = tmp_path / "run"
    train.main(settings(data_dir, run, max_steps=3))
    with pytest.raises(UserError, match=r"lr: checkpoint 0.01, this run 0.02; s: checkpoint 4, this run 6\)"):
        train.main(settings(data_dir, run, max_steps=3, resume=True, s=6, lr=0.02))


def poison_after(monkeypatch, steps):
    """The loss turns NaN from training step `steps` on."""
    calls = {"n": 0}
    real = model.chunked_loss

    def poisoned(*args):
        loss = real(*args)
        if torch.is_grad_enabled():  # training steps, not evaluations
            calls["n"] += 1
        return loss * float("nan") if calls["n"] > steps else loss
    monkeypatch.setattr(model, "chunked_loss", poisoned)


def test_a_nan_loss_stops_the_run_with_the_command_that_branches_from_the_last_good_checkpoint(data_dir, tmp_path,
                                                                                              monkeypatch):
    poison_after(monkeypatch, 5)
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"step 5: loss nan.* stopped before the update; the last checkpoint "
                                        r"\(ckpt_0000005.pt\) .* --init_from=\S*ckpt_0000005.pt --lr=0.0025 "
                                        r"--out_dir=\S*run_lr"):
        train.main(settings(data_dir, run, eval_interval=100))
    ckpt = torch.load(run / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 5 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_a_nan_loss_before_any_checkpoint_does_not_mention_one(data_dir, tmp_path, monkeypatch):
    poison_after(monkeypatch, 0)
    with pytest.raises(UserError, match=r"step 0: .*no checkpoint was written yet: start again with a lower lr: "
                                        r"python train.py .*--lr=0.0025$"):
        train.main(settings(data_dir, tmp_path / "run", ckpt_interval=100))


@pytest.mark.parametrize("override,message", [
    ("--r=1.0", "r=1.0: the superposition fraction must be in"),
    ("--s=0", "s=0: the bag size must be an integer >= 1"),
    ("--tst_mode=both", "tst_mode='both'"),
    ("--bag_weights=square", "bag_weights='square'"),
    ("--bag_weights=power:abc", "power:K needs a number K"),
    ("--s_schedule=[(0.15, 8), (0.3, 4)]", "set either s and r, or s_schedule"),
    ("--eval_tokens=0", "eval_tokens=0: an evaluation scores at least one row"),
    ("--out_dir=", "out_dir is empty"),
    ("--seed=-1", "seed=-1: must be in"),
    ("--lr=fast", "lr='fast' is a str, but lr takes a float"),
    ("--bag_size=4", "unknown setting 'bag_size'"),
    ("--global_batch_tokens=1000", "global_batch_tokens=1000 is not a multiple of batch_size * seq_len"),
    ("--seq_len=4096", "seq_len=4096 exceeds max_seq_len=128"),
    ("--n_kv_heads=3", "multiple of n_kv_heads"),
    ("--warmup_steps=2750", "warmup_steps=2750: must fit before the decay"),
    ("--s", "write overrides as --key=value"),
    # each of these was a traceback (ZeroDivisionError, RuntimeError, AdamW's ValueError) or a NaN at step 0
    ("--batch_size=0", "batch_size=0: must be >= 1"),
    ("--seq_len=0", "seq_len=0: must be >= 1"),
    ("--n_heads=0", "n_heads=0: must be >= 1"),
    ("--n_kv_heads=0", "n_kv_heads=0: must be >= 1"),
    ("--ffn_dim=-1", "ffn_dim=-1 must be an integer >= 1"),
    ("--init_std=-1.0", "init_std=-1.0: must be a number > 0"),
    ("--beta1=1.5", "beta1=1.5: must be in [0, 1)"),
    ("--beta2=-0.1", "beta2=-0.1: must be in [0, 1)"),
    ("--norm_eps=-1.0", "norm_eps=-1.0: must be a number > 0"),
    ("--lr=1e999", "lr=inf: must be a number > 0"),
    ("--bag_weights=['a','b','c']", "bag_weights=['a', 'b', 'c']: an explicit list needs s=2 numbers"),
    ("--s_schedule=[('a', 4)]", "s_schedule=[('a', 4)]: each stage is a pair (end_fraction, s) of a number"),
    # and these were accepted
    ("--batch_size=True", "batch_size=True is a bool, but batch_size takes an int"),
    ("--n_layers=-1", "n_layers=-1: must be >= 1"),
    ("--dim=0", "dim=0: must be >= 1"),
    ("--weight_decay=-1.0", "weight_decay=-1.0: must be a number >= 0"),
    ("--global_batch_tokens=-2048", "global_batch_tokens=-2048: must be >= 0"),
    ("--compile=1", "compile=1 is an int, but compile takes a bool"),
    ("--init_weights_only=True", "init_weights_only=True needs init_from"),
    ("--bag_loss=sum", "bag_loss='sum': use one of mce, sum_to_one"),
])
def test_bad_settings_are_rejected_before_any_work(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        train_config.load([str(ROOT / "config" / "tiny_tst.py"), override])


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
def test_an_out_dir_that_cannot_be_written_is_refused_before_the_data_and_model(data_dir, tmp_path, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    out_dir = {"a file": blocker, "under a file": blocker / "run", "read-only": tmp_path / "ro" / "run"}[where]
    if where == "read-only":
        (tmp_path / "ro" / "run").mkdir(parents=True)
        os.chmod(tmp_path / "ro" / "run", 0o555)
        if os.access(tmp_path / "ro" / "run", os.W_OK):  # root ignores permissions
            pytest.skip("this user can write to read-only folders")
    built = []
    real = train.build_model
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train, "build_model", lambda *a: built.append(1) or real(*a))
        with pytest.raises(UserError, match=f"out_dir={re.escape(str(out_dir))} (cannot be made a folder|is not writable)"):
            train.main(settings(data_dir / "missing", out_dir))  # the data folder is checked later: never reached
    assert not built


def test_config_files_and_overrides(tmp_path):
    c = train_config.load([str(ROOT / "config" / "270m_tst.py"), "--max_steps=10000", "--lr=1e-3"])
    assert (c["dim"], c["n_layers"], c["n_heads"], c["n_kv_heads"], c["ffn_dim"]) == (576, 30, 9, 9, 1536)
    assert (c["s"], c["r"], c["max_steps"], c["lr"]) == (6, 0.3, 10000, 1e-3)
    assert c["global_batch_tokens"] == 2 * 2**20 and c["warmup_steps"] == 2000
    bad = tmp_path / "bad.py"
    bad.write_text("learning_rate = 1e-3\n")
    with pytest.raises(UserError, match="bad.py: unknown setting 'learning_rate'"):
        train_config.load([str(bad)])


@pytest.mark.parametrize("name", ["270m", "600m", "3b"])
def test_paper_configs_build_the_named_shapes(name):
    from model import NAMED_SHAPES, ModelConfig
    c = train_config.load([str(ROOT / "config" / f"{name}_tst.py")])
    assert ModelConfig(**{k: c[k] for k in train_config.MODEL_KEYS}) == NAMED_SHAPES[name]


def test_every_config_parses():
    for path in sorted((ROOT / "config").glob("*.py")):
        train_config.load([str(path)])


def test_a_row_longer_than_the_data_fails_early(data_dir, tmp_path):
    with pytest.raises(UserError, match="rows of 65,537 tokens do not fit any shard .*its largest: 56,958 tokens"):
        train.main(settings(data_dir, tmp_path / "run", s=4096))  # rows of 65,537 tokens


def test_missing_data_names_the_command_to_prepare_it(tmp_path):
    with pytest.raises(UserError, match="python prepare.py --source dclm"):
        train.main(settings(tmp_path / "nothing", tmp_path / "run", data_source="dclm"))


DISTRIBUTED_SCRIPT = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import train
if os.environ.get("LEARNED_COMBINER"):  # a fork's bag combiner, with parameters
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tst, learned_combiner
    tst.BagCombiner = learned_combiner.AttentionPooling
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


def torchrun(tmp_path, args, **env):
    """Two processes under torchrun (gloo on CPU); returns each rank's final weights."""
    script = tmp_path / "distributed_run.py"
    script.write_text(DISTRIBUTED_SCRIPT.format(root=str(ROOT)))
    (tmp_path / "learned_combiner.py").write_text(LEARNED_COMBINER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "--",  # everything after it is the script's: torchrun's parser would take --s and --r for its own options
           *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WEIGHTS_DIR": str(tmp_path), **env}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return [torch.load(tmp_path / f"rank{i}.pt") for i in (0, 1)]


def test_ddp_two_processes_match_one_process_with_the_global_batch(data_dir, tmp_path):
    # 2 ranks x 2 rows x 2 micro-steps are the same global batch as 1 process x 8 rows: disjoint rows, none lost
    rank0, rank1 = torchrun(tmp_path, settings(data_dir, tmp_path / "ddp", max_steps=6, batch_size=2,
                                               global_batch_tokens=128))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # gradients were synchronised
    # one process, gradient accumulation: 4 micro-steps of 2 rows
    single = train.main(settings(data_dir, tmp_path / "single", max_steps=6, batch_size=2, global_batch_tokens=128))
    ddp_log, single_log = read_log(tmp_path / "ddp"), read_log(tmp_path / "single")
    # the validation rows are split among the processes, not multiplied by them: the same figure for the same weights
    val = [(a["val_loss"], b["val_loss"]) for a, b in zip(ddp_log, single_log) if "val_loss" in a]
    assert len(val) == 3 and all(abs(a - b) < 1e-5 for a, b in val)
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


# A fork's idea with parameters: attention pooling over the bag instead of the mean (tst.BagCombiner's contract)
LEARNED_COMBINER = """
import torch


class AttentionPooling(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.score = torch.nn.Linear(dim, 1, bias=True)

    def forward(self, vectors, tokens):  # (B, T, s, dim), which are tokens (not padding) (B, T, s) -> (B, T, dim)
        weights = self.score(vectors).float().masked_fill(~tokens[..., None], float("-inf")).softmax(dim=2)
        return (weights * vectors.float()).sum(dim=2).to(vectors.dtype)
"""


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_a_learned_bag_combiner_trains_in_superposition_only_and_survives_the_switch_under_torchrun(
        data_dir, tmp_path, sharding):
    run = tmp_path / "run"
    args = settings(data_dir, run, max_steps=6, r=0.5, batch_size=2 if sharding == "ddp" else 4,
                    global_batch_tokens=128 if sharding == "ddp" else 0, fsdp=sharding == "fsdp")
    rank0, rank1 = torchrun(tmp_path, args, LEARNED_COMBINER="1")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    keys = ["bag_combiner.score.weight", "bag_combiner.score.bias"]
    assert set(keys) <= set(rank0)

    def combiner_at(step):
        path = run / f"ckpt_{step:07d}.pt"
        if path.is_dir():  # FSDP: shards; read them whole in this process
            import checkpoint
            import learned_combiner
            import tst
            sys.path.insert(0, str(tmp_path))
            with pytest.MonkeyPatch.context() as m:
                m.setattr(tst, "BagCombiner", learned_combiner.AttentionPooling)
                state = checkpoint.load_model(path)[0].state_dict()
        else:
            state = torch.load(path, weights_only=False)["model"]
        return [state[k] for k in keys]
    sys.path.insert(0, str(tmp_path))
    at_1, at_switch, at_end = combiner_at(1), combiner_at(3), combiner_at(6)
    assert not torch.equal(at_1[0], at_switch[0])  # trained in superposition
    assert all(torch.equal(a, b) for a, b in zip(at_switch, at_end))  # no gradient after the switch: untouched
    assert all(torch.equal(a, rank0[k]) for a, k in zip(at_end, keys))
    assert [r["phase"] for r in read_log(run)] == [1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("mode,per_position", [("input", 4), ("output", 1)])
def test_ablation_modes_consume_the_right_data(data_dir, tmp_path, mode, per_position):
    train.main(settings(data_dir, tmp_path / "run", tst_mode=mode, bag_weights="[1, 2, 3, 4]", max_steps=4))
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


def test_reinit_at_switch_under_fsdp_draws_the_whole_tensor_not_one_per_shard(data_dir, tmp_path):
    # two steps, the switch after the first, lr too small to move anything: the final weights are the re-drawn ones
    args = dict(max_steps=2, r=0.5, lr=1e-9, warmup_steps=0, reinit_at_switch=True, eval_interval=100)
    sharded = torchrun(tmp_path, settings(data_dir, tmp_path / "fsdp", fsdp=True, **args))[0]
    single = train.main(settings(data_dir, tmp_path / "single", **args)).state_dict()
    for key in ("embed.weight", "lm_head.weight"):  # 257 rows: shards of 129 and 128 rows
        torch.testing.assert_close(sharded[key], single[key], atol=1e-6, rtol=0)
        assert not torch.allclose(sharded[key][:128], sharded[key][129:], atol=1e-3)  # no shard repeats another


def test_reinit_at_switch_drops_the_moments_of_what_it_replaces(data_dir, tmp_path):
    _, after = switch_run(data_dir, tmp_path / "run", reinit_at_switch=True)
    steps = [int(v["step"]) for v in after["optimizer"]["state"].values()]
    assert sorted(steps) == [1, 1] + [2] * (len(steps) - 2)  # embedding and head restarted their moments


def test_a_fresh_run_refuses_a_folder_with_checkpoints(data_dir, tmp_path):
    train.main(settings(data_dir, tmp_path / "run", max_steps=2))
    with pytest.raises(UserError, match="--resume=True, or give this run a new out_dir"):
        train.main(settings(data_dir, tmp_path / "run", max_steps=2))


def test_a_tied_model_stays_tied_after_its_meta_construction(data_dir, tmp_path):
    model = train.main(settings(data_dir, tmp_path / "run", max_steps=2, tie_embeddings=True))
    assert model.lm_head.weight is model.embed.weight
    assert model.cfg.num_params() == sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# Several stages (s_schedule), resume across each switch, and the seams a new user found

SCHEDULE = "[(0.2, 8), (0.5, 2)]"  # 10 steps: s = 8 for steps 0-1, s = 2 for steps 2-4, next-token from step 5


def test_a_schedule_of_stages_end_to_end(data_dir, tmp_path):
    train.main(settings(data_dir, tmp_path / "run", s=1, r=0.0, s_schedule=SCHEDULE))
    log = read_log(tmp_path / "run")
    assert [r["s"] for r in log] == [8, 8, 2, 2, 2, 1, 1, 1, 1, 1]
    rows, T = 4, 16
    per_step = [r["positions"] - (log[i - 1]["positions"] if i else 0) for i, r in enumerate(log)]
    assert per_step == [rows * T] * 10  # equal FLOPs in every stage
    data_per_step = [r["data_tokens"] - (log[i - 1]["data_tokens"] if i else 0) for i, r in enumerate(log)]
    assert data_per_step == [rows * T * s for s in [8, 8, 2, 2, 2, 1, 1, 1, 1, 1]]
    evaluated = [r["step"] for r in log if "val_loss" in r]
    assert {1, 4} <= set(evaluated)  # the last step of each stage is evaluated


def test_resume_is_exact_across_every_stage_boundary(data_dir, tmp_path):
    full = tmp_path / "full"
    train.main(settings(data_dir, full, s=1, r=0.0, s_schedule=SCHEDULE, keep_last=1, ckpt_interval=100))
    names = sorted(p.name for p in full.glob("ckpt_*.pt"))
    assert names == ["ckpt_0000002.pt", "ckpt_0000005.pt", "ckpt_0000010.pt"]  # each boundary is kept
    expected = read_log(full)
    keys = ("step", "s", "loss", "grad_norm", "positions", "data_tokens", "lr", "val_loss")
    for step in (2, 5):
        resumed = resume_from(data_dir, full, step, tmp_path / f"from{step}", s=1, r=0.0, s_schedule=SCHEDULE,
                              keep_last=1, ckpt_interval=100)
        assert [{k: r.get(k) for k in keys} for r in resumed] == [{k: r.get(k) for k in keys} for r in expected]


def test_resuming_a_finished_run_says_so_and_changes_nothing(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train.main(settings(data_dir, run, max_steps=3))
    before = (run / "log.jsonl").read_text()
    train.main(settings(data_dir, run, max_steps=3, resume=True))
    assert "is complete: all 3 steps are done" in capsys.readouterr().out
    assert (run / "log.jsonl").read_text() == before


def test_resume_drops_a_log_line_torn_by_a_crash(data_dir, tmp_path):
    full = tmp_path / "full"
    train.main(settings(data_dir, full, max_steps=4))
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(full / "ckpt_0000002.pt", run / "ckpt_0000002.pt")
    (run / "ckpt.pt").symlink_to("ckpt_0000002.pt")
    lines = (full / "log.jsonl").read_text().splitlines(keepends=True)
    (run / "log.jsonl").write_text("".join(lines[:2]) + lines[2][:40])  # the disk filled while writing step 2
    train.main(settings(data_dir, run, max_steps=4, resume=True))
    assert [r["loss"] for r in read_log(run)] == [r["loss"] for r in read_log(full)]


def test_a_failed_save_names_the_file_and_step_and_leaves_no_partial_file(data_dir, tmp_path, monkeypatch):
    real_save = torch.save

    def disk_full(obj, path, *args, **kwargs):
        if str(path).endswith("ckpt_0000002.tmp"):
            Path(path).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"saving checkpoint .*ckpt_0000002.pt \(step 2\) failed: no space left on "
                                        r"device; the previous checkpoint ckpt_0000001.pt is intact"):
        train.main(settings(data_dir, run, max_steps=4))
    assert not list(run.glob("*.tmp")) and (run / "ckpt.pt").resolve().name == "ckpt_0000001.pt"
    monkeypatch.setattr(torch, "save", real_save)
    train.main(settings(data_dir, run, max_steps=4, resume=True))  # space freed: the run continues
    assert [r["step"] for r in read_log(run)] == [0, 1, 2, 3]


def test_the_data_folder_is_the_authority_on_its_tokenizer(data_dir, tmp_path):
    with pytest.raises(UserError, match=r"tokenizer='gpt2', but .* was prepared with 'bytes': set tokenizer='bytes'"):
        train.main(settings(data_dir, tmp_path / "run", tokenizer="gpt2"))


def test_a_damaged_validation_shard_is_found_at_start_up(data_dir, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    val = copy / "val_000000.bin"
    val.write_bytes(val.read_bytes()[:-10])
    with pytest.raises(UserError, match="val_000000.bin"):
        train.main(settings(copy, tmp_path / "run"))
    assert not (tmp_path / "run" / "log.jsonl").exists()  # before any step


def test_more_processes_than_gpus_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    config = train_config.load([str(ROOT / "config" / "tiny_baseline.py"), "--device=cuda"])
    with pytest.raises(UserError, match="2 processes on this node but 1 visible GPU.*--nproc_per_node=1"):
        train.setup_processes(config)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_clear_error():
    with pytest.raises(UserError, match="device=cuda, but this torch"):
        train.setup_processes(train_config.load([str(ROOT / "config" / "tiny_baseline.py"), "--device=cuda"]))


def test_user_mistakes_print_one_line_and_the_codes_errors_keep_their_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--seed=-1"], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == ["error: seed=-1: must be in [0, 2**32)"]
    assert not (tmp_path / "out").exists()  # nothing written before the settings are checked


# What the shipped configs promise in their comments: the data folder, its source and its tokenizer.
CONFIG_DATA = {
    "tiny_baseline.py": ("data/books_bytes", "books", "bytes"),
    "tiny_tst.py": ("data/books_bytes", "books", "bytes"),
    "tiny_moe_tst.py": ("data/books_bytes", "books", "bytes"),
    "small_baseline.py": ("data/fwedu_gpt2", "fineweb-edu:sample-10BT", "gpt2"),
    "small_tst.py": ("data/fwedu_gpt2", "fineweb-edu:sample-10BT", "gpt2"),
    "270m_baseline.py": ("data/dclm_llama3", "dclm", "llama3:tokenizer.model"),
    "270m_tst.py": ("data/dclm_llama3", "dclm", "llama3:tokenizer.model"),
    "600m_baseline.py": ("data/dclm_llama3", "dclm", "llama3:tokenizer.model"),
    "600m_tst.py": ("data/dclm_llama3", "dclm", "llama3:tokenizer.model"),
    "3b_baseline.py": ("data/dclm_llama3", "dclm", "llama3:tokenizer.model"),
    "3b_tst.py": ("data/dclm_llama3", "dclm", "llama3:tokenizer.model"),
    "10b_a1b_baseline.py": ("data/dclm_fwedu_llama3", "0.5*dclm,0.5*fineweb-edu", "llama3:tokenizer.model"),
    "10b_a1b_tst.py": ("data/dclm_fwedu_llama3", "0.5*dclm,0.5*fineweb-edu", "llama3:tokenizer.model"),
}


def test_train_prepares_an_offline_corpus_again_where_an_older_prepare_py_left_no_record_and_refuses_others(
        tmp_path, data_dir, capsys):
    import prepare
    folder = tmp_path / "books"
    prepare.prepare("books", "bytes", folder, num_proc=1)
    reference = json.loads((folder / "meta.json").read_text())
    older = {k: v for k, v in reference.items() if k not in ("format", "corpus")}
    (folder / "meta.json").write_text(json.dumps(older))
    config = dict(train_config.DEFAULTS, data_dir=str(folder), data_source="books")
    assert train.open_data(config, rank=0)["corpus"] == reference["corpus"]
    assert "preparing the offline corpus in " in capsys.readouterr().out
    # any other source is refused, with the command that prepares it again (or at all)
    other = tmp_path / "other"
    shutil.copytree(data_dir, other)
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "format"}))
    config.update(data_dir=str(other), data_source=meta["source"])
    with pytest.raises(UserError, match=rf"^data_dir={other} was prepared by an older prepare.py, which did not record "
                                        rf"its corpus: prepare it with python prepare.py --source "):
        train.open_data(config, rank=0)
    with pytest.raises(UserError, match=rf"^data_dir={tmp_path / 'none'} holds no prepared data: prepare it with "
                                        rf"python prepare.py --source .* --tokenizer bytes --out_dir {tmp_path / 'none'}$"):
        train.open_data(dict(config, data_dir=str(tmp_path / "none")), rank=0)


def test_every_config_resolves_to_the_data_and_tokenizer_it_promises():
    shipped = {p.name for p in (ROOT / "config").glob("*.py")}
    assert set(CONFIG_DATA) <= shipped
    for name in sorted(shipped):
        config = train_config.load([str(ROOT / "config" / name)])
        if name in CONFIG_DATA:
            assert (config["data_dir"], config["data_source"], config["tokenizer"]) == CONFIG_DATA[name], name
        elif config["data_source"] in ("books", "stdlib"):
            assert config["tokenizer"] == "bytes", name
        else:  # a config for another corpus names its own data folder, not the offline default's
            assert config["data_dir"] != train_config.DEFAULTS["data_dir"], name
        llama = config["tokenizer"].startswith("llama3:")
        assert (config["vocab_size"] == model.LLAMA3_VOCAB) == llama, name


# Forks: what a researcher edits is what trains, and removing TST leaves the baseline

def copy_project(tmp_path, edit=lambda name, text: text):
    """The repository's Python files (top level, tools/, bench/, config/) in tmp_path/fork, each edited by
    edit(path relative to the root, text), which may return None to leave the file out."""
    fork = tmp_path / "fork"
    for pattern in ("*.py", "tools/*.py", "bench/*.py", "config/*.py"):
        for file in ROOT.glob(pattern):
            name = str(file.relative_to(ROOT))
            text = edit(name, file.read_text())
            if text is not None:
                (fork / name).parent.mkdir(parents=True, exist_ok=True)
                (fork / name).write_text(text)
    return fork


def run_copy(fork, args, script="train.py"):
    result = subprocess.run([sys.executable, str(fork / script), *map(str, args)], capture_output=True, text=True,
                            cwd=fork, env={**os.environ, "PYTHONPATH": str(fork), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_a_fork_that_doubles_mce_loss_trains_on_twice_the_loss(data_dir, tmp_path):
    def double(name, text):
        if name != "tst.py":
            return text
        text = text.replace("def mce_loss(", "def stock_mce_loss(")
        return text + "\n\ndef mce_loss(*args, **kwargs):\n    return 2 * stock_mce_loss(*args, **kwargs)\n"
    fork = copy_project(tmp_path, double)
    run_copy(fork, settings(data_dir, tmp_path / "fork_run", max_steps=2, r=0.5))
    train.main(settings(data_dir, tmp_path / "stock", max_steps=2, r=0.5))
    fork_log, stock_log = read_log(tmp_path / "fork_run"), read_log(tmp_path / "stock")
    assert fork_log[0]["phase"] == 1 and fork_log[0]["loss"] == 2 * stock_log[0]["loss"]  # exactly


# Removing TST from a fork: delete the files that are the method (tst.py, and bench/mce.py, its loss's benchmark) and
# every line marked "# TST", anywhere. What is left trains exactly the baseline, and its tools work on what it trains.
def test_deleting_the_marked_lines_leaves_exactly_the_baseline_trainer_and_working_tools(data_dir, tmp_path):
    def delete_tst(name, text):
        if name in ("tst.py", "bench/mce.py"):
            return None
        return "".join(line for line in text.splitlines(keepends=True) if "# TST" not in line)
    fork = copy_project(tmp_path, delete_tst)
    for path in fork.rglob("*.py"):
        assert "import tst" not in path.read_text(), path  # nothing uses the method any more
    args = [a for a in settings(data_dir, tmp_path / "fork_run", max_steps=4) if not a.startswith(("--s=", "--r="))]
    run_copy(fork, args)  # the fork has no such settings
    train.main(settings(data_dir, tmp_path / "baseline", s=1, r=0.0, max_steps=4))
    keys = ("step", "loss", "grad_norm", "positions", "data_tokens", "val_loss")
    assert [{k: r.get(k) for k in keys} for r in read_log(tmp_path / "fork_run")] == \
        [{k: r.get(k) for k in keys} for r in read_log(tmp_path / "baseline")]
    # the fork's evaluation, comparison and plan work on what it trained
    assert "heldout_val" in run_copy(fork, ["--ckpt", tmp_path / "fork_run" / "ckpt.pt", "--device", "cpu"], "eval.py")
    assert "fork_run" in run_copy(fork, [tmp_path / "fork_run", "--baseline", tmp_path / "baseline", "--out", tmp_path / "plots"],
                                  "tools/compare.py")
    assert "total: 4 steps" in run_copy(fork, args, "tools/plan.py")


def test_document_aware_bags_count_only_real_tokens_and_resume_exactly(tmp_path):
    import prepare
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(300):  # short documents: most bags of 4 bytes hold an end of text now and then
        (docs / f"{i:03d}.txt").write_text(f"doc {i} " + "ab" * (i % 7))
    prepare.prepare(str(docs / "*.txt"), "bytes", tmp_path / "data", val_tokens=600, num_proc=1)
    full = tmp_path / "full"
    train.main(settings(tmp_path / "data", full, doc_bags=True, r=0.5))
    log = read_log(full)
    read = [b["data_tokens"] - a["data_tokens"] for a, b in zip([{"data_tokens": 0}] + log, log)]
    assert all(0 < n < 4 * 4 * 16 for n in read[:5])  # phase 1: the padding after each end of text is not counted
    assert read[5:] == [4 * 16] * 5
    plain = tmp_path / "plain"
    train.main(settings(tmp_path / "data", plain, r=0.5))
    assert read_log(plain)[0]["loss"] != log[0]["loss"] and read_log(plain)[0]["data_tokens"] == 4 * 4 * 16
    resumed = resume_from(tmp_path / "data", full, 3, tmp_path / "resumed", doc_bags=True, r=0.5)
    keys = ("step", "loss", "grad_norm", "data_tokens")
    assert [{k: r[k] for k in keys} for r in resumed] == [{k: r[k] for k in keys} for r in log]
