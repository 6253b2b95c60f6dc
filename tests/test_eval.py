"""eval.py: multiple choice scored as lm-evaluation-harness scores it (prompts from tools/tasks.py), held-out loss,
the results file, and every user mistake ending in one line."""

import json
import math
import os
import re
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import cli
import eval as E
import tools.tasks as T
from cli import UserError
from model import ModelConfig, Transformer

LN = math.log


class CharTok:
    """One token per character of a fixed alphabet; no BOS unless given."""

    def __init__(self, alphabet, bos=None):
        self.ids = {c: i for i, c in enumerate(alphabet)}
        self.alphabet, self.bos, self.eot = alphabet, bos, len(alphabet) - 1
        self.document_prefix = [self.eot] + ([bos] if bos is not None else [])

    def encode(self, text):
        return [self.ids[c] for c in text]

    def decode(self, ids):
        return "".join(self.alphabet[i] for i in ids)


class BigramModel(nn.Module):
    """A fake model whose next-token distribution depends only on the current token: P[token] (rows sum to 1)."""

    def __init__(self, P, max_seq_len=64):
        super().__init__()
        self.logp = nn.Parameter(torch.tensor(P).log(), requires_grad=False)
        self.cfg = ModelConfig(vocab_size=len(P), max_seq_len=max_seq_len)

    def forward(self, tokens, targets=None):  # as Transformer: logits, or (mean next-token loss, aux loss)
        if targets is None:
            return self.logp[tokens]
        loss = F.cross_entropy(self.logp[tokens].flatten(0, 1), targets.flatten())
        return loss, torch.zeros(())


# ---------------------------------------------------------------------------
# Scoring: acc and acc_norm computed by hand

def test_acc_and_acc_norm_from_fixed_loglikelihoods():
    docs = [
        {"context": "x", "choices": ["a", "bbbb"], "gold": 1},  # ll -2, -4: acc picks 0; per char -2, -1: norm picks 1
        {"context": "x", "choices": ["cc", "d"], "gold": 0},  # ll -1, -3: both pick 0
        {"context": "x", "choices": ["eee", "f", "gg"], "gold": 2},  # -6,-1,-2; per char -2,-1,-1: tie -> first (1)
    ]
    acc, acc_norm = E.score(docs, [[-2.0, -4.0], [-1.0, -3.0], [-6.0, -1.0, -2.0]])
    assert acc == [0.0, 1.0, 0.0]
    assert acc_norm == [1.0, 1.0, 0.0]
    # sample standard deviation / sqrt(n): for (0, 1, 0) that is sqrt(1/3) / sqrt(3) = 1/3
    assert E.mean_stderr(acc) == pytest.approx(1 / 3)
    assert E.mean_stderr([1.0]) is None


def test_mmlu_stderr_pools_the_subjects():
    # within-subject sample variances 1/2 (n=2) and 1/3 (n=4) pool to (1 * 1/2 + 3 * 1/3) / (6 - 2) = 3/8;
    # stderr = sqrt(3/8 / 6) = 1/4, where the flat formula over all six would give sqrt(0.3 / 6) = 0.224
    xs, subjects = [1, 0, 1, 1, 0, 0], ["a", "a", "b", "b", "b", "b"]
    assert E.pooled_stderr(xs, subjects) == pytest.approx(0.25)
    assert E.mean_stderr(xs) == pytest.approx(math.sqrt(0.05))


def test_task_scores_sum_continuation_logprobs_after_context():
    # alphabet " ", "a", "b"; P(next | current)
    P = [[0.1, 0.6, 0.3],  # after " "
         [0.5, 0.25, 0.25],  # after "a"
         [0.7, 0.2, 0.1]]  # after "b"
    model, tok = BigramModel(P), CharTok(" ab")
    docs = [{"context": "ab", "choices": ["a", "bb"], "gold": 1}]
    pairs = [E.encode_pair(tok, c, x) for c, x in E.doc_requests(docs[0])]
    assert pairs == [([1, 2], [0, 1]), ([1, 2], [0, 2, 2])]  # the one-space target delimiter
    ll = E.loglikelihoods(model, pairs, max_len=64)
    # " a" after "b": P(" "|b) P(a|" "); " bb": P(" "|b) P(b|" ") P(b|b)
    assert ll == pytest.approx([LN(0.7) + LN(0.6), LN(0.7) + LN(0.3) + LN(0.1)])
    # acc: ll(" a") = -0.87 > ll(" bb") = -3.87 picks 0; acc_norm: -0.87 / 1 > -3.87 / 2 still picks 0
    rows = E.evaluate_task(model, "toy", docs, *E.task_requests(tok, "toy", docs, 64), max_len=64)
    assert [(r["metric"], r["value"], r["n"], r["truncated"]) for r in rows] == [("acc", 0.0, 1, 0),
                                                                                ("acc_norm", 0.0, 1, 0)]


