"""checkpoint.py: what is written is what is read back, or the damage is named."""

import json
import zipfile

import pytest
import torch
import torch.distributed as dist

import checkpoint
from cli import UserError
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
