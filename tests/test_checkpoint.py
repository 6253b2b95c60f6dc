"""checkpoint.py: what is written is what is read back, or the damage is named."""

import errno
import json
import re
import shutil
import types
import warnings
import zipfile
from unittest import mock

import pytest
import torch
import torch.distributed as dist

import checkpoint
import config as settings
import data
import resume
from cli import UserError
from conftest import settings as argv
from model import ModelConfig, Transformer


def tiny():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8)))[0].backward()
    optimizer.step()
    return model, optimizer


def train_state(model, step):
    return {"config": {"tokenizer": "bytes"}, "model_config": model.cfg.to_dict(), "step": step, "loader": {},
            "totals": {}, "rng": []}


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_sharded_checkpoint_lists_a_checksum_of_every_file_and_is_read_back(tmp_path, one_process_group):
    model, optimizer = tiny()
    path = checkpoint.save(tmp_path, 3, model, optimizer, train_state(model, 3), fsdp=True)
    listed = json.loads((path / checkpoint.CHECKSUMS).read_text())
    assert set(listed) == {f.name for f in path.iterdir()} - {checkpoint.CHECKSUMS}
    assert "train_state.pt" in listed and any(name.endswith(".distcp") for name in listed)
    loaded, state = checkpoint.load_model(tmp_path / "ckpt.pt")
    assert state["step"] == 3
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_damage_to_any_file_of_a_sharded_checkpoint_is_named(tmp_path, one_process_group):
    model, optimizer = tiny()
    checkpoint.save(tmp_path, 1, model, optimizer, train_state(model, 1), fsdp=True)
    path = checkpoint.save(tmp_path, 2, model, optimizer, train_state(model, 2), fsdp=True)
    shard = next(f for f in path.iterdir() if f.name.endswith(".distcp"))
    content = bytearray(shard.read_bytes())
    content[len(content) // 2] ^= 0xFF
    shard.write_bytes(bytes(content))
    with pytest.raises(UserError, match=rf"ckpt_0000002.pt is damaged \({shard}.* checksum\): fall back to an older "
                                        rf"one \(ckpt_0000001.pt\)"):
        checkpoint.load_model(path)
    (path / checkpoint.CHECKSUMS).unlink()
    with pytest.raises(UserError, match="checksums.json is missing"):
        checkpoint.verify(path)


def test_a_flipped_byte_in_a_file_checkpoint_is_found_by_the_zips_crc(tmp_path):
    model, optimizer = tiny()
    path = checkpoint.save(tmp_path, 5, model, optimizer, train_state(model, 5))
    checkpoint.verify(path)  # intact
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0x01  # one bit, in the tensors' bytes
    path.write_bytes(bytes(content))
    torch.load(path, weights_only=False)  # torch itself reads it without a word
    with pytest.raises(UserError, match=r"does not match its CRC-32\): no older checkpoint is left"):
        checkpoint.verify(tmp_path / "ckpt.pt")


def test_a_zip_that_is_not_a_checkpoint_is_refused_in_one_line(tmp_path):
    path = tmp_path / "ckpt_0000001.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "not a checkpoint")
    with pytest.raises(UserError, match="is not a checkpoint written by train.py"):
        checkpoint.load_model(path)


def test_only_the_newest_and_kept_checkpoints_stay(tmp_path):
    model, optimizer = tiny()
    for step in range(1, 6):
        checkpoint.save(tmp_path, step, model, optimizer, train_state(model, step), keep_last=2, keep_steps=[2])
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == ["ckpt_0000002.pt", "ckpt_0000004.pt",
                                                                  "ckpt_0000005.pt"]
    assert (tmp_path / "ckpt.pt").resolve().name == "ckpt_0000005.pt" and not list(tmp_path.glob("*.tmp"))


# -----------------------------------------------------------------------------
# Every byte of a checkpoint is checked; a damaged one is refused in one line that names what to fall back to

def two_checkpoints(tmp_path, fsdp=False, **save_state):
    """A run's folder with ckpt_0000001.pt and ckpt_0000002.pt (ckpt.pt links to it): (its path, the model)."""
    model, optimizer = tiny()
    tmp_path.mkdir(parents=True, exist_ok=True)
    checkpoint.save(tmp_path, 1, model, optimizer, train_state(model, 1), fsdp=fsdp)
    path = checkpoint.save(tmp_path, 2, model, optimizer, {**train_state(model, 2), **save_state}, fsdp=fsdp)
    return path, model


def central_directory(raw):
    """Where a zip's central directory starts (torch.save writes a zip64 end record, then the plain one)."""
    end = raw.rfind(b"PK\x05\x06")
    return int.from_bytes(raw[end + 16:end + 20], "little")


def refused_or_identical(path, raw, positions, model):
    """Flip each byte of `positions` in a copy of `raw` at `path` and load it: each load must be refused in one
    UserError that names the file and the checkpoint to fall back to, or give exactly the original tensors.
    Returns how many were refused."""
    refused = 0
    for pos in positions:
        damaged = bytearray(raw)
        damaged[pos] ^= 0xFF
        path.write_bytes(bytes(damaged))
        try:
            loaded, _ = checkpoint.load_model(path)
        except UserError as e:
            assert path.name in str(e) and "ckpt_0000001.pt" in str(e) and "\n" not in str(e), (pos, str(e))
            refused += 1
            continue
        original = model.state_dict()
        assert loaded.state_dict().keys() == original.keys(), pos
        assert all(torch.equal(loaded.state_dict()[k], original[k]) for k in original), pos
    path.write_bytes(raw)
    return refused


def test_every_byte_of_a_file_checkpoint_is_covered_by_its_checksum(tmp_path):
    path, model = two_checkpoints(tmp_path)
    raw = path.read_bytes()
    # every byte of the zip's central directory and end records (one entry's "folder" bit loaded zeros), and a
    # byte every 500 across the rest
    positions = [*range(central_directory(raw), len(raw)), *range(0, central_directory(raw), 500)]
    assert len(positions) > 1000
    assert refused_or_identical(path, raw, positions, model) == len(positions)  # the whole-file CRC-32 sees each
    checkpoint.load_model(tmp_path / "ckpt.pt")  # intact again
    torch.load(path, weights_only=False)  # and still a file torch reads


def test_a_file_of_the_previous_format_loads_and_damage_to_its_directory_is_refused_or_harmless(tmp_path):
    path, model = two_checkpoints(tmp_path)
    state = torch.load(path, weights_only=False)
    torch.save(state, path)  # as save wrote it before the whole-file CRC-32: the zip's per-entry CRC-32s alone
    loaded, _ = checkpoint.load_model(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    raw = path.read_bytes()
    entries = [central_directory(raw)]  # where each entry of the directory starts (46 bytes, then name, extra, comment)
    while raw[entries[-1]:entries[-1] + 4] == b"PK\x01\x02":
        entries.append(entries[-1] + 46 + sum(int.from_bytes(raw[entries[-1] + i:entries[-1] + i + 2], "little")
                                              for i in (28, 30, 32)))
    # every byte of two entries and of the end records; each entry's external attributes (its "folder" bit)
    positions = {*range(entries[0], entries[2]), *range(entries[-1], len(raw)), *(e + 38 for e in entries[:-1])}
    refused_or_identical(path, raw, sorted(positions), model)


def fsdp_damage(path):
    """Ways to damage an FSDP checkpoint folder, each a function of the folder -> what the refusal names."""
    listed = path / checkpoint.CHECKSUMS

    def flip(f):
        content = bytearray(f.read_bytes())
        content[len(content) // 2] ^= 0xFF
        f.write_bytes(bytes(content))

    def shard():
        return next(f for f in sorted(path.iterdir()) if f.name.endswith(".distcp"))

    def emptied_and_a_flipped_shard():
        listed.write_text("{}")
        flip(shard())
        return "not listed in checksums.json"

    def a_dropped_entry_and_a_flipped_shard():
        checksums = json.loads(listed.read_text())
        del checksums[shard().name]
        listed.write_text(json.dumps(checksums))
        flip(shard())
        return "not listed in checksums.json"

    def a_list():
        listed.write_text("[]")
        return "checksums.json is not"

    def null():
        listed.write_text("null")
        return "checksums.json is not"

    def a_checksum_that_is_a_string():
        listed.write_text(json.dumps({k: str(v) for k, v in json.loads(listed.read_text()).items()}))
        return "checksums.json is not"

    def an_extra_file():
        (path / "notes.txt").write_text("an extra file")
        return "notes.txt is not listed in checksums.json"

    def a_listed_file_missing():
        (path / "train_state.pt").unlink()
        return "train_state.pt is missing"

    def not_json():
        listed.write_bytes(b"\xff{")
        return "checksums.json is not JSON"

    return [emptied_and_a_flipped_shard, a_dropped_entry_and_a_flipped_shard, a_list, null,
            a_checksum_that_is_a_string, an_extra_file, a_listed_file_missing, not_json]


def test_a_sharded_checkpoints_checksums_must_list_every_file_of_its_folder(tmp_path, one_process_group):
    path, _ = two_checkpoints(tmp_path / "run", fsdp=True)
    intact = tmp_path / "intact"
    shutil.copytree(path, intact)
    for damage in fsdp_damage(path):
        named = damage()
        with pytest.raises(UserError, match=rf"^checkpoint {path} is damaged \(.*{named}.*\): fall back to an older "
                                            rf"one \(ckpt_0000001.pt\)") as refused:
            checkpoint.load_model(path)
        assert "\n" not in str(refused.value), damage.__name__
        shutil.rmtree(path)
        shutil.copytree(intact, path)
    checkpoint.load_model(path)  # the intact copy loads


def test_a_damaged_or_folder_shaped_ckpt_link_names_the_checkpoints_beside_it(tmp_path):
    path, _ = two_checkpoints(tmp_path)
    latest = tmp_path / "ckpt.pt"
    both = r"ckpt_0000002.pt, ckpt_0000001.pt"
    latest.unlink()
    latest.mkdir()  # a folder where the link was
    with pytest.raises(UserError, match=rf"ckpt.pt is damaged .*: fall back to another checkpoint of that folder "
                                        rf"\({both}\), e.g. rm -r {latest} && ln -s ckpt_0000002.pt {latest}, then"):
        checkpoint.read_train_state(checkpoint.newest(tmp_path))
    latest.rmdir()
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 1
    latest.write_bytes(bytes(damaged))  # a damaged copy where the link was
    for load in (checkpoint.load_model, checkpoint.read_train_state):
        with pytest.raises(UserError, match=rf"ckpt.pt is damaged .*CRC-32.*\({both}\)") as refused:
            load(latest)
        assert "no older checkpoint" not in str(refused.value)


def test_a_ckpt_link_in_a_loop_or_to_nothing_is_named_with_the_checkpoints_to_point_it_at(tmp_path):
    two_checkpoints(tmp_path)
    latest = tmp_path / "ckpt.pt"
    latest.unlink()
    latest.symlink_to("ckpt.pt")  # a loop
    with pytest.raises(UserError, match=r"ckpt.pt is a symlink loop \(it links to ckpt.pt\), but .* holds "
                                        r"ckpt_0000001.pt, ckpt_0000002.pt: point it at the newest, ln -sfn "
                                        r"ckpt_0000002.pt"):
        checkpoint.newest(tmp_path)
    for load in (checkpoint.load_model, checkpoint.read_train_state, checkpoint.verify):
        with pytest.raises(UserError, match=r"ckpt.pt is a symlink loop.*\(ckpt_0000002.pt, ckpt_0000001.pt\)"):
            load(latest)
    latest.unlink()
    latest.symlink_to("ckpt_0000009.pt")
    with pytest.raises(UserError, match=r"ckpt.pt links to ckpt_0000009.pt, which does not exist, but .* holds "
                                        r"ckpt_0000001.pt, ckpt_0000002.pt: point it at the newest, ln -sfn "
                                        r"ckpt_0000002.pt"):
        checkpoint.newest(tmp_path)
    with pytest.raises(UserError, match=r"ckpt.pt links to ckpt_0000009.pt, which does not exist.*ckpt_0000002.pt"):
        checkpoint.load_model(latest)


def test_every_refusal_of_a_run_folders_checkpoint_names_the_others(tmp_path):
    path, _ = two_checkpoints(tmp_path)
    with zipfile.ZipFile(path, "w") as z:  # a sound zip, but not what torch.save writes
        z.writestr("notes.txt", "not a checkpoint")
    with pytest.raises(UserError, match=r"ckpt_0000002.pt is not a checkpoint written by train.py .*fall back to an "
                                        r"older one \(ckpt_0000001.pt\)"):
        checkpoint.load_model(path)
    oldest = tmp_path / "ckpt_0000001.pt"
    oldest.write_bytes(oldest.read_bytes()[:-100])  # the oldest damaged: the newer one is named
    with pytest.raises(UserError, match=r"ckpt_0000001.pt is damaged .*: no older checkpoint is left in that folder; "
                                        r"a newer one is \(ckpt_0000002.pt\)"):
        checkpoint.load_model(oldest)


# -----------------------------------------------------------------------------
# Weights that do not fit the model

def test_weights_that_do_not_fit_their_model_config_are_refused_with_the_likely_setting(tmp_path):
    model, _ = tiny()
    cases = {  # what the saved model_config claims -> what the refusal names
        "n_layers": ({"n_layers": 2}, r"lacks layers.1.attn_norm.weight .*most likely n_layers: its model_config "
                                      r"says n_layers=2"),
        "vocab_size": ({"vocab_size": 60}, r"embed.weight is \(50, 16\) in it, \(60, 16\) in the model .*most likely "
                                           r"vocab_size"),
        "n_experts": ({"n_experts": 2, "top_k": 1, "expert_ffn_dim": 8}, r"lacks layers.0.mlp.expert_bias .*most "
                                                                         r"likely n_experts"),
        "dim": ({"dim": 32, "n_heads": 2, "n_kv_heads": 2}, r"embed.weight is \(50, 16\) in it, \(50, 32\) in the "
                                                            r"model .*most likely dim"),
    }
    for name, (claimed, message) in cases.items():
        run = tmp_path / name
        run.mkdir()
        state = {**train_state(model, 1), "model_config": {**model.cfg.to_dict(), **claimed}}
        path = checkpoint.save(run, 1, model, torch.optim.AdamW(model.parameters()), state)
        with pytest.raises(UserError, match=rf"^checkpoint {path} does not fit the model: .*{message}") as refused:
            checkpoint.load_model(path)
        assert "\n" not in str(refused.value)


def test_a_model_of_other_settings_is_refused_naming_the_setting(tmp_path, one_process_group):
    model, optimizer = tiny()
    wider = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32))
    deeper = Transformer(ModelConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=32))
    for fsdp in (False, True):
        (tmp_path / str(fsdp)).mkdir()
        path = checkpoint.save(tmp_path / str(fsdp), 1, model, optimizer, train_state(model, 1), fsdp=fsdp)
        state = checkpoint.read_train_state(path)
        with pytest.raises(UserError, match=r"does not fit the model: embed.weight is \(50, 16\) in it, \(50, 32\) in "
                                            r"the model \(most likely dim: the checkpoint's model_config has dim=16, "
                                            r"this model dim=32\)"):
            checkpoint.load_into(path, state, wider)
        with pytest.raises(UserError, match=r"lacks layers.1.attn_norm.weight \(most likely n_layers: the "
                                            r"checkpoint's model_config has n_layers=1, this model n_layers=2\)"):
            checkpoint.load_into(path, state, deeper, torch.optim.AdamW(deeper.parameters()))


