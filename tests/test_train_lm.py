"""train_lm.py on real English text (docstrings of Python's standard library) with a BPE trained on
it: every method trains and logs, --resume continues bitwise, perplexity is what it claims, the
data stream resumes exactly, bad input fails with one line and loses nothing."""
import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import models
import train_lm

ROOT = Path(__file__).resolve().parents[1]


def write_corpus(folder, files=24):
    """Text files of paragraphs: the docstrings of a few standard-library modules."""
    import argparse, collections, email.message, json as json_, pathlib, string, textwrap, unittest  # noqa: E401
    docs = []
    for module in (argparse, collections, email.message, json_, pathlib, string, textwrap, unittest):
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80 and doc not in docs:
                docs.append(doc)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (folder / f"part{i:02d}.txt").write_text("\n\n".join(docs[i::files]))
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def tiny(corpus, out, *extra):
    return ["--dataset", "text", "--data-dir", str(corpus), "--train-tokenizer", "400", "--model", "llama-9m",
            "--seq-len", "32", "--batch-size", "4", "--micro-batch-size", "2", "--eval-tokens", "600",
            "--log-every", "1", "--eval-every", "3", "--budget", "equal", "--out", str(out), *extra]


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["single", "treenet", "ensemble", "neurotrails", "static"])
def test_every_method_trains_logs_and_checkpoints(corpus, tmp_path, method, capsys):
    train_lm.main(tiny(corpus, tmp_path, "--method", method, "--updates", "4", "--delta-t", "2", "--pack"))
    rows = log(tmp_path)
    assert [r["update"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns
    for key in ("loss", "lr", "tokens_per_s", "density"):
        assert key in rows[0]
    heads = 1 if method == "single" else 3
    assert len(rows[2]["ppl_heads"]) == heads and "ppl_logits" in rows[2] and "ppl" not in rows[1]
    assert rows[-1]["ppl"] < 400  # below the uniform guess over the 400-token vocabulary
    if method in ("neurotrails", "static"):
        assert 0.85 < sum(rows[-1]["density"].values()) / len(rows[-1]["density"]) < 0.95
    else:
        assert set(rows[-1]["density"].values()) == {1.0}
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["update"] == 4 and (state["masks"] is not None) == (method in ("neurotrails", "static"))
    assert "ppl" in capsys.readouterr().out


def test_soft_vote_perplexity_is_exp_of_the_mean_nll_of_the_mean_probability():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 5, 7)
    targets = torch.randint(7, (2, 5))
    targets[1, 3:] = -100

    class Fixed(torch.nn.Module):  # a "network" that returns these per-head logits
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return logits

    got = evaluate.perplexity(Fixed(), [(torch.zeros(2, 5), targets)])
    probs = logits.softmax(-1)
    valid = [(b, t) for b in range(2) for t in range(5) if targets[b, t] >= 0]
    vote = [-math.log(probs[:, b, t, targets[b, t]].mean()) for b, t in valid]
    assert got["eval_tokens"] == 8
    assert got["ppl"] == pytest.approx(math.exp(sum(vote) / 8), rel=1e-6)
    mean_logit = logits.mean(0).log_softmax(-1)
    assert got["ppl_logits"] == pytest.approx(math.exp(-sum(mean_logit[b, t, targets[b, t]] for b, t in valid) / 8))
    for i in range(3):
        head = logits[i].log_softmax(-1)
        assert got["ppl_heads"][i] == pytest.approx(math.exp(-sum(head[b, t, targets[b, t]] for b, t in valid) / 8))
    assert got["ppl"] < sum(got["ppl_heads"]) / 3  # mixing probabilities can only lower the mean NLL


def test_resumed_run_equals_uninterrupted_run_bitwise(corpus, tmp_path):
    args = ["--updates", "7", "--delta-t", "2", "--save-every", "3"]  # topology updates at 2, 4, 6
    train_lm.main(tiny(corpus, tmp_path / "whole", *args))
    train_lm.main(tiny(corpus, tmp_path / "split", *args, "--stop-after", "4"))
    assert torch.load(tmp_path / "split" / "last.pt", weights_only=True)["update"] == 4
    train_lm.main(tiny(corpus, tmp_path / "split", *args) + ["--resume", str(tmp_path / "split" / "last.pt")])
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("whole", "split"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["masks"]["masks"]:
        assert torch.equal(a["masks"]["masks"][k], b["masks"]["masks"][k]), k
    assert a["masks"]["num_updates"] == b["masks"]["num_updates"] == 3
    assert a["data"] == b["data"] and a["tokens"] == b["tokens"]
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], b["optimizer"]["state"][k]["exp_avg_sq"])
    strip = lambda rows: [{k: v for k, v in r.items() if "per_s" not in k and not k.endswith("time_s")}  # noqa: E731
                          for r in rows]  # timings differ between runs
    assert strip(log(tmp_path / "whole")) == strip(log(tmp_path / "split"))


