"""Nothing is lost or mixed: a run folder is never overwritten by accident and never shared by two
runs at once, a failed save (full disk) keeps the previous checkpoint, a diverged run saves
nothing non-finite and names a checkpoint that exists, that checkpoint resumes with a lower
learning rate, an exact resume reproduces the WHOLE checkpoint (RNG states included), no
tokenizer runs a repository's code, and an evaluation never writes where a checkpoint points."""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import neurotrails
import train_lm
import train_vision
from test_train_lm import write_corpus

ROOT = Path(__file__).resolve().parents[1]
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
needs_fashion_mnist = pytest.mark.skipif(not DEBIAN.is_dir(), reason="needs the Debian package dataset-fashion-mnist")
VISION = ["--dataset", "fashion-mnist", "--model", "wrn10-1", "--train-subset", "128", "--test-subset", "64",
          "--batch-size", "32", "--delta-t", "2", "--num-heads", "2", "--blocks-in-head", "2",
          "--budget", "equal"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    if DEBIAN.is_dir():
        train_vision.load_data("fashion-mnist", d)
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def vision(data_dir, out, *extra):
    return VISION + ["--data-dir", str(data_dir), "--out", str(out), *extra]


def lm(corpus, out, *extra):
    return ["--dataset", "text", "--data-dir", str(corpus), "--train-tokenizer", "300", "--model", "llama-9m",
            "--seq-len", "24", "--batch-size", "4", "--micro-batch-size", "2", "--eval-tokens", "300",
            "--delta-t", "2", "--log-every", "1", "--eval-every", "100", "--budget", "equal", "--out", str(out),
            *extra]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_checkpoint(a, b, path="", ignore=("out", "resumed")):
    """Every tensor bitwise equal (weights, masks, optimizer state, every RNG state), every other
    value equal, except config entries that name the folder or the resume history (and so the
    checksum over the whole state, which covers them)."""
    assert type(a) is type(b), path
    if isinstance(a, dict):
        keys = set(a) | set(b)
        if path.endswith("config"):
            keys -= set(ignore)
        if path == "":
            keys -= {"checksum"}
        for k in keys:
            assert k in a and k in b, f"{path}.{k} missing on one side"
            assert_same_checkpoint(a[k], b[k], f"{path}.{k}", ignore)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_checkpoint(x, y, f"{path}[{i}]", ignore)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    else:
        assert a == b, path


def one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------------------------
# Run folders


@needs_fashion_mnist
def test_a_folder_holding_a_run_is_refused_unless_resume_or_overwrite(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train_vision.main(vision(data_dir, out, "--epochs", "1"))
    log, ckpt = (out / "log.jsonl").read_bytes(), (out / "last.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        train_vision.main(vision(data_dir, out, "--epochs", "1", "--seed", "1"))
    assert e.value.code == 1
    line = one_error_line(capsys)
    assert f"--out {out} already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert (out / "log.jsonl").read_bytes() == log and (out / "last.pt").read_bytes() == ckpt
    train_vision.main(vision(data_dir, out, "--epochs", "1", "--seed", "1", "--overwrite"))
    assert load(out / "last.pt")["config"]["seed"] == 1
    assert len((out / "log.jsonl").read_text().splitlines()) == 1


@needs_fashion_mnist
def test_a_second_run_on_a_folder_in_use_is_refused(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    with neurotrails.run_folder(out):  # the folder is being trained into by "another" run
        with pytest.raises(SystemExit):
            train_vision.main(vision(data_dir, out, "--epochs", "1", "--overwrite"))
        assert "is in use by another running process" in one_error_line(capsys)
    train_vision.main(vision(data_dir, out, "--epochs", "1", "--overwrite"))  # released: it runs
    assert (out / "last.pt").exists()


def test_a_sigkilled_run_leaves_its_folder_unlocked_even_with_a_forked_worker_alive(tmp_path):
    """A DataLoader worker (forked) outlives a SIGKILLed trainer for a few seconds; it must not
    keep the folder locked, or the immediate --resume would be refused as "in use"."""
    script = (f"import os, signal, time, neurotrails\n"
              f"with neurotrails.run_folder({str(tmp_path / 'run')!r}):\n"
              f"    if os.fork() == 0:\n"
              f"        time.sleep(20); os._exit(0)\n"
              f"    os.kill(os.getpid(), signal.SIGKILL)\n")
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL
    neurotrails.check_run_folder(tmp_path / "run")  # raises "in use" while anything holds the lock
    with neurotrails.run_folder(tmp_path / "run"):
        pass
    assert time.time() - started < 15  # long before the orphaned child exits


def test_the_default_folder_names_what_makes_runs_differ():
    quick = train_vision.resolve_config(train_vision.parse_args(
        ["--dataset", "fashion-mnist", "--model", "wrn10-2", "--train-subset", "6000", "--epochs", "4"])[1])
    real = train_vision.resolve_config(train_vision.parse_args(["--dataset", "fashion-mnist", "--model", "wrn10-2"])[1])
    assert quick["out"] != real["out"]
    assert "-E4-paper-e7-" in quick["out"] and "-train6000-" in quick["out"] and "-E15-paper-e27-" in real["out"]
    short, long_ = (train_lm.resolve_config(train_lm.parse_args(["--model", "llama-9m", "--updates", u])[1])["out"]
                    for u in ("150", "1000"))
    assert short != long_ and "-U150-paper-u166-" in short


@needs_fashion_mnist
def test_a_finished_run_resumes_into_a_new_folder(data_dir, tmp_path, capsys):
    train_vision.main(vision(data_dir, tmp_path / "a", "--epochs", "2"))
    train_vision.main(vision(data_dir, tmp_path / "b", "--epochs", "2", "--resume", str(tmp_path / "a" / "last.pt")))
    assert (tmp_path / "b" / "log.jsonl").read_text() == (tmp_path / "a" / "log.jsonl").read_text()
    assert_same_checkpoint(load(tmp_path / "a" / "last.pt"), load(tmp_path / "b" / "last.pt"))
    assert "neurotrails" in capsys.readouterr().out  # the result table


def test_a_finished_lm_run_resumes_into_a_new_folder(corpus, tmp_path):
    train_lm.main(lm(corpus, tmp_path / "a", "--updates", "3"))
    train_lm.main(lm(corpus, tmp_path / "b", "--updates", "3", "--resume", str(tmp_path / "a" / "last.pt")))
    assert (tmp_path / "b" / "log.jsonl").read_text() == (tmp_path / "a" / "log.jsonl").read_text()
    assert (tmp_path / "b" / "last.pt").exists()


# ----------------------------------------------------------------------------------------------
# Saves: full disk, intervals


# What a full disk raises: an OSError from a plain write, or (measured on a 1.2 MB tmpfs) a
# RuntimeError from torch's zip writer ("[enforce fail at inline_container.cc] unexpected pos").
FULL_DISK = {"oserror": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
             "zip-writer": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1079040 vs 1078928")}


def full_disk_on(call, error):
    """A torch.save that fails like a full disk on its `call`-th use, after writing part of the file."""
    real, calls = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            f.write(b"partial")
            raise error
        return real(obj, f, *args, **kwargs)
    return save


@needs_fashion_mnist
@pytest.mark.parametrize("kind", list(FULL_DISK))
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(kind, data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(neurotrails.torch, "save", full_disk_on(2, FULL_DISK[kind]))
    with pytest.raises(SystemExit) as e:
        train_vision.main(vision(data_dir, out, "--epochs", "3"))
    assert e.value.code == 1
    line = one_error_line(capsys)
    assert f"could not write {out / 'last.pt'}" in line and "MiB free there" in line
    assert f"the previous {out / 'last.pt'} is intact" in line
    assert load(out / "last.pt")["epoch"] == 1 and not (out / "last.pt.tmp").exists()


@needs_fashion_mnist
def test_a_really_full_disk_keeps_the_previous_checkpoint(data_dir, tmp_path):
    """A 2 MiB tmpfs: the first checkpoint (~1.2 MB) fits, the second's temporary file does not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                                           capture_output=True).returncode:
        pytest.skip("needs root and permission to mount a tmpfs")
    try:
        out = subprocess.run([sys.executable, str(ROOT / "train_vision.py"),
                              *vision(data_dir, disk / "run", "--epochs", "3", "--train-subset", "64")],
                             capture_output=True, text=True, timeout=300, cwd=ROOT)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert "could not write" in lines[0] and "is intact" in lines[0]
        assert load(disk / "run" / "last.pt")["epoch"] == 1 and not (disk / "run" / "last.pt.tmp").exists()
    finally:
        subprocess.run(["umount", str(disk)])


def test_a_full_disk_during_an_lm_save_keeps_the_previous_checkpoint(corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(neurotrails.torch, "save", full_disk_on(3, FULL_DISK["oserror"]))
    with pytest.raises(SystemExit):
        train_lm.main(lm(corpus, out, "--updates", "6", "--save-every", "2"))
    assert "No space left on device" in one_error_line(capsys)
    assert load(out / "last.pt")["update"] == 4 and not (out / "last.pt.tmp").exists()


def test_lm_saves_on_its_own_interval_when_it_is_not_a_multiple_of_the_log_interval(corpus, tmp_path, monkeypatch):
    saved, real = [], neurotrails.save_checkpoint
    monkeypatch.setattr(neurotrails, "save_checkpoint",
                        lambda path, script, state: saved.append(state["update"]) or real(path, script, state))
    train_lm.main(lm(corpus, tmp_path, "--updates", "11", "--save-every", "5", "--log-every", "3"))
    assert saved == [5, 10, 11]
    assert [json.loads(x)["update"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [3, 6, 9, 11]


# ----------------------------------------------------------------------------------------------
# Divergence: nothing non-finite is saved; the advice can be followed


def assert_finite_or_absent(line, out):
    if "the last finite checkpoint is" in line:
        named = Path(line.split("the last finite checkpoint is ")[1].split(":")[0])
        assert named.exists() and neurotrails.nonfinite_tensor(load(named)) is None
    else:
        assert "no checkpoint was saved" in line and not (out / "last.pt").exists()


@needs_fashion_mnist
def test_a_diverged_vision_run_saves_nothing_non_finite(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:  # lr 1e3: the loss stays finite for a step, BatchNorm does not
        train_vision.main(vision(data_dir, out, "--epochs", "2", "--lr", "1e3"))
    assert e.value.code == 1
    line = one_error_line(capsys)
    assert "NaN or inf" in line or "loss is" in line
    assert_finite_or_absent(line, out)


def test_a_diverged_lm_run_saves_nothing_non_finite(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        train_lm.main(lm(corpus, out, "--updates", "8", "--lr", "1e30", "--warmup", "0", "--save-every", "1"))
    line = one_error_line(capsys)
    assert "NaN or inf" in line or "loss is" in line
    assert_finite_or_absent(line, out)


@needs_fashion_mnist
def test_a_divergence_names_a_checkpoint_that_resumes_with_a_lower_lr(data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real, calls = train_vision.test_metrics, [0]

    def stop_in_epoch_2(*args):  # the run dies after its epoch-1 checkpoint
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(train_vision, "test_metrics", stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_vision.main(vision(data_dir, out, "--epochs", "3"))
    monkeypatch.setattr(train_vision, "test_metrics", real)
    ckpt = out / "last.pt"
    with pytest.raises(SystemExit):  # blows up within epoch 2 (a finite but wrecked epoch 2 would be saved)
        train_vision.main(vision(data_dir, out, "--epochs", "3", "--lr", "1e8", "--resume", str(ckpt)))
    line = one_error_line(capsys)
    assert f"the last finite checkpoint is {ckpt}: --resume it with a lower --lr" in line, line
    assert_finite_or_absent(line, out)
    good = load(ckpt)
    train_vision.main(vision(data_dir, out, "--epochs", "3", "--lr", "0.01", "--momentum", "0.5", "--resume", str(ckpt)))
    config = json.loads((out / "config.json").read_text())
    assert config["lr"] == 0.01
    assert config["resumed"][-1]["changed"] == {"lr": [good["config"]["lr"], 0.01], "momentum": [0.9, 0.5]}
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[good["epoch"]]["resumed_with"]["lr"][1] == 0.01
    state = load(ckpt)
    assert state["epoch"] == 3 and all(g["momentum"] == 0.5 for g in state["optimizer"]["param_groups"])


def test_an_lm_divergence_names_a_checkpoint_that_resumes_with_a_lower_lr(corpus, tmp_path, capsys):
    out, ckpt = tmp_path / "run", tmp_path / "run" / "last.pt"
    train_lm.main(lm(corpus, out, "--updates", "6", "--stop-after", "3"))
    with pytest.raises(SystemExit):
        train_lm.main(lm(corpus, out, "--updates", "6", "--lr", "1e30", "--resume", str(ckpt)))
    assert f"the last finite checkpoint is {ckpt}" in one_error_line(capsys)
    train_lm.main(lm(corpus, out, "--updates", "6", "--lr", "1e-3", "--weight-decay", "0.01", "--resume", str(ckpt)))
    config = json.loads((out / "config.json").read_text())
    assert config["resumed"][-1]["changed"] == {"lr": [1.5e-3, 1e-3], "weight_decay": [0.0, 0.01]}
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == [1, 2, 3, 4, 5, 6] and "resumed_with" in rows[3]
    assert all(g["weight_decay"] == 0.01 for g in load(ckpt)["optimizer"]["param_groups"])


# ----------------------------------------------------------------------------------------------
# Exact resume: the whole checkpoint


def test_an_lm_resume_reproduces_the_whole_checkpoint_rng_included(corpus, tmp_path):
    args = ["--updates", "7", "--save-every", "3"]
    train_lm.main(lm(corpus, tmp_path / "whole", *args))
    train_lm.main(lm(corpus, tmp_path / "split", *args, "--stop-after", "4"))
    train_lm.main(lm(corpus, tmp_path / "split", *args, "--resume", str(tmp_path / "split" / "last.pt")))
    assert_same_checkpoint(load(tmp_path / "whole" / "last.pt"), load(tmp_path / "split" / "last.pt"))


@needs_fashion_mnist
def test_a_sigkilled_vision_run_resumes_to_the_whole_checkpoint(data_dir, tmp_path):
    args = vision(data_dir, tmp_path / "b", "--epochs", "4", "--grow", "set")
    train_vision.main(vision(data_dir, tmp_path / "a", "--epochs", "4", "--grow", "set"))
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_vision.py"), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (tmp_path / "b" / "last.pt").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 1 <= load(tmp_path / "b" / "last.pt")["epoch"] < 4, "the run was not interrupted mid-way"
    train_vision.main(args + ["--resume", str(tmp_path / "b" / "last.pt")])  # the lock died with the process
    assert_same_checkpoint(load(tmp_path / "a" / "last.pt"), load(tmp_path / "b" / "last.pt"))


# ----------------------------------------------------------------------------------------------
# What must never run or be written


def test_a_tokenizer_folder_with_custom_code_is_refused_without_running_it(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    (folder / "evil.py").write_text("import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('ran')\n"
                                    "from transformers import PreTrainedTokenizer\n"
                                    "class EvilTokenizer(PreTrainedTokenizer):\n    pass\n")
    out = subprocess.run([sys.executable, "-c", f"import models; models.load_tokenizer({str(folder)!r})"],
                         cwd=ROOT, capture_output=True, text=True, input="y\n", timeout=120)
    assert out.returncode != 0 and "not a tokenizer file or folder" in out.stderr and "custom code" in out.stderr
    assert not (folder / "RAN").exists()


@needs_fashion_mnist
def test_evaluate_never_writes_where_the_checkpoint_points(tmp_path):
    fresh = tmp_path / "fresh"  # data unpacked by the training run itself
    train_vision.main(vision(fresh, tmp_path / "run", "--epochs", "1"))
    state = load(tmp_path / "run" / "last.pt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    state["config"]["data_dir"] = str(elsewhere)  # e.g. a checkpoint from another machine
    neurotrails.save_checkpoint(tmp_path / "moved.pt", "train_vision.py", state)
    evaluate_py = [sys.executable, str(ROOT / "train_vision.py"), "--eval-only", "--checkpoint", str(tmp_path / "moved.pt"),
                   "--json"]
    out = subprocess.run(evaluate_py, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 1 and "could not be loaded" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert list(elsewhere.iterdir()) == []
    out = subprocess.run(evaluate_py + ["--data-dir", str(fresh)], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0 and 0 <= json.loads(out.stdout.splitlines()[-1])["acc"] <= 1


# ----------------------------------------------------------------------------------------------
# Kills at random moments (slow): no unloadable checkpoint, and the same finish


def kill_loop(command, out, kills, start, spread, seed=0):
    """Run `command` (with --resume OUT/last.pt once there is one) and SIGKILL it `kills` times at
    random moments; every checkpoint left behind must load. Then let it finish. Returns the
    progress (epoch or update of last.pt) after each kill and the number of unloadable files."""
    rng, unloadable, progress = random.Random(seed), 0, []
    for _ in range(kills):
        resume = ["--resume", str(out / "last.pt")] if (out / "last.pt").exists() else ["--overwrite"]
        saved = (out / "last.pt").stat().st_mtime_ns if (out / "last.pt").exists() else 0
        proc = subprocess.Popen(command + resume, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Random moments of training, whatever the machine's load: wait for this process's first
        # save (imports and data loading take seconds), then kill after a random further delay.
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and (
                not (out / "last.pt").exists() or (out / "last.pt").stat().st_mtime_ns == saved):
            time.sleep(0.01)
        time.sleep(start + rng.random() * spread)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (out / "last.pt").exists():
            try:
                state = neurotrails.load_checkpoint(out / "last.pt")
                progress.append(state.get("epoch", state.get("update")))
            except ValueError:
                unloadable += 1
    resume = ["--resume", str(out / "last.pt")] if (out / "last.pt").exists() else ["--overwrite"]
    subprocess.run(command + resume, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"progress after each kill: {progress}; unloadable: {unloadable}")
    return progress, unloadable


@pytest.mark.slow
@needs_fashion_mnist
def test_twenty_random_sigkills_of_a_vision_run_lose_nothing(data_dir, tmp_path):
    # 300 tiny epochs (~0.15 s each here) outlast 20 kills at 0-2 s after each process's first save
    small = ["--epochs", "300", "--train-subset", "64", "--test-subset", "32"]
    train_vision.main(vision(data_dir, tmp_path / "a", *small))
    progress, unloadable = kill_loop([sys.executable, str(ROOT / "train_vision.py"),
                                      *vision(data_dir, tmp_path / "b", *small)], tmp_path / "b", 20, 0.0, 2.0)
    assert unloadable == 0 and len(set(progress)) >= 10, progress  # the kills landed all along the run
    assert_same_checkpoint(load(tmp_path / "a" / "last.pt"), load(tmp_path / "b" / "last.pt"))


@pytest.mark.slow
def test_twenty_random_sigkills_of_an_lm_run_lose_nothing(corpus, tmp_path):
    # A checkpoint after every update: kills 0-2 s after a process's first save land in saves too
    many = ["--updates", "400", "--save-every", "1", "--log-every", "1"]
    train_lm.main(lm(corpus, tmp_path / "a", *many))
    progress, unloadable = kill_loop([sys.executable, str(ROOT / "train_lm.py"), *lm(corpus, tmp_path / "b", *many)],
                                     tmp_path / "b", 20, 0.0, 2.0)
    assert unloadable == 0 and len(set(progress)) >= 10, progress  # the kills landed all along the run
    assert_same_checkpoint(load(tmp_path / "a" / "last.pt"), load(tmp_path / "b" / "last.pt"))


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints: a checksum of the state is verified on every load; NaN weights are refused


def damage_checkpoint(source, target, how):
    """A copy of `source` with 4 KiB zeroed or 32 bytes flipped in its tensor data, cut in half, or
    a NaN weight saved with a matching checksum (as a buggy tool or a hand edit would leave it)."""
    blob = bytearray(source.read_bytes())
    middle = len(blob) // 2
    if how == "zeroed":
        blob[middle:middle + 4096] = bytes(4096)
    elif how == "flipped":
        for i in range(32):
            blob[middle + 97 * i] ^= 0xFF
    elif how == "truncated":
        blob = blob[:middle]
    else:
        state = load(source)
        name = next(k for k, v in state["model"].items() if v.is_floating_point() and v.dim() >= 2)
        state["model"][name].view(-1)[0] = float("nan")
        state.pop("checksum")
        state["checksum"] = neurotrails.state_checksum(state)
        torch.save(state, target)
        return
    target.write_bytes(bytes(blob))


@needs_fashion_mnist
@pytest.mark.parametrize("how", ["zeroed", "flipped", "truncated", "nan"])
def test_damaged_checkpoints_are_refused_for_resume_evaluation_and_export(how, data_dir, tmp_path, capsys):
    import export_bench
    train_vision.main(vision(data_dir, tmp_path / "run", "--epochs", "1"))
    bad = tmp_path / "bad" / "last.pt"
    bad.parent.mkdir()
    damage_checkpoint(tmp_path / "run" / "last.pt", bad, how)
    before = bad.read_bytes()
    capsys.readouterr()
    expected = "holds NaN or inf" if how == "nan" else "corrupted"
    for main, argv in ((train_vision.main, vision(data_dir, tmp_path / "bad", "--epochs", "2", "--resume", str(bad))),
                       (train_vision.main, ["--eval-only", "--checkpoint", str(bad)]),
                       (export_bench.main, ["export", "--checkpoint", str(bad), "--out", str(tmp_path / "m.onnx")])):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 1 and len(err.splitlines()) == 1 and expected in err and str(bad) in err, err
    assert bad.read_bytes() == before and not (tmp_path / "m.onnx").exists()  # nothing written over it


@pytest.mark.parametrize("content,message", [
    ({"modle": "wrn10-2"}, "unknown key 'modle'"),
    ({"config": {"learning_rate": 0.1}}, "unknown key 'learning_rate'"),
    ([1, 2], "holds a JSON list, not an object of settings"),
    ("wrn10-2", "holds a JSON str, not an object of settings"),
    ({"lr": -1}, "argument --lr: must be a finite number > 0, got -1"),
])
def test_config_files_with_unknown_keys_or_bad_values_are_refused_naming_the_file(content, message, tmp_path,
                                                                                    capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(content))
    with pytest.raises(SystemExit) as exit_:
        train_vision.parse_args(["--config", str(path), "--dataset", "fashion-mnist"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"--config {path}" in err and message in err, err


@needs_fashion_mnist
def test_overwrite_keeps_the_old_run_until_the_new_one_has_its_first_checkpoint(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train_vision.main(vision(data_dir, out, "--epochs", "1"))
    assert not (out / ".lock").exists()  # a clean exit leaves no lock file
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit):  # diverges in its first epoch, before any checkpoint
        train_vision.main(vision(data_dir, out, "--epochs", "1", "--lr", "1e30", "--overwrite"))
    assert "no checkpoint was saved" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"} == before  # the old run, whole
    # a fresh folder whose run stopped before its first checkpoint: the same command may start there again
    fresh = tmp_path / "fresh"
    with pytest.raises(SystemExit):
        train_vision.main(vision(data_dir, fresh, "--epochs", "1", "--lr", "1e30"))
    assert "--resume" not in capsys.readouterr().err and not (fresh / "last.pt").exists()
    train_vision.main(vision(data_dir, fresh, "--epochs", "1"))
    assert (fresh / "results.json").exists()
    # and --overwrite of a finished run replaces it once the new run has saved
    train_vision.main(vision(data_dir, out, "--epochs", "1", "--seed", "3", "--overwrite"))
    assert json.loads((out / "results.json").read_text())["config"]["seed"] == 3 and not (out / ".replaced").exists()


@needs_fashion_mnist
@pytest.mark.parametrize("key", ["dataset", "aggregate", "num_heads"])
def test_a_checkpoint_whose_config_lacks_a_key_is_refused_in_one_line(key, data_dir, tmp_path, capsys):
    train_vision.main(vision(data_dir, tmp_path / "run", "--epochs", "1"))
    state = load(tmp_path / "run" / "last.pt")
    del state["config"][key]
    neurotrails.save_checkpoint(tmp_path / "bad.pt", "train_vision.py", state)  # a valid checksum over it
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train_vision.main(["--eval-only", "--checkpoint", str(tmp_path / "bad.pt")])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"its config lacks {key}" in err, err


def test_the_commit_is_recorded_in_a_clone_a_worktree_and_after_gc(tmp_path):
    """Provenance: results.json names the commit whether the code runs from a clone (loose or packed
    refs), a detached worktree (the study runs from one) or a worktree on a branch."""
    a, b = "a" * 40, "b" * 40
    clone = tmp_path / "clone"
    (clone / ".git/refs/heads").mkdir(parents=True)
    (clone / ".git/HEAD").write_text("ref: refs/heads/main\n")
    (clone / ".git/refs/heads/main").write_text(a + "\n")
    assert neurotrails.git_commit(clone) == a
    (clone / ".git/refs/heads/main").unlink()
    (clone / ".git/packed-refs").write_text(f"# pack-refs\n{b} refs/heads/other\n{a} refs/heads/main\n")
    assert neurotrails.git_commit(clone) == a
    tree = tmp_path / "tree"
    private = clone / ".git/worktrees/tree"
    private.mkdir(parents=True)
    tree.mkdir()
    (tree / ".git").write_text(f"gitdir: {private}\n")
    (private / "commondir").write_text("../..\n")
    (private / "HEAD").write_text(b + "\n")
    assert neurotrails.git_commit(tree) == b
    (private / "HEAD").write_text("ref: refs/heads/main\n")
    assert neurotrails.git_commit(tree) == a
    assert neurotrails.git_commit(tmp_path / "nowhere") is None