# -----------------------------------------------------------------------------
# One live run per out_dir

def test_a_deleted_lock_file_does_not_let_a_second_run_into_a_live_runs_folder(tmp_path):
    held = resume.lock(tmp_path)
    try:
        (tmp_path / "run.lock").unlink()  # a tidy-up while the run lives
        with pytest.raises(UserError, match=rf"out_dir={tmp_path} is in use by a live run"):
            resume.lock(tmp_path)
        assert not (tmp_path / "run.lock").exists()  # the refused attempt leaves nothing
    finally:
        held.close()
    resume.lock(tmp_path).close()  # the run ended: the folder is free


def test_a_lock_path_that_is_not_a_file_is_named_in_one_line(tmp_path):
    lock = tmp_path / "run.lock"
    lock.mkdir()
    with pytest.raises(UserError, match=rf"^{lock} is a folder, not the lock file of a run: remove it \(rm -r "
                                        rf"{lock}\) and start the run again$"):
        resume.lock(tmp_path)
    lock.rmdir()
    lock.symlink_to(tmp_path / "nowhere" / "run.lock")
    with pytest.raises(UserError, match=rf"^{lock} is a symlink \(to {tmp_path}/nowhere/run.lock, which does not "
                                        rf"exist\), not the lock file of a run: remove it \(rm {lock}\) and start the "
                                        rf"run again$"):
        resume.lock(tmp_path)
    lock.unlink()
    resume.lock(tmp_path).close()


