"""tools/export_hf.py: the exported folder computes our logits and encodes our tokens through transformers; what no
transformers class computes, and a folder the export would mix into, are refused by name."""

import functools
import os
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import eval as E
import tools.export_hf as X
import tools.tasks as T
from cli import UserError
from data import get_tokenizer
from model import ModelConfig
from test_eval import flip_64_bytes_in_the_middle, one_line_errors, tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------
# Export: the transformers model computes our logits

EXPORTS = {
    "LlamaForCausalLM": {},
    "LlamaForCausalLM (tied)": {"tie_embeddings": True, "n_kv_heads": 4},
    "Qwen3ForCausalLM": {"qk_norm": True},
}


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_export_logits_equal_ours(name, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is an optional, test-only dependency")
    path, model = tiny_checkpoint(tmp_path, **EXPORTS[name])
    arch = X.export_hf(path, tmp_path / "hf")
    assert arch == name.split()[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == arch
    x = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, model.eval()(x), atol=1e-5, rtol=1e-4)


MOE = {"qk_norm": True, "n_experts": 4, "top_k": 2, "expert_ffn_dim": 24}


def test_export_moe_logits_equal_ours(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is an optional, test-only dependency")
    path, model = tiny_checkpoint(tmp_path, **MOE)
    assert X.export_hf(path, tmp_path / "hf") == "Qwen3MoeForCausalLM"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, model.eval()(x), atol=1e-5, rtol=1e-4)


def test_the_tiny_moe_config_exports(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is an optional, test-only dependency")
    settings = {}
    exec((ROOT / "config" / "tiny_moe_tst.py").read_text(), settings)  # a config file is plain Python
    shape = {k: v for k, v in settings.items() if k in ModelConfig.__dataclass_fields__ and k != "vocab_size"}
    assert shape["n_experts"] and not shape.get("shared_expert_ffn_dim")
    path, model = tiny_checkpoint(tmp_path, **shape)
    assert X.export_hf(path, tmp_path / "hf") == "Qwen3MoeForCausalLM"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, model.eval()(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cfg, message", [
    ({**MOE, "qk_norm": False}, "always applies QK-norm"),
    ({**MOE, "shared_expert_ffn_dim": 16}, "no shared expert"),
])
def test_export_refuses_what_no_transformers_class_computes(tmp_path, cfg, message):
    path, _ = tiny_checkpoint(tmp_path, **cfg)
    with pytest.raises(UserError, match=message):
        X.export_hf(path, tmp_path / "hf")


def test_export_without_its_packages_says_what_to_install(tmp_path, monkeypatch):
    path, _ = tiny_checkpoint(tmp_path)
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed
    with pytest.raises(UserError, match="export needs the safetensors and tokenizers packages: pip install "
                                        "transformers"):
        X.export_hf(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_refuses_bias_balanced_routing(tmp_path):
    path, model = tiny_checkpoint(tmp_path, **MOE, balance="bias")
    ckpt = torch.load(path, weights_only=False)
    ckpt["model"]["layers.1.mlp.expert_bias"][2] = 0.01  # as bias balancing leaves it after training
    torch.save(ckpt, path)
    with pytest.raises(UserError, match="layer 1 routes with a nonzero expert_bias"):
        X.export_hf(path, tmp_path / "hf")


# ---------------------------------------------------------------------------
# Export: the tokenizer, and the whole folder scored the harness's way

# every request of the first documents of each task (TST_ALL_EVAL_STRINGS=1: of every document, minutes)
EVAL_LIMIT = None if os.environ.get("TST_ALL_EVAL_STRINGS") else 5
# requests the full eval sets showed to need care: a piece that is one token although no merge reaches it
# (Llama 3's " Arthropoda", from ARC-Easy), a run of digits (cut after 3 by cl100k_base's possessive \p{N}{1,3}+)
HARD_REQUESTS = [("Question: Which characteristic is shared by all members of Arthropoda and Chordata phyla?\nAnswer:",
                  " jointed limbs"), ("In 1905, the year 19052 ", "began.")]


@functools.cache
def eval_requests(evals):
    return [r for task in T.TASKS for doc in T.load_task(task, evals, EVAL_LIMIT) for r in E.doc_requests(doc)]


def tokenizer_of(name, shared_data, monkeypatch):
    if name == "llama3":
        return get_tokenizer(f"llama3:{shared_data / 'llama3' / 'tokenizer.model'}")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(shared_data / "tiktoken_cache"))
    return get_tokenizer(name)


def harness_encode_pairs(hf_tok, requests):
    """lm-evaluation-harness's TemplateLM._encode_pair through its Hugging Face backend, which leaves special
    tokens to the tokenizer's default: trailing context whitespace moves into the continuation, whose tokens
    are those of the whole string after the context's."""
    moved = []
    for context, continuation in requests:
        n = len(context) - len(context.rstrip())
        moved.append((context[:len(context) - n], context[len(context) - n:] + continuation))
    wholes = hf_tok([c + x for c, x in moved])["input_ids"]
    contexts = hf_tok([c for c, _ in moved])["input_ids"]
    return [(ctx, whole[len(ctx):]) for ctx, whole in zip(contexts, wholes, strict=True)]


@pytest.mark.parametrize("name", ["bytes", "gpt2", "cl100k_base", "o200k_base", "llama3"])
def test_exported_tokenizer_encodes_the_eval_sets_as_ours(name, tmp_path, shared_data, monkeypatch):
    transformers = pytest.importorskip("transformers", reason="transformers is an optional, test-only dependency")
    tok = tokenizer_of(name, shared_data, monkeypatch)
    X.save_tokenizer(tok, tmp_path, 2048)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    # every id we use, special tokens included (the unused ids of cl100k_base and o200k_base left out)
    assert len(hf_tok) == len(tok.enc._mergeable_ranks) + len(tok.enc.special_tokens_set)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (tok.bos, tok.eot)
    requests = eval_requests(shared_data / "evals") + HARD_REQUESTS
    ours = [E.encode_pair(tok, c, x) for c, x in requests]
    theirs = harness_encode_pairs(hf_tok, requests)
    assert [r for r, a, b in zip(requests, ours, theirs) if a != b] == []
    assert hf_tok.decode(theirs[0][0], skip_special_tokens=True) == requests[0][0].rstrip()


def test_exported_folder_scores_eval_requests_as_eval_py_does(tmp_path, shared_data):
    transformers = pytest.importorskip("transformers", reason="transformers is an optional, test-only dependency")
    llama3 = f"llama3:{shared_data / 'llama3' / 'tokenizer.model'}"
    # weights large enough (logits of standard deviation ~3) that a wrong token, position or BOS shows
    path, model = tiny_checkpoint(tmp_path, tokenizer=llama3, vocab_size=128_256, tie_embeddings=True, init_std=0.5,
                                  max_seq_len=256)
    X.export_hf(path, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    requests = [r for task in T.TASKS for doc in T.load_task(task, shared_data / "evals", limit=1)[:1]
                for r in E.doc_requests(doc)]
    tok = get_tokenizer(llama3)
    ours = E.loglikelihoods(model, [E.encode_pair(tok, c, x) for c, x in requests], max_len=256)
    theirs = []
    with torch.no_grad():
        for ctx, cont in harness_encode_pairs(hf_tok, requests):
            logits = hf(torch.tensor([(ctx + cont)[-257:][:-1]])).logits[0, -len(cont):]
            theirs.append(F.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None]).sum().item())
    assert max(theirs) - min(theirs) > 10
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-4)


