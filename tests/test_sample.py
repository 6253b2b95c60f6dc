"""sample.py: a document continued from the prompt by Transformer.generate, greedy or seeded, ended by end-of-text."""

import zipfile

import pytest
import torch

import sample as S
from model import ModelConfig, Transformer
from test_eval import CharTok, flip_64_bytes_in_the_middle, one_line_errors, tiny_checkpoint


def bigram_transformer(P):
    """A Transformer whose next-token distribution is P[current token]: one layer whose attention and MLP write
    nothing into the residual stream, a one-hot embedding (RMSNorm scales it to sqrt(V)) and a head of log P."""
    V = len(P)
    model = Transformer(ModelConfig(vocab_size=V, dim=V, n_layers=1, n_heads=1, n_kv_heads=1, ffn_dim=V,
                                    max_seq_len=64))
    with torch.no_grad():
        model.layers[0].attn.wo.weight.zero_()
        model.layers[0].mlp.w_down.weight.zero_()
        model.embed.weight.copy_(torch.eye(V))
        model.lm_head.weight.copy_(torch.tensor(P).log().T / V ** 0.5)
    return model.eval()


def test_the_bigram_transformer_computes_its_table():
    P = [[0.1, 0.7, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1], [0.25, 0.25, 0.25, 0.25]]
    probs = torch.softmax(bigram_transformer(P)(torch.tensor([[3, 0, 2, 1]])), -1)[0]
    assert torch.allclose(probs, torch.tensor(P)[[3, 0, 2, 1]], atol=1e-4)


def test_greedy_sampling_follows_the_most_likely_next_token():
    # after end-of-text ("$", where documents start) -> "a", after "a" -> "b", after "b" -> "a"
    P = [[0.1, 0.7, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1], [0.7, 0.1, 0.1, 0.1]]
    model, tok = bigram_transformer(P), CharTok("abx$")
    assert S.sample(model, tok, "", max_new_tokens=5, temperature=0) == "ababa"
    assert S.sample(model, tok, "a", max_new_tokens=3, temperature=1.0, top_k=1) == "bab"  # top-1 is greedy


def test_the_end_of_text_token_ends_the_sample_and_is_not_printed():
    P = [[0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7], [0.1, 0.1, 0.7, 0.1], [0.7, 0.1, 0.1, 0.1]]  # "b" -> "$"
    assert S.sample(bigram_transformer(P), CharTok("abx$"), "", max_new_tokens=5, temperature=0) == "ab"


def test_seeded_sampling_is_reproducible():
    model, tok = bigram_transformer([[0.3, 0.3, 0.3, 0.1]] * 4), CharTok("abx$")

    def draw(seed):
        return S.sample(model, tok, "a", 30, temperature=1.0, top_k=0, generator=torch.Generator().manual_seed(seed))

    assert draw(1) == draw(1) != draw(2)
    # top_k=2 keeps the two most likely tokens (and those tied with them: a, b and x), never end-of-text
    text = S.sample(model, tok, "", 30, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert len(text) == 30


def test_cli_prints_the_prompt_and_its_continuations(tmp_path, capsys):
    path, model = tiny_checkpoint(tmp_path)  # bytes tokenizer
    argv = ["--ckpt", str(path), "--prompt", "Once", "--max_new_tokens", "8", "--device", "cpu"]
    S.main(argv + ["--num_samples", "3", "--seed", "7"])
    out = capsys.readouterr().out
    samples = out.rstrip("\n").split("\n---------------\n")
    assert len(samples) == 3 and all(s.startswith("Once") for s in samples)
    S.main(argv + ["--num_samples", "3", "--seed", "7"])
    assert capsys.readouterr().out == out
    # greedy: the argmax at every step, after end-of-text (where documents start) and the prompt's bytes
    S.main(argv + ["--temperature", "0"])
    ids, new = [256, *b"Once"], []
    while len(new) < 8 and (token := model(torch.tensor([ids]))[0, -1].argmax().item()) != 256:
        ids, new = ids + [token], new + [token]
    assert capsys.readouterr().out == "Once" + bytes(new).decode("utf-8", errors="replace") + "\n"


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "-1"], "argument --temperature: -1 is not a finite number >= 0"),
    (["--temperature", "nan"], "argument --temperature: nan is not a finite number >= 0"),
    (["--top_k", "-1"], "argument --top_k: -1 is negative"),
    (["--num_samples", "0"], "argument --num_samples: 0 is not a positive integer"),
])
def test_cli_refuses_bad_numbers(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        S.main(["--ckpt", "run/ckpt.pt", *argv])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_a_damaged_checkpoint_is_refused_in_one_line(tmp_path):
    tiny_checkpoint(tmp_path, step=4)
    flip_64_bytes_in_the_middle(tmp_path / "ckpt_0000004.pt")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:  # a sound zip, but not what torch.save writes
        z.writestr("notes.txt", "hello")
    one_line_errors("sample.py", {
        "checkpoint .*ckpt_0000004.pt is damaged": ["--ckpt", tmp_path / "ckpt_0000004.pt"],
        "other.zip is not a checkpoint written by train.py": ["--ckpt", tmp_path / "other.zip"],
    })