# -----------------------------------------------------------------------------
# A failed save says why; a sharded checkpoint is read whole without a warning; init_from takes checkpoints only; a
# resume finds what its checkpoint's run left (settings, data, process count) or says what changed

def checkpoint_exception(*failures):
    """What torch.distributed.checkpoint raises when ranks fail: {rank: (exception, traceback)}."""
    api = pytest.importorskip("torch.distributed.checkpoint.api")
    return api.CheckpointException("save failed", {rank: api._wrap_exception(e) for rank, e in enumerate(failures)})


def with_context(error, context):
    error.__context__ = context
    return error


def test_a_full_disk_is_found_by_its_errno_anywhere_inside_the_error(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "FULL_BYTES", 0)  # the disk itself says nothing here
    cases = {
        "no space left on device": checkpoint_exception(
            RuntimeError("unexpected pos 704 vs 598"), with_context(RuntimeError("file write failed"),
                                                                    OSError(errno.ENOSPC, "No space left on device"))),
        "disk quota exceeded": checkpoint_exception(with_context(RuntimeError("PytorchStreamWriter failed"),
                                                                 OSError(errno.EDQUOT, "Disk quota exceeded"))),
        "RuntimeError: unexpected pos 704 vs 598": checkpoint_exception(RuntimeError("unexpected pos 704 vs 598")),
        "OSError: [Errno 5] Input/output error": OSError(errno.EIO, "Input/output error"),
    }
    assert {checkpoint._cause(error, tmp_path): cause for cause, error in cases.items()} == {c: c for c in cases}


