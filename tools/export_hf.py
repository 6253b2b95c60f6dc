"""Export a tst checkpoint to a Hugging Face model folder (weights and tokenizer) that transformers and
lm-evaluation-harness (--model hf) load.

    python tools/export_hf.py --ckpt RUN/ckpt.pt --out hf/RUN              # a new or empty folder
    python tools/export_hf.py --ckpt RUN/ckpt.pt --out hf/RUN --overwrite  # replace what hf/RUN holds

Our layout is Llama's with other names (rotate-half RoPE, RMSNorm in float32 then the weight, SwiGLU, no biases), so
an export is a renaming plus a config. Which class: dense -> LlamaForCausalLM; with QK-norm -> Qwen3ForCausalLM; MoE
-> Qwen3MoeForCausalLM (softmax router, top-k renormalised, QK-norm). Experts are written one by one, the layout of
Qwen's own MoE checkpoints, which transformers >= 5 fuses on load. What no transformers class computes (an MoE
without QK-norm, a shared expert, bias-balanced routing) is refused by name. Needs the safetensors and tokenizers
packages (pip install transformers).
"""

import argparse
import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: checkpoint, cli, model
import checkpoint  # noqa: E402
import cli  # noqa: E402
from cli import UserError  # noqa: E402

# -----------------------------------------------------------------------------
# Weights and config

