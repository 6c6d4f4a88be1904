"""The lm-eval-harness wrapper of `evaluate.py lm-eval` scores requests with the ensemble's
log-probabilities: checked offline on a tiny trained checkpoint against a direct computation, and
end to end through the harness on a local multiple-choice task."""
import json
import math

import pytest
import torch

import evaluate
import export_bench
import models
import train_lm
from test_train_lm import tiny, write_corpus

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm")
    corpus = write_corpus(out / "corpus")
    train_lm.main(tiny(corpus, out / "run", "--updates", "3", "--pack"))
    return out / "run" / "last.pt"


def direct_logprob(net, tok, context, continuation):
    """log p(continuation | context) under the mean of the heads' probabilities, one sequence, no
    batching, padding or truncation."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = net(torch.tensor([whole[:-1]])).log_softmax(-1)[:, 0]  # (M, T, V)
    total = 0.0
    for pos in range(len(ctx), len(whole)):
        total += math.log(sum(math.exp(float(logp[h, pos - 1, whole[pos]])) for h in range(logp.shape[0])) /
                          logp.shape[0])
    return total


REQUESTS = [("The object is", " returned by the function."), ("Return a new", " list of strings"),
            ("A", " path"), ("If the argument is omitted, the", " default value is used.")]


def test_loglikelihood_matches_direct_computation(checkpoint):
    net, tok, cfg = evaluate.load_language_model(checkpoint, "cpu")
    lm = evaluate.harness_model(net, tok, cfg["seq_len"] - 1, batch_size=3)  # batches of different lengths
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(REQUESTS)]
    got = lm.loglikelihood(requests)
    for (context, continuation), (logprob, _) in zip(REQUESTS, got):
        assert logprob == pytest.approx(direct_logprob(net, tok, context, continuation), rel=1e-5, abs=1e-4)
        assert logprob < 0
    # a trailing space of the context is scored as part of the continuation, as in the harness' HF model
    moved = lm.loglikelihood([Instance("loglikelihood", {}, ("The object is ", "returned by the function."), 0)])
    assert moved[0][0] == pytest.approx(got[0][0], rel=1e-6)


def test_greedy_flag_is_true_exactly_for_the_ensembles_argmax_continuation(checkpoint):
    net, tok, cfg = evaluate.load_language_model(checkpoint, "cpu")
    lm = evaluate.harness_model(net, tok, cfg["seq_len"] - 1)
    ctx = tok("Return a new", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        probs = net(torch.tensor([ctx])).softmax(-1).mean(0)[0, -1]
    best, worst = tok.decode([int(probs.argmax())]), tok.decode([int(probs.argmin())])
    if tok("Return a new" + best, add_special_tokens=False)["input_ids"] != ctx + [int(probs.argmax())]:
        pytest.skip("the argmax token does not re-tokenize to itself after this context")
    flags = [g for _, g in lm.loglikelihood([Instance("loglikelihood", {}, ("Return a new", c), 0)
                                             for c in (best, worst)])]
    assert flags == [True, False]


def test_rolling_loglikelihood_sums_disjoint_windows(checkpoint):
    net, tok, cfg = evaluate.load_language_model(checkpoint, "cpu")
    text = "Return a new list of strings. " * 6  # longer than one window of seq_len - 1 = 31 tokens
    lm = evaluate.harness_model(net, tok, 31)
    short = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [tok.eos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 40
    expected = sum(lp for lp, _ in evaluate.score_continuations(net, [(ids[s - 1:s], ids[s:s + 31])
                                                                      for s in range(1, len(ids), 31)], 31))
    assert short[0] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(NotImplementedError):
        evaluate.harness_model(net, tok, 31).generate_until([])


def test_cli_runs_a_local_multiple_choice_task_through_the_harness(checkpoint, tmp_path, monkeypatch, capsys):
    docs = [{"question": q, "choices": c, "answer": a} for q, c, a in [
        ("Return a new", ["list of strings", "zebra crossing"], 0),
        ("The object is", ["returned by the function", "purple elephant"], 0),
        ("If the argument is omitted, the", ["moon rises", "default value is used"], 1),
        ("A path", ["object", "banana"], 0)]]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'docs.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr("sys.argv", ["evaluate.py", "lm-eval", "--checkpoint", str(checkpoint), "--tasks", "tiny_mc",
                                     "--include-path", str(tmp_path), "--device", "cpu", "--json"])
    evaluate.main()
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    net, tok, _ = evaluate.load_language_model(checkpoint, "cpu")
    correct = [max(range(2), key=lambda i: direct_logprob(net, tok, d["question"], " " + d["choices"][i]))
               == d["answer"] for d in docs]
    assert result["tiny_mc"]["acc"] == pytest.approx(sum(correct) / len(docs))


def write_tiny_task(folder):
    docs = [{"question": "Return a new", "choices": ["list of strings", "zebra crossing"], "answer": 0},
            {"question": "A path", "choices": ["object", "banana"], "answer": 0}]
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n")


def test_the_lm_eval_command_scores_an_exported_head_from_the_repository_root(checkpoint, tmp_path):
    """The README's path: `export_bench.py hf`, then the harness' own `lm_eval --model hf` on one head, run
    from the repository root (where this project's evaluate.py must not stand in for HF's)."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    export_bench.main(["hf", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf")])
    write_tiny_task(tmp_path)
    lm_eval = Path(sys.executable).parent / "lm_eval"
    done = subprocess.run([str(lm_eval), "--model", "hf", "--model_args", f"pretrained={tmp_path / 'hf' / 'head1'}",
                           "--tasks", "tiny_mc", "--include_path", str(tmp_path), "--device", "cpu",
                           "--output_path", str(tmp_path / "out")], cwd=root, capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "HF_DATASETS_OFFLINE": "1",
                                            "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("results*.json")]
    assert results and 0 <= results[0]["results"]["tiny_mc"]["acc,none"] <= 1


def test_cli_offline_without_local_tasks_fails_in_one_line(checkpoint, monkeypatch, capsys):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    monkeypatch.setattr("sys.argv", ["evaluate.py", "lm-eval", "--checkpoint", str(checkpoint)])
    with pytest.raises(SystemExit):
        evaluate.main()
    err = capsys.readouterr().err.strip()
    assert "cannot be reached" in err and len(err.splitlines()) == 1


def test_evaluate_checkpoint_reports_the_logged_perplexity(checkpoint, monkeypatch, capsys):
    train_lm.main(["--eval-only", "--checkpoint", str(checkpoint), "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    logged = json.loads((checkpoint.parent / "log.jsonl").read_text().splitlines()[-1])
    for key in ("ppl", "ppl_logits", "ppl_heads", "eval_tokens"):
        assert result[key] == pytest.approx(logged[key], rel=1e-6), key
    assert result["active_params"] < result["params"]


def test_a_checkpoint_without_a_tokenizer_is_refused_in_one_line_by_every_reader(checkpoint, tmp_path, capsys,
                                                                                  monkeypatch):
    import neurotrails
    state = torch.load(checkpoint, weights_only=True)
    state.pop("tokenizer_json", None)
    state["config"]["tokenizer"] = None
    neurotrails.save_checkpoint(tmp_path / "last.pt", "train_lm.py", state)
    bad = str(tmp_path / "last.pt")
    for run in (lambda: train_lm.main(["--eval-only", "--checkpoint", bad]),
                lambda: export_bench.main(["hf", "--checkpoint", bad, "--out", str(tmp_path / "hf")]),
                lambda: evaluate.main(["lm-eval", "--checkpoint", bad, "--tasks", "tiny_mc", "--device", "cpu"])):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            run()
        err = capsys.readouterr().err.strip()
        assert exit_.value.code != 0 and len(err.splitlines()) == 1 and "carries no tokenizer" in err, err
    assert not (tmp_path / "hf").exists()