def test_a_full_disk_that_torch_reports_without_an_errno_is_found_on_the_disk(tmp_path, monkeypatch):
    model, optimizer = tiny()
    failure = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(checkpoint.torch, "save", mock.Mock(side_effect=failure))  # torch 2.13 drops the OSError
    monkeypatch.setattr(checkpoint, "FULL_BYTES", 1 << 62)  # no disk has that much free
    with pytest.raises(UserError, match=r"step 1\) failed: no space left on device; this run has no checkpoint"):
        checkpoint.save(tmp_path, 1, model, optimizer, train_state(model, 1))
    monkeypatch.setattr(checkpoint, "FULL_BYTES", 0)
    with pytest.raises(UserError, match=r"failed: RuntimeError: \[enforce fail .*unexpected pos 704 vs 598; this run"):
        checkpoint.save(tmp_path, 1, model, optimizer, train_state(model, 1))
    assert list(tmp_path.iterdir()) == []


def test_a_sharded_checkpoint_read_whole_in_one_process_warns_nothing(tmp_path):
    model, optimizer = tiny()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        path = checkpoint.save(tmp_path / "run", 1, model, optimizer, train_state(model, 1), fsdp=True)
    finally:
        dist.destroy_process_group()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded, _ = checkpoint.load_model(path)
        checkpoint.load_into(path, checkpoint.read_train_state(path), loaded, torch.optim.AdamW(loaded.parameters()))
    assert [str(w.message) for w in caught] == []
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))