def test_one_token_continuations_share_one_forward_pass():
    P = [[0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.7, 0.2, 0.1]]
    model, calls = BigramModel(P), []
    model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    ll = E.loglikelihoods(model, [([1, 2], [0]), ([1, 2], [1]), ([1, 2], [2]), ([1], [2, 2])], max_len=64)
    assert ll == pytest.approx([LN(0.7), LN(0.2), LN(0.1), LN(0.25) + LN(0.1)])
    # all four feed the model [1, 2] (the last one scores its 2 tokens at positions 0 and 1): one row
    assert calls == [(1, 2)]


def test_long_inputs_are_cut_from_the_left_like_the_harness():
    P = [[0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.7, 0.2, 0.1]]
    # context "aab" + " a" = 5 tokens; max_len 3 keeps the last 4 and feeds the first 3 of them
    ll = E.loglikelihoods(BigramModel(P, max_seq_len=3), [([1, 1, 2], [0, 1])], max_len=3)
    assert ll == pytest.approx([LN(0.7) + LN(0.6)])


def test_a_continuation_longer_than_the_window_is_refused_or_truncated_on_request():
    P = [[0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.7, 0.2, 0.1]]
    model, tok = BigramModel(P, max_seq_len=3), CharTok(" ab")
    docs = [{"context": "ab", "choices": ["a", "bbb"], "gold": 0},  # " a" is 2 tokens, " bbb" 4
            {"context": "a", "choices": ["aaaaa", "b"], "gold": 1}]  # " aaaaa" is 6
    with pytest.raises(UserError, match=r"^toy: 2 of 4 requests have a continuation longer than the model's "
                                        r"window of 3 tokens \(the longest: 6\): pass --truncate_long"):
        E.task_requests(tok, "toy", docs, 3)
    pairs, truncated = E.task_requests(tok, "toy", docs, 3, truncate_long=True)
    assert truncated == 2
    # the last 3 tokens of " bbb" are scored after the " " before them; the rest of the context is cut by the window
    assert pairs[1] == ([1, 2, 0], [2, 2, 2]) and pairs[0] == ([1, 2], [0, 1])
    ll = E.loglikelihoods(model, pairs, max_len=3)
    assert ll[1] == pytest.approx(LN(0.3) + 2 * LN(0.1))  # P(b|" ") P(b|b) P(b|b)
    assert ll[2] == pytest.approx(3 * LN(0.25))  # " aaaaa": its last 3 tokens, each "a" after an "a"
    rows = E.evaluate_task(model, "toy", docs, pairs, truncated, max_len=3)
    assert {r["truncated"] for r in rows} == {2}


def test_winogrande_scores_the_shared_suffix_after_each_filled_context():
    doc = T.winogrande_doc({"sentence": "ab _ b.", "option1": "a", "option2": "b", "answer": "2"})
    assert doc == {"choices": ["ab a", "ab b"], "target": "b.", "gold": 1}
    assert E.doc_requests(doc) == [("ab a", " b."), ("ab b", " b.")]


# ---------------------------------------------------------------------------
# Context / continuation split on a tiny tiktoken BPE

TINY = tiktoken.Encoding(name="tiny", pat_str=r" ?[a-z]+|\s+|[^a-z\s]+",
                         mergeable_ranks={b"a": 0, b"b": 1, b"c": 2, b" ": 3, b"bc": 4, b"ab": 5}, special_tokens={})


class TinyTok:
    def __init__(self, bos=None):
        self.bos = bos

    def encode(self, text):
        return TINY.encode_ordinary(text)


def test_continuation_tokens_are_the_whole_encoding_minus_the_context_tokens():
    # "abc" merges to [a, bc] (bc ranks before ab) while "ab" alone is [ab]: the harness keeps the context's
    # own encoding and takes the continuation from the whole string, so the model reads [ab, bc]
    assert TINY.encode_ordinary("abc") == [0, 4] and TINY.encode_ordinary("ab") == [5]
    assert E.encode_pair(TinyTok(), "ab", "c") == ([5], [4])


def test_trailing_context_whitespace_moves_into_the_continuation():
    # ("ab ", "c") is scored as ("ab", " c")
    assert E.encode_pair(TinyTok(), "ab ", "c") == ([5], [3, 2])