def test_token_stream_resumes_at_the_same_sequence(corpus):
    cfg = {"dataset": "text", "data_dir": str(corpus), "seed": 3}
    tok = models.load_tokenizer(tokenizer_json=train_lm.train_tokenizer(train_lm.text_files(corpus, "train"), 300))
    for pack in (False, True):
        a = train_lm.TokenStream(train_lm.document_source(cfg, "train"), tok, 16, pack)
        a.take(5)
        state = a.state_dict()
        b = train_lm.TokenStream(train_lm.document_source(cfg, "train"), tok, 16, pack)
        b.load_state_dict(json.loads(json.dumps(state)))  # survives serialisation
        after = 0
        for _ in range(2000):  # on into the next epoch of this small corpus, and 10 batches further
            x, y = a.take(8)
            assert torch.equal(x, b.take(8)[0])
            after += a.epoch >= 1
            if after == 10:
                break
        assert a.epoch >= 1 and after == 10
        if not pack:  # truncated and padded: targets are -100 exactly at the padding
            assert ((y == -100) == (torch.arange(15) >= (y != -100).sum(1, keepdim=True))).all()
        else:  # packed: full sequences
            assert (y != -100).all() and torch.equal(x[:, 1:], y[:, :-1])


def test_validation_files_are_held_out(corpus):
    train, val = (set(train_lm.text_files(corpus, s)) for s in ("train", "validation"))
    assert val and train and not train & val and len(train | val) == 24


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    cfg = {"lr": 1.0, "warmup": 0.1, "updates": 1000, "min_lr_ratio": 0.1}
    lrs = [train_lm.lr_at(u, cfg) for u in range(1000)]
    assert lrs[0] == pytest.approx(0.01) and lrs[99] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[99:], lrs[100:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-4)


def test_paper_defaults_for_llama_130m_and_350m():
    _, args = train_lm.parse_args(["--model", "llama-130m"])
    cfg = train_lm.resolve_config(args)
    assert (cfg["num_heads"], cfg["blocks_in_head"], cfg["sparsity"], cfg["updates"], cfg["lr"]) == \
        (3, 8, 0.1, 11_111, 1.5e-3)
    assert (cfg["batch_size"], cfg["seq_len"], cfg["delta_t"], cfg["temperature"], cfg["prune"], cfg["grow"]) == \
        (512, 256, 50, 3.0, "soft-magnitude", "rigl")
    cfg = train_lm.resolve_config(train_lm.parse_args(["--model", "llama-350m"])[1])
    assert (cfg["blocks_in_head"], cfg["lr"], cfg["updates"]) == (16, 5e-4, 44_444)
    cfg = train_lm.resolve_config(train_lm.parse_args(["--method", "single"])[1])
    assert (cfg["num_heads"], cfg["sparsity"], cfg["updates"]) == (1, 0.0, 10_000)