# ---------------------------------------------------------------------------
# The folder: never an old export mixed with a new one

EXPORTED = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_a_folder_that_is_not_empty_is_refused_unless_overwrite_replaces_its_contents(tmp_path):
    path, _ = tiny_checkpoint(tmp_path / "run")
    out = tmp_path / "hf"
    (out / "old").mkdir(parents=True)
    (out / "generation_config.json").write_text("{}")  # an older export's, which transformers would read
    with pytest.raises(UserError, match=r"^--out .*hf is not empty \(generation_config.json, old\): pass --overwrite "
                                        r"to replace its contents, or export into a new folder$"):
        X.export_hf(path, out)
    assert sorted(p.name for p in out.iterdir()) == ["generation_config.json", "old"]
    pytest.importorskip("safetensors", reason="the export writes with safetensors (pip install transformers)")
    pytest.importorskip("tokenizers", reason="the export writes with tokenizers (pip install transformers)")
    X.export_hf(path, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == EXPORTED


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_exported_file_has_the_mode_the_umask_gives_a_new_file(tmp_path, umask):
    pytest.importorskip("safetensors", reason="the export writes with safetensors (pip install transformers)")
    pytest.importorskip("tokenizers", reason="the export writes with tokenizers (pip install transformers)")
    path, _ = tiny_checkpoint(tmp_path / "run")
    before = os.umask(umask)
    try:
        X.export_hf(path, tmp_path / "hf")
    finally:
        os.umask(before)
    # safetensors alone would make model.safetensors 0600: unreadable to the group that shares the export
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "hf").iterdir()} == {
        name: oct(0o666 & ~umask) for name in EXPORTED}


def test_the_documented_export_folder_is_ignored_by_git():
    assert "--out hf/RUN" in X.__doc__ and "/hf/" in (ROOT / ".gitignore").read_text().split()


def test_overwrite_never_deletes_the_checkpoint(tmp_path):
    path, _ = tiny_checkpoint(tmp_path / "run")
    for out in (tmp_path / "run", tmp_path):  # the run's folder, or a folder above it
        with pytest.raises(UserError, match=f"^--out {out} holds the checkpoint .*ckpt.pt: --overwrite would delete "
                                            f"it; export into another folder$"):
            X.export_hf(path, out, overwrite=True)
    assert path.is_file()


def test_an_out_that_is_a_file_is_refused(tmp_path):
    path, _ = tiny_checkpoint(tmp_path / "run")
    (tmp_path / "hf.txt").write_text("a file")
    with pytest.raises(UserError, match=r"^--out .*hf.txt is a file: give the folder to export into$"):
        X.main(["--ckpt", str(path), "--out", str(tmp_path / "hf.txt")])


def test_a_damaged_checkpoint_is_refused_in_one_line(tmp_path):
    tiny_checkpoint(tmp_path, step=4)
    flip_64_bytes_in_the_middle(tmp_path / "ckpt_0000004.pt")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:  # a sound zip, but not what torch.save writes
        z.writestr("notes.txt", "hello")
    # run as documented, from the repository root: the script finds checkpoint.py and cli.py itself
    one_line_errors("tools/export_hf.py", {
        "checkpoint .*ckpt_0000004.pt is damaged": ["--ckpt", tmp_path / "ckpt_0000004.pt", "--out", tmp_path / "a"],
        "other.zip is not a checkpoint written by train.py": ["--ckpt", tmp_path / "other.zip", "--out",
                                                              tmp_path / "b"],
    })
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
