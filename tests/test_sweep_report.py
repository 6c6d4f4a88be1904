"""Sweeps (--sweep / --seeds in both trainers) and `evaluate.py report`: the grid, skipping finished
points, resuming interrupted ones, results.json, the CSV against the runs' own logs, the summary's
mean +- std, and every figure from small synthetic run folders."""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate
import neurotrails
from test_train_lm import tiny as tiny_lm, write_corpus
from test_train_vision import DEBIAN

ROOT = Path(__file__).resolve().parents[1]
VISION = ["--dataset", "fashion-mnist", "--model", "wrn10-1", "--train-subset", "128", "--test-subset", "64",
          "--batch-size", "32", "--delta-t", "2", "--num-heads", "2", "--epochs", "1",
          "--budget", "equal"]
needs_fmnist = pytest.mark.skipif(not DEBIAN.is_dir(), reason="needs the Debian package dataset-fashion-mnist")


def cli(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


# ----------------------------------------------------------------------------------------------
# The grid


def test_grid_is_the_product_of_the_axes_with_seeds_outermost():
    grid = neurotrails.sweep_grid(["blocks-in-head=1,2", "--method=single,treenet"], "3,5")
    assert [name for name, _, _ in grid] == [
        f"blocks-in-head={b}_method={m}_seed={s}" for s in (3, 5) for b in (1, 2) for m in ("single", "treenet")]
    assert grid[1][1] == [("--blocks-in-head", "1"), ("--method", "treenet")] and grid[1][2] == 3
    assert [s for _, _, s in neurotrails.sweep_grid([], None, default_seed=7)] == [7]  # --seeds alone, or --seed
    assert neurotrails.sweep_grid(["tokenizer=a/b.json"], None)[0][0] == "tokenizer=a%2Fb.json_seed=0"  # a folder name


@pytest.mark.parametrize("specs, seeds, match", [
    (["blocks-in-head"], None, "expected FLAG=V1,V2"), (["blocks-in-head=1,,2"], None, "expected FLAG=V1,V2"),
    (["=1,2"], None, "expected FLAG"), (["seed=0,1"], None, "use --seeds"), (["out=a,b"], None, "cannot be swept"),
    (["epochs=1,2", "epochs=3"], None, "swept twice"), (["epochs=1,1"], None, "repeated"),
    ([], "0,x", "comma-separated integers"), ([], "1,1", "distinct"), ([], "-1", ">= 0")])
def test_bad_sweep_specs_are_refused_naming_the_spec(specs, seeds, match):
    with pytest.raises(ValueError, match=match):
        neurotrails.sweep_grid(specs, seeds)


def test_the_point_command_line_drops_what_the_sweep_sets():
    argv = ["--epochs", "2", "--sweep", "a=1,2", "--seeds=0,1", "--out", "D", "--overwrite", "--seed", "4", "--pack"]
    assert neurotrails.sweep_argv(argv) == ["--epochs", "2", "--pack"]


# ----------------------------------------------------------------------------------------------
# Vision sweeps end to end (real Fashion-MNIST, tiny)


@needs_fmnist
def test_vision_sweep_runs_skips_and_resumes_every_point(tmp_path):
    data, out = tmp_path / "data", tmp_path / "sweep"
    args = [*VISION, "--data-dir", str(data), "--sweep", "method=single,treenet", "--seeds", "0,1", "--out", str(out)]
    first = cli("train_vision.py", *args)
    assert first.returncode == 0, first.stderr
    names = [f"method={m}_seed={s}" for s in (0, 1) for m in ("single", "treenet")]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for name in names:
        results = json.loads((out / name / "results.json").read_text())
        last = json.loads((out / name / "log.jsonl").read_text().splitlines()[-1])
        assert results["metrics"]["acc"] == last["acc"] and results["config"]["seed"] == int(name[-1])
        assert results["config"]["method"] == name.split("_")[0].split("=")[1]
        assert results["machine"]["cpu"] and results["versions"]["torch"] and results["train_time_s"] > 0
    assert [f"[{i}/4] {n}: running" in first.stdout for i, n in enumerate(names, 1)] == [True] * 4

    # the same command again: every point finished, nothing runs, nothing changes
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = cli("train_vision.py", *args)
    assert again.returncode == 0 and again.stdout.count("finished, skipped") == 4
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps

    # interrupted points: one killed after its checkpoint (no results.json), one before its first save
    (out / names[1] / "results.json").unlink()
    (out / names[2] / "last.pt").unlink()
    (out / names[2] / "results.json").unlink()
    third = cli("train_vision.py", *args)
    assert third.returncode == 0, third.stderr
    assert f"{names[1]}: resuming" in third.stdout and f"{names[2]}: running" in third.stdout
    assert third.stdout.count("finished, skipped") == 2
    for name in names:
        assert (out / name / "results.json").exists()
        assert len((out / name / "log.jsonl").read_text().splitlines()) == 1  # one epoch, logged once


@needs_fmnist
def test_a_bad_point_is_refused_before_any_point_runs(tmp_path):
    out = tmp_path / "sweep"
    done = cli("train_vision.py", *VISION, "--data-dir", str(tmp_path / "data"), "--sweep", "blocks-in-head=1,9",
               "--out", str(out))
    assert done.returncode == 1 and not out.exists()
    assert "sweep point blocks-in-head=9_seed=0" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    for extra, match in ((["--compare", "single,treenet"], "--compare"), ([], "need --out")):
        argv = [*VISION, "--data-dir", str(tmp_path / "data"), "--seeds", "0,1", *extra]
        if extra:
            argv += ["--out", str(out)]
        done = cli("train_vision.py", *argv)
        assert done.returncode == 1 and match in done.stderr and not out.exists()


@needs_fmnist
def test_a_failing_point_does_not_stop_the_others(tmp_path):
    out = tmp_path / "sweep"
    (out / "method=single_seed=0").mkdir(parents=True)
    (out / "method=single_seed=0" / "last.pt").write_text("not a checkpoint")  # this point cannot resume
    done = cli("train_vision.py", *VISION, "--data-dir", str(tmp_path / "data"), "--sweep", "method=single,treenet",
               "--out", str(out))
    assert done.returncode == 1 and "1 of 2 points" in done.stderr and "method=single_seed=0" in done.stderr
    assert (out / "method=treenet_seed=0" / "results.json").exists()


def test_lm_sweep_resumes_points_stopped_by_stop_after(tmp_path):
    corpus, out = write_corpus(tmp_path / "corpus", files=24), tmp_path / "sweep"
    args = tiny_lm(corpus, out, "--updates", "4", "--stop-after", "2", "--delta-t", "2",
                   "--sweep", "method=single,neurotrails")
    first = cli("train_lm.py", *args)
    assert first.returncode == 0, first.stderr
    names = ["method=single_seed=0", "method=neurotrails_seed=0"]
    assert not any((out / n / "results.json").exists() for n in names)  # 2 of 4 updates: not finished
    second = cli("train_lm.py", *args)
    assert second.returncode == 0 and second.stdout.count(": resuming") == 2
    for name in names:
        log = [json.loads(line) for line in (out / name / "log.jsonl").read_text().splitlines()]
        results = json.loads((out / name / "results.json").read_text())
        assert [r["update"] for r in log] == [1, 2, 3, 4] and results["metrics"]["ppl"] == log[-1]["ppl"]
        assert results["config"]["tokenizer"].startswith("byte-level BPE of 400 tokens")
    assert cli("train_lm.py", *args).stdout.count("finished, skipped") == 2


# ----------------------------------------------------------------------------------------------
# The report, from synthetic run folders


def fake_vision_run(folder, method, seed, epochs=3, blocks_in_head=2, num_heads=3, sparsity=0.8, finished=True):
    """A run folder as train_vision.py writes it, with metrics that depend on the settings."""
    folder.mkdir(parents=True)
    heads = 1 if method == "single" else num_heads
    cfg = {"dataset": "fashion-mnist", "model": "wrn10-2", "method": method, "seed": seed, "epochs": epochs,
           "num_heads": heads, "blocks_in_head": blocks_in_head, "sparsity": sparsity if method == "neurotrails"
           else 0.0, "train_subset": 6000, "out": str(folder), "device": "cpu"}
    log = []
    for e in range(1, epochs + 1):
        acc = 0.5 + 0.05 * e + 0.01 * seed + 0.02 * blocks_in_head + (0.03 if method == "neurotrails" else 0)
        log.append({"epoch": e, "acc": acc, "nll": 1 / acc, "ece": 0.1 - 0.01 * e, "pd_any": 0.0 if heads == 1 else
                    0.1 * blocks_in_head + 0.01 * seed, "pd_pairwise": 0.0 if heads == 1 else 0.05 * blocks_in_head,
                    "head_acc": [acc - 0.01 * i for i in range(heads)], "epoch_time_s": 2.0})
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    if finished:
        metrics = {**log[-1], "infer_flops_vs_single": heads * (1 - cfg["sparsity"]), "active_params": 1000 * heads,
                   "params": 1000 * heads}
        (folder / "results.json").write_text(json.dumps({"script": "train_vision.py", "metrics": metrics,
                                                         "config": cfg, "wall_time_s": 9.0, "train_time_s": 6.0}))
    return log


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_report_csv_matches_the_logs_and_the_summary_is_mean_and_std(tmp_path):
    runs = tmp_path / "runs"
    logs = {}
    for method in ("single", "treenet", "neurotrails"):
        for epochs in (2, 4):
            for seed in (0, 1, 2):
                logs[method, epochs, seed] = fake_vision_run(runs / f"{method}-{epochs}-{seed}", method, seed, epochs)
    fake_vision_run(runs / "unfinished", "neurotrails", 5, 4, finished=False)
    written = evaluate.write_report([runs], tmp_path / "report")
    rows = read_csv(tmp_path / "report" / "results.csv")
    assert len(rows) == 18  # the unfinished run has no row
    for row in rows:
        last = logs[row["method"], int(row["epochs"]), int(row["seed"])][-1]
        for col in ("acc", "nll", "ece", "pd_any", "pd_pairwise"):
            assert float(row[col]) == pytest.approx(last[col], rel=1e-12)
        assert float(row["head_acc_mean"]) == pytest.approx(sum(last["head_acc"]) / len(last["head_acc"]))
        assert len(row["head_acc"].split(";")) == (1 if row["method"] == "single" else 3)
    # swept: method and epochs; M, S, blocks in head follow from the method and are not columns
    assert {"method", "epochs", "seed"} <= set(rows[0]) and "num_heads" not in rows[0] and "sparsity" not in rows[0]
    summary = (tmp_path / "report" / "summary.md").read_text()
    accs = [100 * logs["treenet", 4, s][-1]["acc"] for s in (0, 1, 2)]
    mean, std = evaluate.mean_std(accs)
    assert f"| TreeNet | 4 | 0,1,2 | {mean:.2f} ± {std:.2f} |" in summary
    assert std == pytest.approx(1.0)  # accuracies 1 point apart: sample std (n - 1) is exactly 1
    assert "1 unfinished run" in summary
    assert {p.name for p in written} == {"results.csv", "summary.md", "fig5_over_training.png", "budget_epochs.png"}


@pytest.mark.parametrize("axis, values, figures", [
    ("blocks_in_head", (1, 2, 3), {"fig3_blocks_in_head.png", "fig3_goldilocks.png"}),
    ("num_heads", (2, 3, 4), {"fig6_num_heads.png"}),
    ("sparsity", (0.5, 0.8, 0.95), {"fig7_sparsity.png"})])
def test_each_analysis_figure_is_written_from_the_runs_that_support_it(tmp_path, axis, values, figures):
    runs = tmp_path / "runs"
    for method in ("treenet", "neurotrails"):
        for v in values:
            for seed in (0, 1):
                fake_vision_run(runs / f"{method}-{v}-{seed}", method, seed, **{axis: v})
    written = {p.name for p in evaluate.write_report([runs], tmp_path / "report")}
    assert written == {"results.csv", "summary.md", "fig5_over_training.png"} | figures
    for name in written:
        path = tmp_path / "report" / name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    rows = read_csv(tmp_path / "report" / "results.csv")
    assert sorted({float(r[axis]) for r in rows if r["method"] == "neurotrails"}) == sorted(map(float, values))


def test_language_runs_get_their_own_table_and_perplexity_curves(tmp_path):
    runs = tmp_path / "runs"
    for method, heads in (("single", 1), ("neurotrails", 3)):
        for seed in (0, 1):
            folder = runs / f"{method}-{seed}"
            folder.mkdir(parents=True)
            cfg = {"model": "llama-9m", "method": method, "seed": seed, "updates": 100, "num_heads": heads}
            log = [{"update": u, "loss": 5.0 - u / 50, "ppl": 300.0 - u - seed, "ppl_logits": 305.0 - u,
                    "ppl_heads": [310.0 - u + h for h in range(heads)], "interval_time_s": 1.5} for u in (50, 100)]
            (folder / "config.json").write_text(json.dumps(cfg))
            (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
            (folder / "results.json").write_text(json.dumps({"script": "train_lm.py", "config": cfg, "metrics": {
                **log[-1], "infer_flops_vs_single": heads, "active_params": heads}}))
    written = {p.name for p in evaluate.write_report([runs], tmp_path / "report")}
    assert written == {"lm_results.csv", "lm_summary.md", "lm_perplexity.png"}
    rows = read_csv(tmp_path / "report" / "lm_results.csv")
    assert sorted(float(r["ppl"]) for r in rows) == [199.0, 199.0, 200.0, 200.0]
    assert "| NeuroTrails | 0,1 | 199.50 ± 0.71 |" in (tmp_path / "report" / "lm_summary.md").read_text()


def test_rows_of_an_earlier_report_stand_in_for_lost_run_folders(tmp_path):
    runs = tmp_path / "runs"
    for method in ("single", "neurotrails"):
        for epochs in (2, 4):
            for seed in (0, 1):
                fake_vision_run(runs / f"{method}-{epochs}-{seed}", method, seed, epochs)
    evaluate.write_report([runs], tmp_path / "full")
    full = read_csv(tmp_path / "full" / "results.csv")
    # the single network's folders are lost; NeuroTrails' seed 1 at 4 epochs is also in the old CSV
    # but its folder is here and was re-run with another result: the folder wins
    for path in runs.glob("single-*"):
        for f in path.iterdir():
            f.unlink()
        path.rmdir()
    rerun = runs / "neurotrails-4-1" / "results.json"
    results = json.loads(rerun.read_text())
    results["metrics"]["acc"] = 0.25
    rerun.write_text(json.dumps(results))
    written = {p.name for p in evaluate.write_report([runs], tmp_path / "merged",
                                                     rows_files=[tmp_path / "full" / "results.csv"])}
    assert written == {"results.csv", "summary.md", "fig5_over_training.png", "budget_epochs.png"}
    merged = read_csv(tmp_path / "merged" / "results.csv")
    assert len(merged) == len(full) == 8 and list(merged[0]) == list(full[0])
    by_run = {r["run"]: r for r in merged}
    for old in full:
        row = by_run[old["run"]]
        if old["run"].endswith("neurotrails-4-1"):
            assert float(row["acc"]) == 0.25
        else:
            assert row == old  # every cell as written, the lost folders' rows included
    summary = (tmp_path / "merged" / "summary.md").read_text()
    assert "| single dense | 4 | 0,1 |" in summary and "4 row(s) come from earlier reports" in summary
    # an earlier report alone: the table and the per-point figures, no curves
    assert {p.name for p in evaluate.write_report([], tmp_path / "alone", rows_files=[
        tmp_path / "merged" / "results.csv"])} == {"results.csv", "summary.md", "budget_epochs.png"}
    assert read_csv(tmp_path / "alone" / "results.csv") == merged
    blank = tmp_path / "blank.csv"  # an empty cell (a value a run did not have) is read as missing, not refused
    text = (tmp_path / "merged" / "results.csv").read_text().splitlines()
    cells = text[1].split(",")
    cells[text[0].split(",").index("ece")] = ""
    blank.write_text("\n".join([text[0], ",".join(cells), *text[2:]]) + "\n")
    evaluate.write_report([], tmp_path / "blank", rows_files=[blank])
    assert sum(r["ece"] == "" for r in read_csv(tmp_path / "blank" / "results.csv")) == 1
    not_a_report = tmp_path / "other.csv"
    not_a_report.write_text("a,b\n1,2\n")
    done = cli("evaluate.py", "report", "--rows", str(not_a_report), "--out", str(tmp_path / "r"))
    assert done.returncode == 1 and "not a results.csv" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_report_command_line_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, match in (([str(empty), "--out", str(tmp_path / "r")], "no run folders"),
                        ([str(tmp_path / "missing"), "--out", str(tmp_path / "r")], "no such folder")):
        done = cli("evaluate.py", "report", *args)
        assert done.returncode == 1 and match in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


@needs_fmnist
def test_compare_writes_its_table_as_csv_and_markdown(tmp_path):
    out = tmp_path / "cmp"
    done = cli("train_vision.py", *VISION, "--data-dir", str(tmp_path / "data"), "--compare", "single,treenet",
               "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = read_csv(out / "compare.csv")
    assert [r["method"] for r in rows] == ["single", "treenet"]
    for r in rows:
        results = json.loads((out / r["method"] / "results.json").read_text())
        assert float(r["acc"]) == pytest.approx(results["metrics"]["acc"], rel=1e-12)
        assert f"| {r['method']} | {100 * float(r['acc']):.2f} |" in (out / "compare.md").read_text()
    assert f"wrote {out / 'compare.csv'}" in done.stdout


def test_config_reruns_a_stored_run_and_flags_override_it(tmp_path):
    import train_lm
    import train_vision
    for module, argv in ((train_vision, ["--dataset", "fashion-mnist", "--model", "wrn10-2", "--method", "treenet",
                                         "--epochs", "7", "--head-lr-scale", "3", "--train-subset", "500",
                                         "--aggregate", "logits", "--budget", "density", "--out", str(tmp_path / "a")]),
                         (train_lm, ["--dataset", "text", "--data-dir", str(tmp_path), "--train-tokenizer", "300",
                                     "--model", "llama-9m", "--updates", "9", "--pack", "--seq-len", "64",
                                     "--out", str(tmp_path / "a")])):
        stored = module.resolve_config(module.parse_args(argv)[1])
        (tmp_path / "results.json").write_text(json.dumps({"config": stored, "metrics": {}}))
        again = module.resolve_config(module.parse_args(["--config", str(tmp_path / "results.json"), "--out",
                                                         str(tmp_path / "b"), "--seed", "4"])[1])
        assert {k: (stored[k], again[k]) for k in stored if stored[k] != again[k]} == {
            "out": (str(tmp_path / "a"), str(tmp_path / "b")), "seed": (0, 4)}


def sweep_args(out, sweep, overwrite=False):
    return type("Args", (), {"out": str(out), "compare": None, "resume": None, "sweep": [sweep], "seeds": None,
                             "seed": 0, "overwrite": overwrite})()


def test_an_interrupted_point_stops_the_sweep(tmp_path):
    calls = []

    def main(point):  # the first point is stopped by Ctrl-C
        calls.append(point)
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        neurotrails.run_sweep(main, ["--sweep", "epochs=1,2", "--out", str(tmp_path)], sweep_args(tmp_path, "epochs=1,2"),
                              lambda a: {})
    assert len(calls) == 1 and calls[0][-4:] == ["--seed", "0", "--out", str(tmp_path / "epochs=1_seed=0")]


def test_a_point_another_process_is_running_is_left_to_it(tmp_path, capsys):
    calls = []
    (tmp_path / "epochs=2_seed=0").mkdir()
    # another process holds the point's .lock, as a running training process does
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'w'); "
                               "fcntl.lockf(f, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
                               str(tmp_path / "epochs=2_seed=0" / ".lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = sweep_args(tmp_path, "epochs=1,2,3")
        neurotrails.run_sweep(calls.append, ["--out", str(tmp_path)], args, lambda a: {})
    finally:
        holder.communicate("")  # the process ends, and with it its lock
    assert [c[-1] for c in calls] == [str(tmp_path / "epochs=1_seed=0"), str(tmp_path / "epochs=3_seed=0")]
    out = capsys.readouterr().out
    assert "[2/3] epochs=2_seed=0: in use by another process, left to it" in out
    assert "1 left to the processes running them: epochs=2_seed=0" in out
    calls.clear()  # released: the next run of the command takes it (the others hold no results.json here)
    neurotrails.run_sweep(calls.append, ["--out", str(tmp_path)], args, lambda a: {})
    assert str(tmp_path / "epochs=2_seed=0") in calls[1] and "left to" not in capsys.readouterr().out


def finished_point(folder, config):
    folder.mkdir(parents=True)
    (folder / "log.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")
    (folder / "results.json").write_text(json.dumps({"config": config, "metrics": {}}))


def test_a_finished_point_is_skipped_only_if_its_config_is_the_one_it_would_run_now(tmp_path, capsys):
    calls = []
    finished_point(tmp_path / "epochs=1_seed=0", {"dense_epochs": 1, "lr": 0.1, "out": "elsewhere"})
    finished_point(tmp_path / "epochs=2_seed=0", {"dense_epochs": 2, "lr": 0.1})

    def resolve(point):
        return {"dense_epochs": int(point[point.index("--epochs") + 1]), "lr": 0.05}  # --lr changed since
    args = sweep_args(tmp_path, "epochs=1,2")
    with pytest.raises(ValueError, match="2 differ from their stored runs .* --overwrite re-runs them"):
        neurotrails.run_sweep(calls.append, [], args, resolve)
    assert calls == [] and capsys.readouterr().out.count("NOT re-run: its stored run differs in lr") == 2
    args.overwrite = True  # now both re-run, each told to replace its folder
    neurotrails.run_sweep(calls.append, [], args, resolve)
    assert len(calls) == 2 and all("--overwrite" in c for c in calls)
    calls.clear()  # a config equal but for where it ran (out, device, ...) is finished
    assert neurotrails.run_sweep(calls.append, [], sweep_args(tmp_path, "epochs=1"),
                                 lambda p: {"dense_epochs": 1, "lr": 0.1, "out": "here"}) is None
    assert calls == [] and "finished, skipped" in capsys.readouterr().out


def test_distinct_sweep_values_never_share_a_folder():
    names = [name for name, _, _ in neurotrails.sweep_grid(["data-dir=A/x,A-x,/A/x"], None)]
    assert len(set(names)) == 3, names


def test_report_skips_unreadable_folders_naming_the_file_and_counts_a_copied_run_once(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        folder = runs / f"seed={seed}"
        folder.mkdir(parents=True)
        cfg = {"method": "single", "seed": seed, "epochs": 2, "out": str(folder)}
        (folder / "config.json").write_text(json.dumps(cfg))
        log = [{"epoch": e, "acc": 0.5 + e / 10, "nll": 1.0, "ece": 0.1, "pd_any": 0.0, "train_loss": 1.0}
               for e in (1, 2)]
        (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        (folder / "results.json").write_text(json.dumps({"script": "train_vision.py", "config": cfg,
                                                         "metrics": log[-1]}))
    shutil.copytree(runs / "seed=1", runs / "copy-of-seed=1")  # a copied folder: the same run
    (runs / "broken").mkdir()
    (runs / "broken" / "config.json").write_text(json.dumps({"method": "single", "seed": 5}))
    (runs / "broken" / "log.jsonl").write_text('{"epoch": 1, "acc": 0.5}\n{"epoch": 2, "ac')  # truncated
    (runs / "garbage").mkdir()
    (runs / "garbage" / "config.json").write_text("[1, 2]")
    (runs / "garbage" / "log.jsonl").write_text("")
    evaluate.write_report([runs, runs / "seed=0"], tmp_path / "report")  # seed=0 given twice, too
    err = capsys.readouterr().err
    assert f"skipped {runs / 'broken'}: {runs / 'broken' / 'log.jsonl'} line 2: not JSON" in err
    assert f"skipped {runs / 'garbage'}" in err and "2 unreadable run folder(s) skipped" in err
    assert "counted once" in err
    rows = read_csv(tmp_path / "report" / "results.csv")
    assert sorted(int(r["seed"]) for r in rows) == [0, 1]
    assert [float(r["best_acc"]) for r in rows] == [0.7, 0.7]  # the best test epoch, labelled as such


def test_rows_with_a_non_numeric_metric_are_refused_naming_line_and_column(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("run,script,method,seed,acc,nll\nr0,train_vision.py,single,0,0.8,0.5\n"
                    "r1,train_vision.py,single,1,eighty,0.5\n")
    with pytest.raises(ValueError, match=r"line 3, column acc: 'eighty' is not a number"):
        evaluate.earlier_rows(path)


def test_summary_leaves_a_cell_empty_where_a_point_lacks_a_column():
    rows = [{"method": "single", "seed": 0, "acc": 0.8, "train_flops_vs_single": 1.0},
            {"method": "neurotrails", "seed": 0, "acc": 0.7}]  # e.g. a row of an older report
    table = evaluate.summary_markdown(rows, ["method"], "t")
    assert "| NeuroTrails | 0 | 70.00 | — |" in table and "| single dense | 0 | 80.00 | 1.00 |" in table


def test_budget_modes_at_one_E_are_plotted_against_training_flops_and_each_methods_epochs(tmp_path):
    """The paper's protocol: methods under --budget paper and flops at one E; the report draws
    accuracy and NLL against training FLOPs (a line per method through its budgets) and against
    each method's own epochs, and its table keeps the budget apart."""
    runs = tmp_path / "runs"
    for budget, own in (("paper", {"single": 10, "neurotrails": 18}), ("flops", {"neurotrails": 8})):
        for method, epochs in own.items():
            for seed in (0, 1):
                folder = runs / budget / f"method={method}_seed={seed}"
                fake_vision_run(folder, method, seed, epochs)
                for name in ("config.json", "results.json"):  # the budget fields train_vision.py records
                    data = json.loads((folder / name).read_text())
                    cfg = data.get("config", data)
                    cfg.update(budget=budget, dense_epochs=10,
                               train_flops_vs_single=1.0 if method == "single" else 1.27 * epochs / 18)
                    (folder / name).write_text(json.dumps(data))
    written = {p.name for p in evaluate.write_report([runs], tmp_path / "report")}
    assert {"budget_flops.png", "budget_epochs.png"} <= written
    rows = read_csv(tmp_path / "report" / "results.csv")
    assert {(r["method"], r["budget"], r["epochs"]) for r in rows} == {
        ("single", "paper", "10"), ("neurotrails", "paper", "18"), ("neurotrails", "flops", "8")}
    assert "| NeuroTrails | flops | 0,1 |" in (tmp_path / "report" / "summary.md").read_text()
    assert {r["machine"] for r in rows} == {""}  # fake runs name no machine; real ones their CPU


def test_every_row_of_the_report_names_the_machine_it_ran_on(tmp_path):
    runs = tmp_path / "runs"
    for seed, machine in ((0, {"cpu": "AMD EPYC (family 25, model 17)", "isa": ["avx512_bf16"]}),
                          (1, {"cpu": "Intel(R) Xeon(R) Processor (family 6, model 207)", "isa": ["amx_bf16"]})):
        fake_vision_run(runs / f"seed={seed}", "single", seed)
        results = json.loads((runs / f"seed={seed}" / "results.json").read_text())
        (runs / f"seed={seed}" / "results.json").write_text(json.dumps({**results, "machine": machine}))
    evaluate.write_report([runs], tmp_path / "report")
    assert [r["machine"] for r in read_csv(tmp_path / "report" / "results.csv")] == [
        "AMD EPYC (family 25, model 17)", "Intel(R) Xeon(R) Processor (family 6, model 207) AMX"]


def test_legends_name_a_head_learning_rate_only_where_it_is_not_the_papers():
    keys = ["method", "head_lr_scale"]
    assert evaluate.group_label(("neurotrails", 3.0), keys) == "NeuroTrails, head lr x3"
    assert evaluate.group_label(("neurotrails", 1.0), keys) == "NeuroTrails"
    assert evaluate.group_label(("single", 1), keys) == "single dense"
    assert evaluate.group_label(("neurotrails", "M"), keys) == "NeuroTrails, head lr scale M"  # Fig. 6's arm
    assert evaluate.group_label((2, 0.5), ["blocks_in_head", "head_lr_scale"]) == "blocks in head 2, head lr x0.5"


def test_loss_curves_keep_their_late_values_readable_when_the_first_evaluations_are_huge():
    early_spike = [6.5, 2.0, 1.1] + [0.5 + 0.01 * i for i in range(20)]
    bottom, top = evaluate.loss_axis_range(early_spike)
    assert bottom == pytest.approx(0.95 * 0.5) and 0.69 < top < 1.1  # the rise 0.50 -> 0.69 fills the axis
    assert evaluate.loss_axis_range([0.5 + 0.01 * i for i in range(20)]) is None  # no spike: matplotlib's range
    assert evaluate.loss_axis_range([9.0, 0.5, 0.4]) is None  # too few points to judge


def test_bf16_and_fp32_runs_of_one_point_are_two_rows_of_the_summary_not_two_seeds(tmp_path):
    for bf16 in (True, False):
        folder = tmp_path / "runs" / f"bf16={bf16}"
        fake_vision_run(folder, "neurotrails", 0)
        for name in ("config.json", "results.json"):
            data = json.loads((folder / name).read_text())
            (data["config"] if name == "results.json" else data)["bf16"] = bf16
            (folder / name).write_text(json.dumps(data))
    evaluate.write_report([tmp_path / "runs"], tmp_path / "report")
    assert sorted(r["bf16"] for r in read_csv(tmp_path / "report" / "results.csv")) == ["False", "True"]
    table = [line for line in (tmp_path / "report" / "summary.md").read_text().splitlines() if line.startswith("| ")]
    assert table[0].startswith("| bf16 | seeds |") and len(table) == 4  # header, rule, one row per arithmetic


def test_a_blocks_in_head_sweep_gets_fig_3_not_a_budget_plot_although_its_points_cost_differently(tmp_path):
    runs = tmp_path / "runs"
    for blocks in (1, 2, 4):
        folder = runs / f"blocks-in-head={blocks}_seed=0"
        fake_vision_run(folder, "neurotrails", 0, blocks_in_head=blocks)
        for name in ("config.json", "results.json"):  # the cost train_vision.py records grows with |F_h|
            data = json.loads((folder / name).read_text())
            data.get("config", data).update(budget="paper", dense_epochs=10, train_flops_vs_single=0.8 + 0.1 * blocks)
            (folder / name).write_text(json.dumps(data))
    written = {p.name for p in evaluate.write_report([runs], tmp_path / "report")}
    assert written == {"results.csv", "summary.md", "fig5_over_training.png", "fig3_blocks_in_head.png",
                       "fig3_goldilocks.png"}