def test_bos_starts_the_context_when_the_tokenizer_has_one():
    assert E.encode_pair(TinyTok(bos=6), "ab", " c") == ([6, 5], [3, 2])


# ---------------------------------------------------------------------------
# Prompts: the harness's strings, from original (hub) rows and from the offline copies

HUB_ROWS = {
    "hellaswag": ({"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
                   "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                               "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": "3"},
                  "Roof shingle removal: A man is sitting on a roof. He", "is using wrap to wrap a pair of skis.", 3),
    "arc_easy": ({"question": "Which piece of safety equipment is used to keep mold spores from entering the "
                              "respiratory system?",
                  "choices": {"text": ["safety goggles", "breathing mask", "rubber gloves", "lead apron"],
                              "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
                 "Question: Which piece of safety equipment is used to keep mold spores from entering the "
                 "respiratory system?\nAnswer:", "safety goggles", 1),
    "piqa": ({"goal": "dresser", "sol1": "replace drawer with bobby pin ", "sol2": "finish, woodgrain with  bobby pin ",
              "label": 1}, "Question: dresser\nAnswer:", "replace drawer with bobby pin ", 1),
    "boolq": ({"passage": "Windsor Castle is a royal residence.", "question": "is windsor castle a royal residence",
               "label": 1},
              "Windsor Castle is a royal residence.\nQuestion: is windsor castle a royal residence?\nAnswer:", "no", 1),
    "openbookqa": ({"question_stem": "Predators eat", "choices": {"text": ["lions", "humans", "bunnies", "grass"],
                                                                  "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
                   "Predators eat", "lions", 2),
    "mmlu": ({"question": "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field. ", "subject": "abstract_algebra",
              "choices": ["0", "1", "2", "3"], "answer": 1},
             "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
             "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer:", "A", 1),
}


@pytest.mark.parametrize("task", sorted(HUB_ROWS))
def test_prompt_from_the_original_dataset_row(task):
    row, context, first_choice, gold = HUB_ROWS[task]
    doc = T.HUB[task][3](row)
    assert doc["context"] == context
    assert doc["choices"][0] == first_choice
    assert doc["gold"] == gold
    assert E.doc_requests(doc)[0] == (context, " " + first_choice)


def test_hub_datasets_are_the_harness_splits(monkeypatch):
    import datasets
    calls = []

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return [HUB_ROWS["hellaswag"][0]]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert T.load_task("hellaswag")[0]["context"] == HUB_ROWS["hellaswag"][1]
    assert calls == [("Rowan/hellaswag", None, "validation")]


def test_hellaswag_cleaning_of_wikihow_markers():
    row = {"activity_label": "Personal Care and Style", "ctx_a": "[header] How to buy a band [title] Find a ring.",
           "ctx_b": "", "endings": ["[step] Go to [www.x.org] now.", "b", "c", "d"], "label": "0"}
    doc = T.hellaswag_doc(row)
    assert doc["context"] == "Personal Care and Style: How to buy a band. Find a ring."
    # the harness strips before it removes markers, so a leading marker leaves a space (kept, as there)
    assert doc["choices"][0] == " Go to now."


# first document of each offline copy (../shared/data/evals), as the harness would prompt it
LOCAL_FIRST = {
    "hellaswag": ("Roof shingle removal: A man is sitting on a roof. He", "is using wrap to wrap a pair of skis.", 3),
    "arc_easy": ("Question: Which statement best explains why photosynthesis is the foundation of most food webs?"
                 "\nAnswer:", "Sunlight is the source of energy for nearly all ecosystems.", 0),
    "arc_challenge": ("Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which "
                      "is the most likely effect of this increase in rotation?\nAnswer:",
                      "Planetary density will decrease.", 2),
    "piqa": ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
             "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you will "
             "also need to supply it with a water bottle and a food dish.", 0),
    "openbookqa": ("A person wants to start saving money so that they can afford a nice vacation at the end of the "
                   "year. After looking over their budget and expenses, they decide the best way to save money is to",
                   "make more phone calls", 1),
    "mmlu": ("The following are multiple choice questions (with answers) about abstract algebra.\n\nFind the degree "
             "for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:",
             "A", 1),
}


@pytest.mark.parametrize("task", sorted(LOCAL_FIRST))
def test_prompt_from_the_offline_copy(task, shared_data):
    context, first_choice, gold = LOCAL_FIRST[task]
    doc = T.load_task(task, shared_data / "evals", limit=1)[0]
    assert (doc["context"], doc["choices"][0], doc["gold"]) == (context, first_choice, gold)


def test_offline_boolq_and_winogrande(shared_data):
    boolq = T.load_task("boolq", shared_data / "evals", limit=1)[0]
    assert boolq["context"].startswith("All biomass goes through at least some of these steps:")
    assert boolq["context"].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert (boolq["choices"], boolq["gold"]) == (["no", "yes"], 0)
    wino = T.load_task("winogrande", shared_data / "evals", limit=1)[0]
    # the same document as the original row, through the harness's partial scoring
    original = T.winogrande_doc({"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier "
                                             "cases.", "option1": "Sarah", "option2": "Maria", "answer": "2"})
    assert wino == original
    assert E.doc_requests(wino)[1] == ("Sarah was a much better surgeon than Maria so Maria",
                                       " always got the easier cases.")


def test_limit_applies_to_each_mmlu_subject(shared_data):
    docs = T.load_task("mmlu", shared_data / "evals", limit=2)
    assert len(docs) == 2 * 57
    assert docs[0]["subject"] == docs[1]["subject"] != docs[2]["subject"]


# ---------------------------------------------------------------------------
# Held-out loss

def test_heldout_loss_of_a_uniform_model_is_log_vocab():
    V = 4
    model = BigramModel([[1 / V] * V] * V)
    rows = torch.tensor([[0, 1, 2, 3, 0], [3, 2, 1, 0, 1]])
    # tokens 0, 1 are one byte, 2 is two bytes, 3 is end-of-text (no text); a last, shorter row counts too
    r = E.heldout_loss(model, [rows, rows, rows[:1, :3]], bytes_per_token=torch.tensor([1, 1, 2, 0]))
    assert r["tokens"] == 2 * 2 * 4 + 2
    assert r["bytes"] == 2 * ((1 + 2 + 0 + 1) + (2 + 1 + 1 + 1)) + (1 + 2)
    assert r["loss"] == pytest.approx(LN(V)) and r["ppl"] == pytest.approx(V)
    assert r["bpb"] == pytest.approx(18 * math.log2(V) / 21)


def test_token_bytes_add_up_to_the_utf8_length_of_the_text():
    from data import Tokenizer, get_tokenizer
    text = "naïve café — 日本"
    tok = get_tokenizer("bytes")
    tb = E.token_bytes(tok)
    assert tb[tok.eot] == 0 and tb[tok.encode(text)].sum() == len(text.encode("utf-8")) == 23
    # a BPE whose merges join the two bytes of "é" and of "ï"
    ranks = {bytes([b]): b for b in range(256)} | {"é".encode(): 256, "ï".encode(): 257}
    bpe = Tokenizer("tiny", tiktoken.Encoding("tiny", pat_str=r"\S+|\s+", mergeable_ranks=ranks,
                                              special_tokens={"<|eot|>": 258}), eot=258)
    tb = E.token_bytes(bpe)
    assert tb[256] == 2 and tb[258] == 0
    assert tb[bpe.encode(text)].sum() == 23 and len(bpe.encode(text)) == 21


# ---------------------------------------------------------------------------
# Results file, checkpoints, the command line

def test_results_json_merges_tasks_of_one_step(tmp_path):
    path = tmp_path / "eval_step7.json"
    row = {"task": "piqa", "metric": "acc", "value": 0.5, "stderr": 0.1, "n": 10}
    E.write_results(path, [row], 7, {"tokenizer": "bytes"})
    E.write_results(path, [{**row, "task": "boolq"}, {**row, "value": 0.75}], 7, {"tokenizer": "bytes"})
    out = json.load(open(path))
    assert out["step"] == 7 and out["tokenizer"] == "bytes"
    assert out["results"] == [{"task": "boolq", "metric": "acc", "value": 0.5, "stderr": 0.1, "n": 10, "step": 7},
                              {"task": "piqa", "metric": "acc", "value": 0.75, "stderr": 0.1, "n": 10, "step": 7}]


def test_results_json_is_replaced_whole_or_left_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "eval_step7.json"
    E.write_results(path, [{"task": "piqa", "metric": "acc", "value": 0.5, "stderr": 0.1, "n": 10}], 7, {})
    before = path.read_text()

    def disk_fills(obj, f, **kw):  # half the new file, then a full disk
        f.write(json.dumps(obj)[:20])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(E.json, "dump", disk_fills)
    with pytest.raises(OSError, match="No space left"):
        E.write_results(path, [{"task": "boolq", "metric": "acc", "value": 0.7, "stderr": 0.1, "n": 10}], 7, {})
    assert path.read_text() == before and os.listdir(tmp_path) == ["eval_step7.json"]


def test_scoring_draws_no_progress_bar_where_stderr_is_no_terminal(capsys, monkeypatch):
    model, pairs = BigramModel([[0.5, 0.5], [0.5, 0.5]]), [([0], [1])] * 3
    E.loglikelihoods(model, pairs, max_len=8, batch_size=1)
    assert capsys.readouterr().err == ""  # a log file gets no "\r" redraws
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    E.loglikelihoods(model, pairs, max_len=8, batch_size=1)
    assert "\r" in capsys.readouterr().err  # a terminal gets the bar


def train_state(step, model, tokenizer="bytes", data_dir="data"):
    """What train.py saves beside the weights (config: the keys eval.py reads)."""
    config = {"tokenizer": tokenizer, "data_dir": str(data_dir), "seq_len": 32, "batch_size": 2, "eval_tokens": 96}
    return {"config": config, "model_config": model.cfg.to_dict(), "step": step, "loader": {}, "totals": {},
            "rng": []}


def tiny_checkpoint(tmp_path, step=3, tokenizer="bytes", data_dir=None, **cfg):
    """A checkpoint as train.py writes it, of a small random model: (tmp_path/ckpt.pt, the model)."""
    cfg = ModelConfig(**{"vocab_size": 257, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                         "ffn_dim": 64, "max_seq_len": 64, **cfg})
    torch.manual_seed(0)
    model = Transformer(cfg)
    state = train_state(step, model, tokenizer, tmp_path / "data" if data_dir is None else data_dir)
    tmp_path.mkdir(parents=True, exist_ok=True)
    checkpoint.save(tmp_path, step, model, torch.optim.AdamW(model.parameters()), state)
    return tmp_path / "ckpt.pt", model


def offline_evals(tmp_path, winogrande_continuation):
    """A --data_dir with one ARC-Easy question and one WinoGrande sentence, in the offline copies' formats."""
    data = tmp_path / "evals"
    (data / "arc_easy").mkdir(parents=True)
    (data / "arc_easy" / "arc_easy.jsonl").write_text(
        json.dumps({"query": "Question: Up or down?", "choices": ["up", "down"], "gold": 0}) + "\n")
    (data / "winogrande").mkdir()
    (data / "winogrande" / "winogrande.jsonl").write_text(json.dumps(
        {"context_options": ["The cat sat so the cat", "The cat sat so the mat"],
         "continuation": winogrande_continuation, "gold": 0}) + "\n")
    return data


def test_cli_scores_offline_tasks_and_writes_results_into_the_run_folder(tmp_path, capsys):
    path, _ = tiny_checkpoint(tmp_path, step=42)
    data = offline_evals(tmp_path, "purred.")
    E.main(["--ckpt", str(path), "--tasks", "arc_easy,winogrande", "--data_dir", str(data), "--device", "cpu"])
    out = json.load(open(tmp_path / "eval_step42.json"))
    assert out["step"] == 42 and out["tokenizer"] == "bytes" and out["bos_prepended"] is False
    assert [(r["task"], r["metric"], r["n"], r["step"], r["data"]) for r in out["results"]] == [
        ("arc_easy", "acc", 1, 42, str(data)), ("arc_easy", "acc_norm", 1, 42, str(data)),
        ("winogrande", "acc", 1, 42, str(data)), ("winogrande", "acc_norm", 1, 42, str(data))]
    assert "bytes tokenizer: no BOS" in capsys.readouterr().out
    # with --limit, a file of its own: a partial score never replaces a full one
    E.main(["--ckpt", str(path), "--tasks", "arc_easy", "--data_dir", str(data), "--limit", "1", "--device", "cpu"])
    assert [r["task"] for r in json.load(open(tmp_path / "eval_step42_limit1.json"))["results"]] == ["arc_easy"] * 2


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled.*intent is to save")  # this test's own dcp.save
def test_an_fsdp_checkpoint_folder_is_scored_like_a_file(tmp_path):
    import torch.distributed.checkpoint as dcp
    _, model = tiny_checkpoint(tmp_path / "file", tie_embeddings=True)
    # what train.py writes with fsdp: the sharded model and optimizer, train_state.pt, and every file's CRC-32
    folder = tmp_path / "ckpt_0000003.pt"
    dcp.save({"model": model.state_dict(), "optimizer": {"state": {}}}, checkpoint_id=folder)
    torch.save(train_state(3, model), folder / "train_state.pt")
    (folder / "checksums.json").write_text(json.dumps({f.name: zlib.crc32(f.read_bytes()) for f in folder.iterdir()}))
    data = offline_evals(tmp_path, "purred.")
    for ckpt in (tmp_path / "file" / "ckpt.pt", folder):
        E.main(["--ckpt", str(ckpt), "--tasks", "winogrande", "--data_dir", str(data), "--device", "cpu"])
    # the folder's results lie beside it, in the run's folder, as a file's do
    file, sharded = (json.load(open(d / "eval_step3.json"))["results"] for d in (tmp_path / "file", tmp_path))
    assert [r["value"] for r in sharded] == [r["value"] for r in file]


def test_a_checkpoint_of_the_wrong_kind_is_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(UserError, match=r"other.pt is not a checkpoint written by train.py: it lacks \['config'"):
        E.main(["--ckpt", str(tmp_path / "other.pt")])
    path, _ = tiny_checkpoint(tmp_path)
    state = torch.load(path, weights_only=False)
    torch.save({**state, "model_config": {**state["model_config"], "no_rope_layers": []}}, path)
    with pytest.raises(UserError, match=r"another version of model.py: its model_config has \['no_rope_layers'\]"):
        E.main(["--ckpt", str(path)])


@pytest.mark.parametrize("tasks, message", [
    (",", "--tasks ',': an empty task name; give comma-separated names from hellaswag, arc_easy, "),
    ("", "--tasks '': an empty task name"),
    ("piqa,,boolq", "--tasks 'piqa,,boolq': an empty task name"),
    ("piqa,hellaswagg", "--tasks 'piqa,hellaswagg': unknown task 'hellaswagg'; give comma-separated names from "
                        "hellaswag, arc_easy, arc_challenge, piqa, winogrande, boolq, openbookqa, mmlu, or all"),
])
def test_task_names_are_checked_before_the_checkpoint_is_read(tasks, message):
    with pytest.raises(UserError, match="^" + re.escape(message)):
        E.main(["--ckpt", "nowhere/ckpt.pt", "--tasks", tasks, "--device", "cpu"])


def test_unknown_task_name():
    with pytest.raises(UserError, match="unknown task 'hellaswagg'; tasks: hellaswag, arc_easy"):
        T.load_task("hellaswagg", "/nowhere")


def test_missing_dataset_file(tmp_path):
    with pytest.raises(UserError, match="piqa: no .*piqa/valid.jsonl"):
        T.load_task("piqa", tmp_path)


def test_an_unreachable_hub_says_to_pass_data_dir(monkeypatch):
    import datasets

    def offline(path, name, split):  # what datasets raises without a network, after its retries
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"^piqa: the Hugging Face hub is unreachable \(Couldn't reach 'baber/piqa' "
                                        r"on the Hub \(LocalEntryNotFoundError\)\): pass --data_dir DIR"):
        T.load_task("piqa")


def prepare_val_split(tmp_path):
    import data
    import prepare
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"{i}.txt").write_text(f"Document {i}: the quick brown fox — ça va? " * 5)
    prepare.prepare(str(docs / "*.txt"), "bytes", tmp_path / "data", val_tokens=1000, num_proc=1)
    return data.TokenLoader(tmp_path / "data", "val", 1, window=1).tokens


def test_cli_heldout_loss_reads_the_rows_of_train_pys_val_loss_or_the_whole_split(tmp_path, monkeypatch):
    import data
    n_val = prepare_val_split(tmp_path)
    path, model = tiny_checkpoint(tmp_path, step=5, data_dir="data")  # relative, as train.py records data_dir=data
    monkeypatch.chdir(tmp_path)  # the folder training ran in
    E.main(["--ckpt", str(path), "--device", "cpu"])
    got = {r["metric"]: r for r in json.load(open(tmp_path / "eval_step5.json"))["results"]}
    # the rows train.py's val_loss reads: eval_tokens=96 positions, 3 rows of seq_len=32 from the split's start
    rows = data.validation_rows(tmp_path / "data", 32, 3)
    direct = E.heldout_loss(model.eval(), [rows], E.token_bytes(data.get_tokenizer("bytes")))
    assert got["loss"]["n"] == direct["tokens"] == 96
    assert got["loss"]["value"] == pytest.approx(direct["loss"]) and got["bpb"]["value"] == pytest.approx(direct["bpb"])
    # bytes tokenizer: every token but end-of-text is one byte
    assert direct["bytes"] == 96 - int((rows[:, 1:] == 256).sum())

    # the whole split: every token but the first is scored once, the last partial row included
    val = torch.from_numpy(data.read_shard(tmp_path / "data" / "val_000000.bin").astype("int64"))
    assert len(val) == n_val and (n_val - 1) % 32 != 0
    E.main(["--ckpt", str(path), "--device", "cpu", "--loss_tokens", "all", "--batch_size", "64"])
    whole = {r["metric"]: r for r in json.load(open(tmp_path / "eval_step5.json"))["results"]
             if r["task"] == "heldout_val_all"}
    assert whole["loss"]["n"] == n_val - 1
    # bpb = summed loss in bits / bytes, and the bytes of val[1:] are its tokens that are not end-of-text
    summed = whole["loss"]["value"] * (n_val - 1)
    assert whole["bpb"]["value"] == pytest.approx(summed / LN(2) / int((val[1:] != 256).sum()))
    # rows of 33 tokens from every 32nd, the last one shorter, summed by hand: the same total
    rows = [val[i:i + 33] for i in range(0, n_val - 1, 32)]
    by_hand = sum(F.cross_entropy(model(r[:, :-1]).flatten(0, 1), r[:, 1:].flatten(), reduction="sum").item()
                  for r in (torch.stack(rows[:-1]), rows[-1][None]))
    assert len(rows[-1]) < 33 and summed == pytest.approx(by_hand, rel=1e-5)


def test_a_relative_data_dir_looked_for_from_elsewhere_names_the_cause(tmp_path, monkeypatch):
    path, _ = tiny_checkpoint(tmp_path, data_dir="data/books_gpt2")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    # not "prepare the data first": the folder exists, only not from here
    with pytest.raises(UserError, match=r"^the run's data_dir data/books_gpt2 \(as the config in .*ckpt.pt records "
                                        r"it\) is not found from .*elsewhere: run eval.py from the folder training "
                                        r"ran in, or pass --loss_data DIR$"):
        E.main(["--ckpt", str(path), "--device", "cpu"])


def test_heldout_loss_refuses_data_of_another_tokenizer(tmp_path):
    prepare_val_split(tmp_path)
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    (tmp_path / "data" / "meta.json").write_text(json.dumps({**meta, "tokenizer": "gpt2"}))
    with pytest.raises(UserError, match="tokenized with 'gpt2', the checkpoint with 'bytes'"):
        E.heldout_batches(tmp_path / "data", "bytes", 32, 96, 2)


def test_cli_refuses_a_continuation_longer_than_the_window_before_scoring_any_task(tmp_path, monkeypatch, capsys):
    path, _ = tiny_checkpoint(tmp_path, step=42)  # bytes tokenizer, window max_seq_len=64
    data = offline_evals(tmp_path, "purred " * 10)  # " " + "purred " * 10 is 71 bytes
    scored = []
    monkeypatch.setattr(E, "loglikelihoods", lambda *args, **kw: scored.append(args[1]) or [0.0] * len(args[1]))
    argv = ["--ckpt", str(path), "--tasks", "arc_easy,winogrande", "--data_dir", str(data), "--device", "cpu"]
    with pytest.raises(UserError, match="^winogrande: 2 of 2 requests have a continuation longer than the model's "
                                        "window of 64 tokens \\(the longest: 71\\)"):
        E.main(argv)
    assert scored == [] and not (tmp_path / "eval_step42.json").exists()

    E.main(argv + ["--truncate_long"])
    assert [len(cont) for _, cont in scored[1]] == [64, 64]
    out = json.load(open(tmp_path / "eval_step42.json"))
    assert [(r["task"], r["metric"], r["truncated"]) for r in out["results"]] == [
        ("arc_easy", "acc", 0), ("arc_easy", "acc_norm", 0), ("winogrande", "acc", 2), ("winogrande", "acc_norm", 2)]
    assert "winogrande: 2 continuations longer than the window of 64 tokens" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--limit", "0"], "argument --limit: 0 is not a positive integer"),
    (["--limit", "-3"], "argument --limit: -3 is not a positive integer"),
    (["--loss_tokens", "0"], "argument --loss_tokens: 0 is not a positive integer"),
    (["--batch_size", "two"], "argument --batch_size: invalid positive_int value: 'two'"),
    (["--temperature", "0"], "unrecognized arguments: --temperature 0"),  # sampling is sample.py
])
def test_cli_refuses_bad_numbers(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        E.main(["--ckpt", "run/ckpt.pt", *argv])
    assert exit.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--loss_tokens", "inf"], "error: argument --loss_tokens: inf is not a whole number of positions (or all)"),
    (["--loss_tokens", "nan"], "error: argument --loss_tokens: nan is not a whole number of positions (or all)"),
    (["--device", "mps"], "error: --device mps: this machine (torch "),
])
def test_an_impossible_number_of_positions_or_device_is_one_error_line(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)  # a machine without MPS
    with pytest.raises(SystemExit) as exit:
        cli.run(E.main, ["--ckpt", "run/ckpt.pt", *argv])
    err = capsys.readouterr().err
    assert exit.value.code != 0 and "Traceback" not in err
    assert [line for line in err.splitlines() if "error:" in line] == [line for line in err.splitlines()
                                                                        if message in line]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run's folder as python train.py leaves it after two steps: ckpt_0000001.pt, ckpt_0000002.pt, ckpt.pt."""
    import prepare
    root = tmp_path_factory.mktemp("trained")
    for i in range(8):
        (root / f"doc{i}.txt").write_text(f"document {i}: " + " ".join(f"w{(i * 7 + k * k) % 53}" for k in range(300)))
    prepare.prepare(str(root / "*.txt"), "bytes", root / "data", val_tokens=2000, num_proc=1)
    # its own process: train.main sets this process's signal handlers
    subprocess.run([sys.executable, "train.py", f"--data_dir={root / 'data'}", f"--out_dir={root / 'run'}", "--dim=32",
                    "--n_layers=1", "--n_heads=2", "--n_kv_heads=2", "--ffn_dim=64", "--max_seq_len=16", "--seq_len=16",
                    "--batch_size=2", "--max_steps=2", "--warmup_steps=1", "--eval_interval=100", "--eval_tokens=32",
                    "--log_interval=100", "--ckpt_interval=1", "--device=cpu"], cwd=Path(E.__file__).parent,
                   check=True, capture_output=True)
    return root / "run"