def hf_config(cfg, tok):
    common = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False, "attention_dropout": 0.0, "torch_dtype": "float32",
        "bos_token_id": tok.bos, "eos_token_id": tok.eot, "pad_token_id": None,
    }
    if cfg.n_experts:
        if not cfg.qk_norm:
            raise UserError("Qwen3MoeForCausalLM always applies QK-norm; this MoE model has qk_norm=False")
        if cfg.shared_expert_ffn_dim:
            raise UserError("Qwen3MoeForCausalLM has no shared expert; this model has one")
        return {**common, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                "num_experts": cfg.n_experts, "num_experts_per_tok": cfg.top_k,
                "moe_intermediate_size": cfg.expert_ffn_dim, "norm_topk_prob": True, "decoder_sparse_step": 1,
                "mlp_only_layers": [], "use_sliding_window": False}
    if cfg.qk_norm:
        return {**common, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": False}
    return {**common, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "mlp_bias": False}


def hf_state_dict(sd, cfg):
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        out[hf + "input_layernorm.weight"] = sd[ours + "attn_norm.weight"]
        out[hf + "post_attention_layernorm.weight"] = sd[ours + "mlp_norm.weight"]
        names = [("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")]
        names += [("q_norm", "q_norm"), ("k_norm", "k_norm")] if cfg.qk_norm else []
        for a, b in names:
            out[f"{hf}self_attn.{b}.weight"] = sd[f"{ours}attn.{a}.weight"]
        mlp = [("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")]
        if cfg.n_experts:
            bias = [v for k, v in sd.items() if k.startswith(ours) and k.endswith("expert_bias")]
            if any(b.abs().max() > 0 for b in bias):
                raise UserError(f"layer {i} routes with a nonzero expert_bias, which Qwen3MoE cannot express")
            out[hf + "mlp.gate.weight"] = sd[ours + "mlp.router.weight"]
            for j in range(cfg.n_experts):
                for a, b in mlp:
                    out[f"{hf}mlp.experts.{j}.{b}.weight"] = sd[f"{ours}mlp.experts.{a}"][j]
        else:
            for a, b in mlp:
                out[f"{hf}mlp.{b}.weight"] = sd[f"{ours}mlp.{a}.weight"]
    return out


# -----------------------------------------------------------------------------
# Tokenizer: tiktoken's BPE as a `tokenizers` one that encodes to the same ids

def byte_chars():
    """GPT-2's byte -> character map, which byte-level BPE files use to write bytes as text: printable bytes
    stand for themselves, the others for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def save_tokenizer(tok, out_dir, max_len):
    """Write our tokenizer as tokenizer.json (a `tokenizers` byte-level BPE that encodes ordinary text to the same
    ids) and tokenizer_config.json, which AutoTokenizer.from_pretrained(out_dir) loads. Ordinary text: one that
    spells a special token ("<|endoftext|>") gets that token there, where we encode its characters.

    tiktoken merges, within each piece its regex cuts, the adjacent pair whose joined bytes rank lowest; a BPE
    merge list in the order of the joined token's rank does the same. Special tokens keep their ids, and BOS
    (where the tokenizer has one) starts every encoding, as our contexts start.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    ranks = tok.enc._mergeable_ranks  # tiktoken keeps ranks and regex in private fields
    chars = byte_chars()  # a translation table: latin-1 decodes byte b to chr(b)
    text = {token: token.decode("latin-1").translate(chars) for token in ranks}
    merges = []
    for token, rank in ranks.items():
        merges += [(rank, ranks[token[:i]], ranks[token[i:]], text[token[:i]], text[token[i:]])
                   for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
    merges.sort()
    specials = tok.enc._special_tokens
    vocab = {text[token]: rank for token, rank in ranks.items()} | specials
    # ignore_merges: a piece that is a token is that token, as tiktoken looks it up before merging
    out = Tokenizer(models.BPE(vocab, [m[3:] for m in merges], ignore_merges=True))
    # tiktoken's possessive X{1,3}+ (cl100k_base) is "one or more X{1,3}" to the Oniguruma regexes of tokenizers;
    # where it ends an alternative, as in tiktoken's patterns, a greedy X{1,3} matches the same
    pattern = re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", tok.enc._pat_str)
    out.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    out.decoder = decoders.ByteLevel()
    out.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    names = {i: s for s, i in specials.items()}
    if tok.bos is not None:
        bos = names[tok.bos]
        out.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.bos)])
    out.save(os.path.join(out_dir, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": names.get(tok.bos),
              "eos_token": names[tok.eot], "add_bos_token": tok.bos is not None, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": max_len}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)


# -----------------------------------------------------------------------------
# The folder

def check_out(out_dir, ckpt_path, overwrite):
    """Refuse an --out that would mix an old export with this one (a stale generation_config.json beside new
    weights) or that is a file; with overwrite, the folder's contents are replaced, unless it holds the checkpoint."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give the folder to export into")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
        raise UserError(f"--out {out} is not empty ({shown}): pass --overwrite to replace its contents, or export "
                        f"into a new folder")
    ckpt = Path(ckpt_path).absolute()
    if held and out.resolve() in {p.resolve() for p in ckpt.parents} | set(ckpt.resolve().parents):
        raise UserError(f"--out {out} holds the checkpoint {ckpt_path}: --overwrite would delete it; export into "
                        f"another folder")


def export_hf(ckpt_path, out_dir, overwrite=False):
    """Write what AutoModelForCausalLM and AutoTokenizer.from_pretrained(out_dir) load: config.json,
    model.safetensors (float32), tokenizer.json and tokenizer_config.json, into a new or empty folder (overwrite:
    one whose contents are removed first). Everything is checked before the folder is touched. Returns the model
    class."""
    check_out(out_dir, ckpt_path, overwrite)
    model, state = checkpoint.load_model(ckpt_path)
    tok = checkpoint.run_tokenizer(state["config"])
    config = hf_config(model.cfg, tok)
    weights = hf_state_dict(model.state_dict(), model.cfg)
    if any(importlib.util.find_spec(m) is None for m in ("safetensors", "tokenizers")):
        raise UserError("export needs the safetensors and tokenizers packages: pip install transformers")
    from safetensors.torch import save_file
    # copies: safetensors refuses tensors that share memory, as the experts sliced from one tensor do
    weights = {k: v.detach().to("cpu", torch.float32).clone() for k, v in weights.items()}
    os.makedirs(out_dir, exist_ok=True)
    for old in Path(out_dir).iterdir():  # only with --overwrite (check_out): nothing of an older export stays
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    # safetensors writes a private (0600) file; give it the mode open() gave config.json under the user's umask
    os.chmod(os.path.join(out_dir, "model.safetensors"), os.stat(os.path.join(out_dir, "config.json")).st_mode & 0o777)
    save_tokenizer(tok, out_dir, model.cfg.max_seq_len)
    return config["architectures"][0]


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a checkpoint written by train.py (file or FSDP folder)")
    p.add_argument("--out", required=True, help="the folder to write: new or empty, unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="remove what --out holds, then export into it")
    args = p.parse_args(argv)
    print(f"wrote {export_hf(args.ckpt, args.out, args.overwrite)} and its tokenizer to {args.out}")


if __name__ == "__main__":
    cli.run(main)