def test_init_from_something_that_is_no_checkpoint_says_what_it_is_and_what_is_taken(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.jsonl").write_text('{"step": 0}\n')
    takes = re.escape("; init_from takes a checkpoint: a ckpt_*.pt file or folder, a run's ckpt.pt, or a run's "
                      "out_dir") + "$"
    cases = {
        "nowhere": rf"^init_from={tmp_path / 'nowhere'}: no such file or folder{takes}",
        "empty": rf"^init_from={tmp_path / 'empty'} is an empty folder{takes}",
        "run/log.jsonl": rf"^init_from={tmp_path / 'run' / 'log.jsonl'} is a file that is not a checkpoint; its "
                         rf"run's out_dir is --init_from={tmp_path / 'run'}{takes}",
    }
    base = {"resume": False, "out_dir": tmp_path}
    for given, message in cases.items():
        with pytest.raises(UserError, match=message):
            resume.start_run({**base, "init_from": str(tmp_path / given)}, None, None, None, 0)


def saved_run(data_dir, out, world=1, **overrides):
    """A run of conftest's tiny settings saved at step 3, as `world` processes save it: (the run, the checkpoint)."""
    config = settings.load(argv(data_dir, out, **overrides))
    config["vocab_size"] = 257
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{k: config[k] for k in settings.MODEL_KEYS}))
    loader = data.TokenLoader(data_dir, "train", config["batch_size"], window=4 * config["seq_len"], seed=1)
    run = types.SimpleNamespace(config=config, raw_model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                loader=loader, world=world, totals={"positions": 0, "data_tokens": 0, "flops": 0})
    out.mkdir(parents=True)
    return run, resume.save_run(run, 3)


