"""tools/mutual_info.py: I(d) recovered where known in closed form, the bias correction, the power-law fit, the
command."""

import bisect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data
import prepare
import tools.mutual_info as mutual_info
import tst
from cli import UserError

ROOT = Path(__file__).resolve().parents[1]

# a 6-state chain that stays put with probability at least 0.6: I(d) falls from 0.68 nats at d=1 to 0.002 at d=8
P = 0.6 * np.eye(6) + 0.4 * np.random.default_rng(0).dirichlet(np.ones(6), 6)
TOLERANCE = 0.005  # nats: about 4 standard deviations of the estimate from 300k tokens (10 seeds: sd <= 0.0013)


def stationary(P):
    w, v = np.linalg.eig(P.T)
    pi = np.real(v[:, np.argmin(abs(w - 1))])
    return pi / pi.sum()


def markov_stream(n, seed):
    """n states of the chain P, started from its stationary distribution."""
    u = np.random.default_rng(seed).random(n).tolist()
    rows = np.cumsum(P, 1).tolist()
    states = [bisect.bisect(np.cumsum(stationary(P)).tolist(), u[0])]
    for x in u[1:]:
        states.append(min(bisect.bisect(rows[states[-1]], x), len(P) - 1))
    return np.array(states)


def markov_mi(D):
    """The true I(d), d = 1..D: sum_ij pi_i P^d_ij log(P^d_ij / pi_j)."""
    pi = stationary(P)
    return np.array([np.sum(pi[:, None] * Pd * np.log(Pd / pi)) for Pd in
                     (np.linalg.matrix_power(P, d) for d in range(1, D + 1))])


def stream_dir(folder, tokens, vocab_size, n_shards=2):
    """A data folder as prepare.prepare writes it, holding `tokens` as the train split in n_shards shards."""
    folder.mkdir()
    shards = []
    for i, part in enumerate(np.array_split(tokens, n_shards)):
        data.write_shard(folder / f"train_{i:06d}.bin", part, "uint16")
        shards.append({"file": f"train_{i:06d}.bin", "split": "train", "tokens": len(part), "docs_end": i + 1})
    meta = {"source": "test", "tokenizer": "none", "vocab_size": vocab_size, "dtype": "uint16", "eot": vocab_size - 1,
            "bos": None, "done": True, "train_tokens": len(tokens), "val_tokens": 0, "shards": shards}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_sparse_counts_give_the_plug_in_estimate_and_bias_of_the_dense_table():
    rng = np.random.default_rng(1)
    V = 300
    x = rng.integers(0, 40, 5000) * 7 % V  # rows and columns partly empty, so the occupied counts matter
    y = (x + rng.integers(0, 30, 5000)) % V
    table = np.zeros((V, V))
    np.add.at(table, (x, y), 1)
    p, px, py = table / 5000, table.sum(1) / 5000, table.sum(0) / 5000
    full = p > 0
    dense = np.sum(p[full] * np.log(p[full] / np.outer(px, py)[full]))
    bias = (full.sum() - (px > 0).sum() - (py > 0).sum() + 1) / (2 * 5000)
    assert mutual_info.mutual_information(x, y, V) == pytest.approx((dense, bias), rel=1e-10)


def test_a_markov_chain_gives_its_closed_form_mutual_information(tmp_path):
    folder = stream_dir(tmp_path / "chain", markov_stream(300_000, seed=1), vocab_size=6)
    result = mutual_info.estimate(folder, max_distance=8, sample_tokens=300_000, window=1000)
    assert result["windows"] == 300 and result["pairs"][0] == 300 * 999
    np.testing.assert_allclose(result["mi"], markov_mi(8), atol=TOLERANCE)
    # the windows are in random order: pairs from two of them are independent
    assert abs(result["different_windows"]["mi"]) < TOLERANCE


def test_independent_tokens_have_a_plug_in_bias_that_the_correction_removes(tmp_path):
    V, n = 64, 204_800
    folder = stream_dir(tmp_path / "iid", np.random.default_rng(2).integers(0, V, n), vocab_size=V)
    result = mutual_info.estimate(folder, max_distance=8, sample_tokens=n, window=1024)
    # every one of the V*V cells is occupied (~49 pairs each): the bias is (V - 1)^2 / (2N), 0.0097 nats
    np.testing.assert_allclose(result["bias"], [(V - 1) ** 2 / (2 * N) for N in result["pairs"]], rtol=1e-12)
    assert min(result["mi_plug_in"]) > 0.008
    # 2N * plug-in is chi-squared with (V-1)^2 degrees of freedom: the corrected value has sd 0.0002
    assert max(abs(np.array(result["mi"]))) < 0.001