@pytest.mark.parametrize("extra, message", [
    (["--model", "llama-1b"], "not a language model"),
    (["--model", "wrn28-10"], "not a language model"),
    (["--sparsity", "1.0"], "argument --sparsity: must be a finite number in [0, 1), got 1.0"),
    (["--blocks-in-head", "5"], "--blocks-in-head must be in [1, 4]"),
    (["--micro-batch-size", "3"], "--micro-batch-size 3 must divide the 4 sequences"),
    (["--seq-len", "1"], "argument --seq-len: must be an integer in [2, 1048576], got 1"),
])
def test_bad_flags_fail_with_one_line(corpus, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        train_lm.main(tiny(corpus, tmp_path / "out", "--updates", "2", *extra))
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_data_and_tokenizer_fail_fast_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = [(["--dataset", "text", "--data-dir", str(tmp_path / "nope")], "no such folder"),
             (["--dataset", "text"], "--dataset text needs --data-dir"),
             (["--dataset", "text", "--data-dir", str(write_corpus(tmp_path / "c", 2)), "--tokenizer",
               str(tmp_path / "c" / "part00.txt")], "not a tokenizer"),
             (["--dataset", "text", "--data-dir", str(tmp_path / "c"), "--tokenizer", str(tmp_path)],
              "not a tokenizer"),
             (["--dataset", "c4", "--tokenizer", "no-such-org/no-such-tokenizer"], "cannot be reached"),
             (["--dataset", "c4", "--data-dir", str(tmp_path / "c")], "no C4 train shards")]
    for extra, message in cases:
        with pytest.raises(SystemExit):
            train_lm.main(["--model", "llama-9m", "--out", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_c4_without_data_offline_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tok = tmp_path / "tok.json"
    tok.write_text(train_lm.train_tokenizer([write_corpus(tmp_path / "c", 2) / "part00.txt"], 300))
    with pytest.raises(SystemExit):
        train_lm.main(["--model", "llama-9m", "--tokenizer", str(tok), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert "allenai/c4" in err and "--data-dir" in err and len(err.splitlines()) == 1


def test_mismatched_resume_and_nan_loss_lose_nothing(corpus, tmp_path, capsys):
    train_lm.main(tiny(corpus, tmp_path, "--updates", "3"))
    ckpt = tmp_path / "last.pt"
    before = ckpt.read_bytes()
    with pytest.raises(SystemExit):  # the model is another one: refused (the optimizer may change, see below)
        train_lm.main(tiny(corpus, tmp_path, "--updates", "3", "--sparsity", "0.2", "--resume", str(ckpt)))
    err = capsys.readouterr().err.strip()
    assert "different configuration" in err and "sparsity" in err and len(err.splitlines()) == 1
    assert ckpt.read_bytes() == before
    with pytest.raises(SystemExit):  # a huge learning rate overflows the weights within a few updates
        train_lm.main(tiny(corpus, tmp_path / "nan", "--updates", "50", "--lr", "1e30", "--warmup", "0",
                           "--save-every", "1"))
    err = capsys.readouterr().err.strip()
    assert ("loss is" in err or "NaN or inf" in err) and len(err.splitlines()) == 1, err
    if "last finite checkpoint" in err:
        state = torch.load(tmp_path / "nan" / "last.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values())
    else:
        assert "no checkpoint was saved" in err and not (tmp_path / "nan" / "last.pt").exists()


def test_local_c4_shards_train_without_the_hub(corpus, tmp_path, monkeypatch):
    """--data-dir with C4's own file layout (json.gz lines with text, timestamp, url)."""
    import gzip
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    c4 = tmp_path / "c4"
    c4.mkdir()
    paragraphs = [p for f in sorted(corpus.glob("*.txt")) for p in f.read_text().split("\n\n")]
    for name, part in (("c4-train.00000-of-00002.json.gz", paragraphs[:100]),
                       ("c4-train.00001-of-00002.json.gz", paragraphs[100:200]),
                       ("c4-validation.00000-of-00001.json.gz", paragraphs[200:])):
        with gzip.open(c4 / name, "wt") as f:
            for i, text in enumerate(part):
                f.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z",
                                    "url": f"https://example.org/{i}"}) + "\n")
    tok = tmp_path / "tok.json"
    tok.write_text(train_lm.train_tokenizer(sorted(corpus.glob("*.txt")), 400))
    train_lm.main(["--data-dir", str(c4), "--tokenizer", str(tok), "--model", "llama-9m", "--seq-len", "32",
                   "--batch-size", "4", "--updates", "3", "--eval-tokens", "300", "--log-every", "1",
                   "--eval-every", "3", "--out", str(tmp_path / "out")])
    rows = log(tmp_path / "out")
    assert [r["update"] for r in rows] == [1, 2, 3] and rows[-1]["ppl"] < 400
    state = torch.load(tmp_path / "out" / "last.pt", weights_only=True)
    assert 0 < rows[0]["tokens"] <= 4 * 31 and state["tokens"] == rows[-1]["tokens"]  # one document per sequence
    assert state["config"]["dataset"] == "c4" and state["tokenizer_json"] is None


@pytest.mark.parametrize("method", ["neurotrails", "ensemble"])
def test_export_hf_writes_each_head_as_a_plain_transformers_llama(method, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    corpus = write_corpus(tmp_path / "corpus")
    train_lm.main(tiny(corpus, tmp_path / "run", "--method", method, "--updates", "2", "--delta-t", "1",
                       "--num-heads", "2"))
    done = subprocess.run([sys.executable, str(ROOT / "export_bench.py"), "hf", "--checkpoint",
                           str(tmp_path / "run" / "last.pt"), "--out", str(tmp_path / "hf")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    net, tokenizer, _ = evaluate.load_language_model(tmp_path / "run" / "last.pt", "cpu")
    ids = torch.tensor([tokenizer("The json module encodes objects.")["input_ids"]])
    with torch.no_grad():
        ours = net(ids)  # (M, 1, T, V)
    for i in range(2):
        folder = tmp_path / "hf" / f"head{i + 1}"
        assert (folder / "model.safetensors").exists()
        hf = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert AutoTokenizer.from_pretrained(folder)("The json module")["input_ids"] == \
            tokenizer("The json module")["input_ids"]
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, ours[i], rtol=1e-4, atol=1e-4)
        if method == "neurotrails":  # the sparse weights travel as exact zeros
            zeros = sum(int((p == 0).sum()) for n, p in hf.named_parameters() if p.dim() == 2)
            assert zeros > 0.05 * sum(p.numel() for n, p in hf.named_parameters() if p.dim() == 2)
    again = subprocess.run([sys.executable, str(ROOT / "export_bench.py"), "hf", "--checkpoint",
                            str(tmp_path / "run" / "last.pt"), "--out", str(tmp_path / "hf")],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 1 and "already holds head folders" in again.stderr