def restore(run, path, data_dir=None, **changes):
    """resume.restore of `path` into a run like `run` (of its data_dir, or `data_dir`), with its config changed."""
    config = {**run.config, **changes, "data_dir": str(data_dir or run.loader.data_dir)}
    loader = data.TokenLoader(config["data_dir"], "train", config["batch_size"], window=4 * config["seq_len"], seed=1)
    return resume.restore(path, config, run.raw_model, run.optimizer, loader, 0, settings,
                          resume=config["resume"])


def test_a_setting_added_since_a_checkpoint_was_saved_reads_as_its_default(data_dir, tmp_path, capsys):
    run, path = saved_run(data_dir, tmp_path / "run")
    state = {k: v for k, v in checkpoint.read_train_state(path).items() if k not in ("model", "optimizer")}
    del state["config"]["bag_loss"]  # saved before bag_loss existed: such runs trained MCE, its default
    path = checkpoint.save(tmp_path / "run", 4, run.raw_model, run.optimizer, state)
    assert restore(run, path, resume=True)[0] == 3
    restore(run, path, out_dir=str(tmp_path / "branch"), init_from=str(path))
    assert "settings changed: none" in capsys.readouterr().out


def test_resuming_on_a_data_folder_prepared_into_other_shards_is_refused(data_dir, tmp_path):
    import prepare
    run, path = saved_run(data_dir, tmp_path / "run")
    kw = dict(val_tokens=4000, num_proc=1)  # conftest's data_dir, prepared again: the same tokens
    again = prepare.prepare(str(data_dir.parent / "*.txt"), "bytes", tmp_path / "again", **kw)
    assert restore(run, path, tmp_path / "again", resume=True)[0] == 3  # identical: fine
    other = prepare.prepare(str(data_dir.parent / "*.txt"), "bytes", tmp_path / "other", shard_tokens=20_000, **kw)
    assert other["train_tokens"] == again["train_tokens"]  # what the loader's state compares
    with pytest.raises(UserError, match=rf"^data_dir={tmp_path / 'other'} is not the data checkpoint {path} was "
                                        rf"trained on \(its train split was 1 shard of [\d,]+ tokens \(shard 0: "
                                        rf"train_000000.bin, [\d,]+\) and is now [2-9] shards of [\d,]+ tokens "
                                        rf"\(shard 0: train_000000.bin, 20,[\d,]+\)\): .*--init_from={path} "
                                        rf"--init_weights_only=True$"):
        restore(run, path, tmp_path / "other", resume=True)
    with pytest.raises(UserError, match="or take the weights alone: init_weights_only=True$"):
        restore(run, path, tmp_path / "other", out_dir=str(tmp_path / "branch"), init_from=str(path))


def test_resuming_under_another_process_count_keeps_the_rows_per_step_or_is_refused(data_dir, tmp_path, capsys):
    run, path = saved_run(data_dir, tmp_path / "run", world=2)  # 2 x 4 rows per step
    with pytest.raises(UserError, match=rf"^checkpoint {path} was written by 2 processes, this run has 1: a step "
                                        rf"would take 4 rows instead of 8; resume with 2 processes, or branch from "
                                        rf"it with --init_from={path} --global_batch_tokens=128 \(global_batch_tokens "
                                        rf"keeps the rows per step under any process count; .*\)$"):
        restore(run, path, resume=True)
    run, path = saved_run(data_dir, tmp_path / "fixed", world=2, global_batch_tokens=128)
    assert restore(run, path, resume=True)[0] == 3
    assert (f"checkpoint {path} was written by 2 processes, this run has 1: 8 rows per step (as before), read in "
            f"the same order; each rank takes its random state from the checkpoint where it has its own, else rank "
            f"0's\n") in capsys.readouterr().out