@pytest.mark.parametrize("C0, a, k", [(3.63, 1.35, -1.25), (0.02, 2.0, -0.4), (-0.05, 0.9, -3.1)])
def test_the_fit_recovers_an_exact_power_law(C0, a, k):
    d = np.arange(1, 33)
    fit = mutual_info.fit_power_law(C0 + a * d ** k)
    assert fit["k"] == pytest.approx(k, abs=1e-4)
    assert (fit["C0"], fit["a"]) == pytest.approx((C0, a), abs=1e-3)
    assert fit["residual_rms"] < 1e-4


def test_power_weights_are_what_training_uses():
    for s, k in [(1, -1.25), (4, -1.25), (16, -0.77)]:
        np.testing.assert_allclose(mutual_info.power_weights(s, k), tst.bag_weights(s, f"power:{k}"), rtol=1e-6)


def test_the_command_on_text_prepared_by_prepare_py(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "0_val.txt").write_text("held out")
    (docs / "1_train.txt").write_text("".join("abcdef"[s] for s in markov_stream(200_000, seed=3)))
    prepare.prepare(str(docs / "*.txt"), "bytes", tmp_path / "out", val_tokens=1, num_proc=1)
    result = mutual_info.main(["--data_dir", str(tmp_path / "out"), "--max_distance", "6", "--s", "4",
                               "--sample_tokens", "2e5", "--window", "500", "--seed", "5"])
    saved = json.loads((tmp_path / "out" / "mi.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["sample_tokens"] == 200_000 and saved["vocab_size"] == 257
    np.testing.assert_allclose(saved["mi"], markov_mi(6), atol=TOLERANCE)  # one end-of-text among 200k bytes
    k = round(saved["k"], 2)
    assert f'bag_weights = "power:{k:.2f}"' in capsys.readouterr().out
    np.testing.assert_allclose(saved["weights"], mutual_info.power_weights(4, k))
    assert {"C0", "a", "residual_rms", "fit_plug_in", "bias", "mi_plug_in"} <= saved.keys()


def test_bad_inputs_are_user_errors(tmp_path):
    folder = stream_dir(tmp_path / "small", np.arange(10_000) % 50, vocab_size=50)
    for args, message in [(["--data_dir", str(tmp_path / "nowhere")], "nowhere does not exist"),
                          (["--data_dir", str(folder), "--max_distance", "3"], "at least 4 distances"),
                          (["--data_dir", str(folder), "--window", "32"], "longer than max_distance"),
                          (["--data_dir", str(folder), "--sample_tokens", "1000"], "at least two windows"),
                          (["--data_dir", str(folder), "--sample_tokens", "20000"], "sample fewer tokens"),
                          (["--data_dir", str(folder), "--s", "0"], "at least 1 token")]:
        with pytest.raises(UserError, match=message):
            mutual_info.main(args)


def test_by_default_the_sample_is_the_train_split_up_to_8m_tokens_and_the_output_says_so(tmp_path, capsys):
    folder = stream_dir(tmp_path / "small", np.random.default_rng(4).integers(0, 50, 20_000), vocab_size=50)
    result = mutual_info.main(["--data_dir", str(folder), "--window", "1000"])
    assert result["windows"] == 20 and result["sample_tokens"] == 20_000  # two shards of 10,000: every window
    assert ("20 windows of 1,000 = 20,000 of 20,000 train tokens (seed 0; the default sample: the whole train split, "
            "in whole windows, as it holds under 8,000,000)") in capsys.readouterr().out


def test_the_script_runs_from_anywhere_and_prints_a_user_error_as_one_line(tmp_path):
    # python tools/mutual_info.py finds data.py itself, from any current directory
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "mutual_info.py"), "--data_dir", "nowhere"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.startswith("error: data folder nowhere does not exist")
    assert run.stderr.count("\n") == 1