def flip_64_bytes_in_the_middle(path):
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(b ^ 0xFF for b in raw[mid:mid + 64])
    path.write_bytes(bytes(raw))


def one_line_errors(script, cases, env=None):
    """Run `script` with each case's arguments, all at once (each pays for importing torch): each must exit 1 with
    exactly one line on stderr, `error: ...` matching the case's message, and no traceback."""
    runs = {message: subprocess.Popen([sys.executable, script, *map(str, argv)], cwd=Path(E.__file__).parent,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for message, argv in cases.items()}
    for message, run in runs.items():
        _, err = run.communicate(timeout=180)
        assert run.returncode == 1 and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1 and re.match("error: .*" + message, err), err


def test_user_mistakes_end_in_one_error_line_without_a_traceback(tmp_path, trained_run):
    prepare_val_split(tmp_path)
    path, _ = tiny_checkpoint(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:  # a sound zip, but not what torch.save writes
        z.writestr("notes.txt", "hello")
    damaged = trained_run / "ckpt_0000002.pt"
    flip_64_bytes_in_the_middle(damaged)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("meta.json", "val_000000.bin", "train_000000.bin"):
        (broken / f).write_bytes((tmp_path / "data" / f).read_bytes())
    with open(broken / "val_000000.bin", "r+b") as f:
        f.truncate(1000)
    cases = {
        "no checkpoint at .*missing.pt": ["--ckpt", tmp_path / "missing.pt"],
        "checkpoint .*notes.txt is damaged": ["--ckpt", tmp_path / "notes.txt"],
        "other.zip is not a checkpoint written by train.py": ["--ckpt", tmp_path / "other.zip"],
        "checkpoint .*ckpt_0000002.pt is damaged .*CRC-32.*ckpt_0000001.pt": ["--ckpt", damaged],  # the one to use
        "no eval data folder .*nowhere": ["--ckpt", path, "--tasks", "piqa", "--data_dir", tmp_path / "nowhere"],
        "piqa: the Hugging Face hub is unreachable .*: pass --data_dir DIR": ["--ckpt", path, "--tasks", "piqa"],
        "val_000000.bin is truncated or damaged": ["--ckpt", path, "--loss_data", broken],
    }
    # a CUDA device the machine lacks: any, where there is no CUDA
    cuda = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    cases[f"--device {cuda}: this machine has {torch.cuda.device_count()} CUDA devices"] = ["--ckpt", path,
                                                                                          f"--device={cuda}"]
    # the hub as it is offline: no network needed, and an empty cache so that nothing is found there
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", **{k: str(tmp_path / "hf_cache") for k in (
        "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE")}}
    one_line_errors("eval.py", cases, offline)
