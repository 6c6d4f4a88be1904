"""train_vision.py on real offline data (Fashion-MNIST from the Debian package dataset-fashion-mnist):
every method runs, logs and checkpoints; a SIGKILLed run resumes to bitwise-equal weights; bad
input gets one clear line and a non-zero exit with earlier checkpoints untouched."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import evaluate
import neurotrails
import train_vision

ROOT = Path(__file__).resolve().parents[1]
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not DEBIAN.is_dir(), reason="needs the Debian package dataset-fashion-mnist "
                                "(apt-get install dataset-fashion-mnist; .ci/run installs it)")
TINY = ["--dataset", "fashion-mnist", "--model", "wrn10-1", "--train-subset", "256", "--test-subset", "128",
        "--batch-size", "32", "--delta-t", "3", "--num-heads", "2", "--blocks-in-head", "2",
        "--budget", "equal"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    train_vision.load_data("fashion-mnist", d)  # unpack once for every test here
    return d


@pytest.fixture(scope="module")
def checkpoint(data_dir, tmp_path_factory):
    """One finished tiny run's last.pt, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("run")
    train_vision.main(TINY + ["--data-dir", str(data_dir), "--epochs", "1", "--out", str(out)])
    return out / "last.pt"


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "train_vision.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_fashion_mnist_is_the_real_dataset(data_dir):
    train, test = train_vision.load_data("fashion-mnist", data_dir)
    assert train["x"].shape == (60000, 1, 28, 28) and test["x"].shape == (10000, 1, 28, 28)
    assert train["x"].dtype == torch.uint8
    assert torch.bincount(train["y"]).tolist() == [6000] * 10


@pytest.mark.parametrize("method", ["single", "treenet", "ensemble", "neurotrails", "static", "pruning"])
def test_every_method_trains_logs_and_checkpoints(method, data_dir, tmp_path):
    train_vision.main(TINY + ["--data-dir", str(data_dir), "--method", method, "--epochs", "2",
                              "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_loss", "lr", "acc", "nll", "ece", "pd_any", "pd_pairwise", "head_acc", "density",
                "epoch_time_s"):
        assert key in rows[-1]
    heads = 1 if method == "single" else 2
    assert len(rows[-1]["head_acc"]) == heads
    results = json.loads((tmp_path / "results.json").read_text())
    numbers = [v for v in [*rows[-1].values(), *rows[-1]["head_acc"], *results["metrics"].values()]
               if isinstance(v, float)]
    assert numbers and all(float(f"{v:.7g}") == v for v in numbers)  # no 0.10000000149011612
    assert results["command"] and results["finished"].endswith("Z")
    ckpt = load(tmp_path / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["config"]["method"] == method
    density = rows[-1]["density"]
    overall = sum(density.values()) / len(density)
    if method in ("single", "treenet", "ensemble"):
        assert set(density.values()) == {1.0} and ckpt["masks"] is None
    else:  # sparse at the end; pruning became sparse half-way
        assert ckpt["masks"] is not None and overall < 0.5
    if method == "ensemble":
        assert set(density) == {"head0", "head1"}


def test_sigkilled_run_resumes_to_bitwise_equal_weights(data_dir, tmp_path):
    args = TINY + ["--data-dir", str(data_dir), "--epochs", "4", "--grow", "set"]
    train_vision.main(args + ["--out", str(tmp_path / "a")])
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_vision.py"), *args, "--out", str(tmp_path / "b")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "b" / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 1 and (tmp_path / "b" / "last.pt").exists():
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted_at = load(tmp_path / "b" / "last.pt")["epoch"]
    assert 1 <= interrupted_at < 4, "the run was not interrupted mid-way"
    train_vision.main(args + ["--out", str(tmp_path / "b"), "--resume", str(tmp_path / "b" / "last.pt")])
    a, b = load(tmp_path / "a" / "last.pt"), load(tmp_path / "b" / "last.pt")
    assert a["epoch"] == b["epoch"] == 4 and a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["masks"]["masks"]:
        assert torch.equal(a["masks"]["masks"][k], b["masks"]["masks"][k])
    log_a = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["acc"] for r in log_a] == [r["acc"] for r in log_b]


def test_resume_of_a_different_configuration_is_refused_and_leaves_the_checkpoint(data_dir, tmp_path):
    train_vision.main(TINY + ["--data-dir", str(data_dir), "--epochs", "1", "--out", str(tmp_path)])
    before = (tmp_path / "last.pt").read_bytes()
    out = cli(*TINY, "--data-dir", str(data_dir), "--epochs", "1", "--sparsity", "0.5", "--out", str(tmp_path),
              "--resume", str(tmp_path / "last.pt"))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert "different configuration (sparsity: checkpoint 0.8 vs now 0.5)" in out.stderr
    assert (tmp_path / "last.pt").read_bytes() == before


@pytest.mark.parametrize("args,match,code", [
    (["--dataset", "mnist"], "argument --dataset: invalid choice: 'mnist'", 2),
    (["--model", "vgg11"], "--model: unknown model 'vgg11'", 1),
    (["--model", "llama-9m"], "--model llama-9m is a language model; train it with train_lm.py", 1),
    (["--num-heads", "0"], "argument --num-heads: must be an integer in [1, 64], got 0", 2),
    (["--sparsity", "1.0"], "argument --sparsity: must be a finite number in [0, 1), got 1.0", 2),
    (["--sparsity", "-0.2"], "argument --sparsity: must be a finite number in [0, 1), got -0.2", 2),
    (["--blocks-in-head", "0"], "argument --blocks-in-head: must be an integer >= 1, got 0", 2),
    (["--blocks-in-head", "4"], "--blocks-in-head must be in [1, 3] for wrn10-1, got 4", 1),
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0", 2),
    (["--batch-size", "1000"], "--batch-size 1000 is larger than the training set (256)", 1),
    (["--resume", "/nonexistent/last.pt"], "--resume /nonexistent/last.pt: no such checkpoint", 1),
    (["--lr", "1e12"], "no checkpoint was saved; start again with a lower --lr", 1),
])
def test_bad_input_gets_one_clear_line(args, match, code, data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_vision.main(TINY + ["--data-dir", str(data_dir), "--epochs", "1", "--out", str(tmp_path / "run"), *args])
    assert exit_.value.code == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], lines


def test_missing_or_corrupt_data_dir_fails_fast_with_a_hint(tmp_path):
    start = time.time()
    out = cli("--dataset", "cifar100", "--data-dir", str(tmp_path / "empty"), "--epochs", "1",
              "--out", str(tmp_path / "run"))
    assert out.returncode == 1 and time.time() - start < 60
    assert "--data-dir" in out.stderr and "cifar-100-python.tar.gz" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    raw = tmp_path / "bad" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"not an idx file")
    out = cli("--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "bad"), "--epochs", "1",
              "--out", str(tmp_path / "run"))
    assert out.returncode == 1 and "fashion-mnist could not be loaded" in out.stderr
    out = cli("--dataset", "imagenet", "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "run"))
    assert out.returncode == 1 and "expected ImageFolder sub-folders train/ and val/" in out.stderr


def test_lr_step_decay_at_25_50_75_percent():
    cfg = {"lr": 0.1, "epochs": 8}
    assert [train_vision.lr_at(e, cfg) for e in range(8)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001])
    # milestones at int(f x E) as the released code: E = 10 decays at epochs 2, 5, 7 (ceil: 3, 5, 8)
    lrs = [train_vision.lr_at(e, {"lr": 1.0, "epochs": 10}) for e in range(10)]
    assert [e for e in range(1, 10) if lrs[e] < lrs[e - 1]] == [2, 5, 7]


def test_topology_updates_score_the_gradient_before_the_optimizer_step(data_dir, tmp_path, monkeypatch):
    """A foreach SGD (the CUDA default) adds momentum into p.grad in place: the update must come first."""
    import sparsity
    seen, steps = [], [0]
    real_step, real_update = torch.optim.SGD.step, sparsity.Masks.update

    def step(self, *a, **k):
        steps[0] += 1
        return real_step(self, *a, **k)

    def update(self, t, *a, **k):
        seen.append((t, steps[0]))
        return real_update(self, t, *a, **k)
    monkeypatch.setattr(torch.optim.SGD, "step", step)
    monkeypatch.setattr(sparsity.Masks, "update", update)
    train_vision.main(TINY + ["--data-dir", str(data_dir), "--epochs", "1", "--out", str(tmp_path)])
    assert seen and all(done == t - 1 for t, done in seen), seen  # steps 1..t-1 done, step t not yet


def test_head_lr_scale_gives_the_heads_their_own_learning_rate(data_dir, tmp_path):
    train_vision.main(TINY + ["--data-dir", str(data_dir), "--epochs", "1", "--head-lr-scale", "2",
                              "--out", str(tmp_path)])
    state = load(tmp_path / "last.pt")
    groups = state["optimizer"]["param_groups"]
    assert [g["lr_scale"] for g in groups] == [1.0, 2.0] and groups[1]["lr"] == pytest.approx(2 * groups[0]["lr"])
    assert state["config"]["head_lr_scale"] == 2.0
    net = neurotrails.model_from_checkpoint(state)
    assert len(groups[1]["params"]) == len(list(net.heads.parameters()))  # every head parameter, nothing else
    assert len(groups[0]["params"]) == len(list(net.backbone.parameters()))


def test_augmentation_is_a_crop_and_flip_of_the_input():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).view(2, 1, 6, 6)
    out = train_vision.augment(x, train_vision.crop_flip_draws(2, g, pad=0), pad=0)  # every crop is the image
    for i in range(2):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(2))
    big = train_vision.augment(torch.full((64, 1, 8, 8), 7, dtype=torch.uint8), train_vision.crop_flip_draws(64, g))
    assert big.shape == (64, 1, 8, 8) and (big == 0).any() and (big == 7).any()  # padding shows up


def test_vectorised_augmentation_equals_the_per_image_crop_and_flip_it_draws():
    x = torch.randint(0, 256, (32, 3, 10, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = train_vision.augment(x, train_vision.crop_flip_draws(32, torch.Generator().manual_seed(5)))
    g = torch.Generator().manual_seed(5)  # the same draws, applied one image at a time
    dx, dy = torch.randint(0, 9, (2, 32), generator=g).tolist()
    flip = torch.rand(32, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(32):
        crop = padded[i, :, dy[i]:dy[i] + 10, dx[i]:dx[i] + 10]
        assert torch.equal(out[i], crop.flip(2) if flip[i] else crop)


def test_batches_drawn_per_epoch_are_the_batches_drawn_step_by_step():
    # The crops and flips of an epoch are drawn before its first batch; the generator's stream is
    # the one a batch-by-batch draw gives, so a run resumes into the batches it would have seen.
    g = torch.Generator().manual_seed(3)
    data = {"x": torch.randint(0, 256, (50, 1, 6, 6), dtype=torch.uint8, generator=g),
            "y": torch.randint(0, 10, (50,), generator=g)}
    got = list(train_vision.train_batches(data, 16, seed=4, epoch=2, member=1, dataset="fashion-mnist", device="cpu"))
    order, g = train_vision.epoch_order(50, 4, 2, 1)
    assert len(got) == 3  # 50 // 16; the partial batch is dropped
    for i, (x, y) in enumerate(got):
        idx = order[16 * i:16 * (i + 1)]
        crop = train_vision.augment(data["x"][idx], train_vision.crop_flip_draws(16, g))
        assert torch.equal(x, train_vision.normalize(crop, "fashion-mnist")) and torch.equal(y, data["y"][idx])


class HostTraffic(TorchDispatchMode):
    """Records every op that reads a host tensor into a device tensor: on a GPU, a copy from the
    host waits for the device; reading a value back (.item()) raises on the meta device."""

    def __init__(self):
        super().__init__()
        self.crossings = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        host = any(t.device.type == "cpu" and t.dim() > 0 for t in inputs)  # a 0-dim one is a scalar argument
        if host and any(t.device.type != "cpu" for t in inputs + outputs):
            self.crossings.append(str(func))
        return out


def test_a_device_epoch_moves_nothing_from_the_host_per_step():
    # The GPU leg's promise, checked on the meta device (tensors without data): after the epoch's
    # one copy of its order and draws, no step copies from the host or reads a value back.
    data = {"x": torch.zeros(64, 3, 8, 8, dtype=torch.uint8, device="meta"),
            "y": torch.zeros(64, dtype=torch.long, device="meta")}
    batches = train_vision.train_batches(data, 16, 0, 0, 0, "cifar100", "meta")
    x, y = next(batches)  # the epoch's copies happen here, before its first batch
    with HostTraffic() as seen:
        rest = list(batches)
    assert len(rest) == 3 and x.shape == (16, 3, 8, 8) and x.dtype == torch.float32 and x.device.type == "meta"
    assert seen.crossings == []
    with HostTraffic() as seen:  # the check sees a per-step copy where there is one
        data["x"][torch.arange(4)]
    assert seen.crossings == ["aten.index.Tensor"]


def test_evaluate_checkpoint_reproduces_the_logged_metrics_and_plots(data_dir, tmp_path):
    train_vision.main(TINY + ["--data-dir", str(data_dir), "--epochs", "1", "--out", str(tmp_path)])
    last = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    out = subprocess.run([sys.executable, str(ROOT / "train_vision.py"), "--eval-only", "--checkpoint",
                          str(tmp_path / "last.pt"), "--json", "--plot", str(tmp_path / "rel.png"), "--heads-grid",
                          str(tmp_path / "grid.png"), "--grid-with", str(tmp_path / "last.pt")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    history = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "history", str(tmp_path / "log.jsonl"),
                              "--plot", str(tmp_path / "hist.png")], capture_output=True, text=True,
                             timeout=300, cwd=ROOT)
    assert history.returncode == 0, history.stderr
    got = json.loads(out.stdout.splitlines()[-1])
    for key in ("acc", "nll", "ece", "pd_any", "pd_pairwise", "head_acc"):
        assert got[key] == pytest.approx(last[key], abs=1e-6), key
    for png in ("rel.png", "hist.png", "grid.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([sys.executable, str(ROOT / "train_vision.py"), "--eval-only", "--checkpoint",
                          str(tmp_path / "nope.pt")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bad.returncode == 1 and "no such checkpoint" in bad.stderr


def test_image_folder_datasets_train_through_the_dataloader(tmp_path):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 8), ("val", 4)):
        for cls in ("n01", "n02"):
            folder = tmp_path / "tiny" / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (64, 64, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    out = tmp_path / "run"
    train_vision.main(["--dataset", "tinyimagenet", "--data-dir", str(tmp_path / "tiny"), "--model", "wrn10-1",
                       "--num-heads", "2", "--batch-size", "4", "--epochs", "2", "--budget", "equal", "--out", str(out)])
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["step"] == 2 * (16 // 4)
    assert load(out / "last.pt")["config"]["blocks_in_head"] == 2


def test_evaluate_corruptions_and_an_image_folder(data_dir, tmp_path):
    from PIL import Image
    train_vision.main(TINY + ["--data-dir", str(data_dir), "--epochs", "1", "--out", str(tmp_path)])
    out = subprocess.run([sys.executable, str(ROOT / "train_vision.py"), "--eval-only", "--checkpoint",
                          str(tmp_path / "last.pt"), "--corruptions", "gaussian_noise,contrast", "--json"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[-1])
    assert sorted(got["corruptions"]) == sorted(f"{n}/{s}" for n in ("gaussian_noise", "contrast")
                                                for s in range(1, 6))
    assert len(got["corruption_acc_by_severity"]) == 5
    for cls in ("a", "b"):  # a flat ImageFolder of RGB images, e.g. a sketch-style test set
        (tmp_path / "sketch" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), (40 * i, 100, 200)).save(tmp_path / "sketch" / cls / f"{i}.png")
    out = subprocess.run([sys.executable, str(ROOT / "train_vision.py"), "--eval-only", "--checkpoint",
                          str(tmp_path / "last.pt"), "--image-folder", str(tmp_path / "sketch"), "--json"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert 0.0 <= json.loads(out.stdout.splitlines()[-1])["acc"] <= 1.0
    bad = subprocess.run([sys.executable, str(ROOT / "train_vision.py"), "--eval-only", "--checkpoint",
                          str(tmp_path / "last.pt"), "--corruptions", "frost"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bad.returncode == 1 and "unknown corruption" in bad.stderr


def test_corruptions_dir_reads_the_published_layout_and_matches_the_generated_table(data_dir, tmp_path):
    import numpy as np
    _, test = train_vision.load_data("fashion-mnist", data_dir, test_subset=40)
    folder, names = tmp_path / "FashionMNIST-C", ["contrast", "gaussian_noise"]
    folder.mkdir()
    for name in names:  # the CIFAR-100-C layout: (5 N, H, W[, C]) uint8, severity 1 to 5 stacked
        stacked = torch.cat([train_vision.corrupt(test["x"], name, s, torch.Generator().manual_seed(0)) for s in range(1, 6)])
        np.save(folder / f"{name}.npy", stacked[:, 0].numpy())
    np.save(folder / "labels.npy", test["y"].repeat(5).numpy())
    torch.manual_seed(0)
    net = neurotrails.build("wrn10-1", 2, 2, num_classes=10, in_channels=1).eval()
    norm = lambda x: train_vision.normalize(x, "fashion-mnist")
    assert train_vision.corruption_files(folder) == names[::-1]  # in the benchmark's order
    files = train_vision.corruption_table_from_files(net, folder, norm, batch_size=16)
    generated = train_vision.corruption_table(net, test, norm, names[::-1], batch_size=16, seed=0)
    assert files.keys() == generated.keys()
    for key in files:
        for metric in ("acc", "nll", "ece"):
            assert files[key][metric] == pytest.approx(generated[key][metric], abs=1e-6), (key, metric)
    np.save(folder / "fog.npy", np.zeros((7, 28, 28), np.uint8))  # not 5 x the test set
    with pytest.raises(ValueError, match="fog.npy has shape"):
        train_vision.corruption_files(folder)


@pytest.mark.parametrize("case,message", [
    ("garbage", "fog.npy is not a plain numpy array"),
    ("pickled", "fog.npy is not a plain numpy array"),
    ("channels", "fog.npy holds 3 x 28 x 28 images (C x H x W); the model takes 1 x 28 x 28"),
    ("size", "fog.npy holds 1 x 32 x 32 images (C x H x W); the model takes 1 x 28 x 28"),
    ("float", "fog.npy holds float32, expected uint8 pixels 0-255 as published"),
    ("labels", "labels.npy has labels outside [0, 10) for a 10-class model"),
    ("empty", "labels.npy must hold integer labels, 5 severities x the test set"),
])
def test_corruption_files_that_cannot_fit_the_model_are_refused_before_any_evaluation(case, message, checkpoint,
                                                                                        tmp_path, capsys,
                                                                                        monkeypatch):
    import numpy as np
    folder = tmp_path / "C"
    folder.mkdir()
    n = 0 if case == "empty" else 10
    np.save(folder / "labels.npy", np.full(n, 12 if case == "labels" else 3, np.int64))
    images = {"channels": np.zeros((n, 28, 28, 3), np.uint8), "size": np.zeros((n, 32, 32), np.uint8),
              "float": np.zeros((n, 28, 28), np.float32), "pickled": np.array([object()] * n, dtype=object)}
    if case == "garbage":
        (folder / "fog.npy").write_bytes(b"not numpy at all")
    else:
        np.save(folder / "fog.npy", images.get(case, np.zeros((n, 28, 28), np.uint8)), allow_pickle=True)
    evaluated = []
    monkeypatch.setattr(evaluate, "predict", lambda *a, **k: evaluated.append(1))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        train_vision.main(["--eval-only", "--checkpoint", str(checkpoint), "--corruptions-dir", str(folder)])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 1 and len(err.splitlines()) == 1 and message in err, err
    assert evaluated == []


def test_figure_paths_are_checked_before_the_evaluation(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "predict", lambda *a, **k: pytest.fail("evaluated before the check"))
    for flag, path, message in (("--plot", "r.xyz", "name a figure file ending in .png"),
                                ("--heads-grid", "grid.txt", "name a figure file ending in .png"),
                                ("--plot", "/proc/nope/r.png", "cannot write there")):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            train_vision.main(["--eval-only", "--checkpoint", str(checkpoint), flag,
                               str(tmp_path / path) if not path.startswith("/") else path])
        assert message in capsys.readouterr().err


# Corrupted test sets (Sec. 4.1, Fig. 2): the generator against the benchmark's definitions

def _images():
    """Textured 32 x 32 images: uniform noise, mildly smoothed, in the middle of the value range."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 32, 32, generator=g)
    x = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    return (40 + 170 * x).round().to(torch.uint8)


@pytest.mark.parametrize("name", list(train_vision.CORRUPTIONS))
def test_corruptions_keep_shape_grow_with_severity_and_are_seeded(name):
    x = _images()
    diffs = []
    for severity in range(1, 6):
        out = train_vision.corrupt(x, name, severity, torch.Generator().manual_seed(3))
        assert out.shape == x.shape and out.dtype == torch.uint8
        again = train_vision.corrupt(x, name, severity, torch.Generator().manual_seed(3))
        assert torch.equal(out, again)
        diffs.append((out.float() - x.float()).abs().mean().item())
    assert diffs[0] > 0
    # Not monotone in pixel change, as in CIFAR-C: pixelate (block sizes like 32/24 alias, as PIL's
    # box resize does), glass blur (shuffling saturates on textured images; severity 4 has less blur
    # than 3 but two passes), saturate (severities 1-2 desaturate, 3-5 saturate).
    if name not in ("pixelate", "glass_blur", "saturate"):
        assert all(b >= a * 0.97 for a, b in zip(diffs, diffs[1:])), diffs  # stronger with severity
    assert diffs[-1] > diffs[0]
    if name not in train_vision.COLOUR_ONLY:  # and on one-channel (Fashion-MNIST) images
        grey = x[:, :1, :28, :28]
        assert train_vision.corrupt(grey, name, 3, torch.Generator()).shape == grey.shape


def test_saturate_is_hsv_saturation_times_a_plus_b_and_refuses_grey_images():
    import colorsys
    pixels = [(0, 0, 0), (200, 100, 50), (10, 10, 10), (255, 0, 128), (30, 60, 90), (120, 121, 119)]
    x = torch.tensor(pixels, dtype=torch.uint8).T.reshape(1, 3, 1, len(pixels))
    for severity, (a, b) in enumerate(train_vision.CORRUPTIONS["saturate"], 1):
        out = train_vision.corrupt(x, "saturate", severity, torch.Generator())
        for i, p in enumerate(pixels):
            h, s, v = colorsys.rgb_to_hsv(*(q / 255 for q in p))
            want = [round(255 * q) for q in colorsys.hsv_to_rgb(h, min(max(s * a + b, 0.0), 1.0), v)]
            assert out[0, :, 0, i].tolist() == pytest.approx(want, abs=1), (severity, p)
    with pytest.raises(ValueError, match="changes colour"):
        train_vision.corrupt(x[:, :1], "saturate", 1, torch.Generator())


def test_blurs_and_zoom_match_scipy_ndimage():
    ndimage = pytest.importorskip("scipy.ndimage")
    import numpy as np
    x = _images()[:4].double() / 255
    for sigma in (0.05, 0.4, 1.0):  # skimage.filters.gaussian = ndimage.gaussian_filter, truncate 4, 'nearest'
        want = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", truncate=4.0)
        assert np.abs(train_vision._gaussian(x, sigma).numpy() - want).max() < 1e-12
    for radius, alias in train_vision.CORRUPTIONS["defocus_blur"]:  # OpenCV's filter2D: edges reflected (101)
        k = train_vision._disk(radius, alias)
        assert k.shape == (17, 17) and abs(k.sum().item() - 1) < 1e-12 \
            and (k - k.T).abs().max() < 1e-15  # symmetric up to the conv's float64 summation order
        r = np.arange(-8, 9)
        disk = ((r[:, None] ** 2 + r[None, :] ** 2) <= radius ** 2).astype(float)
        g = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * alias ** 2))
        want_k = ndimage.correlate(disk / disk.sum(), np.outer(g, g) / g.sum() ** 2, mode="mirror")
        assert np.abs(k.numpy() - want_k).max() < 1e-12
        want = np.stack([[ndimage.correlate(ch, want_k, mode="mirror") for ch in img] for img in x.numpy()])
        got = train_vision.corrupt(_images()[:4], "defocus_blur", train_vision.CORRUPTIONS["defocus_blur"].index(
            (radius, alias)) + 1, torch.Generator())
        assert (got.double() - torch.from_numpy(np.clip(want, 0, 1) * 255).round()).abs().max() <= 1
    for zoom in (1.0, 1.06, 1.13, 1.26):  # scipy's order-1 zoom of the centre crop, trimmed to 32 x 32
        ch = int(np.ceil(32 / zoom))
        top = (32 - ch) // 2
        z = ndimage.zoom(x.numpy()[..., top:top + ch, top:top + ch], (1, 1, zoom, zoom), order=1)
        trim = (z.shape[-1] - 32) // 2
        want = z[..., trim:trim + 32, trim:trim + 32]
        assert np.abs(train_vision._clipped_zoom(x, zoom).numpy() - want).max() < 1e-9, zoom


def test_glass_blur_shuffle_only_moves_pixels_and_plasma_is_a_smooth_unit_map():
    x = _images()[:3].double()
    out = train_vision._glass_shuffle(x.clone(), 1, 2, torch.Generator().manual_seed(0))
    assert not torch.equal(out, x)
    for a, b in zip(out, x):  # a permutation of each image's pixels (all channels move together)
        assert sorted(a.flatten(1).T.tolist()) == sorted(b.flatten(1).T.tolist())
    assert torch.equal(out[:, :, 0], x[:, :, 0]) and torch.equal(out[:, :, :, 0], x[:, :, :, 0])  # edges stay
    maps = train_vision._plasma(4, 28, 3, torch.Generator().manual_seed(0))
    assert maps.shape == (4, 28, 28) and maps.min() >= 0 and maps.max() <= 1
    full = train_vision._plasma(4, 32, 3, torch.Generator().manual_seed(0))
    assert torch.allclose(full.amin((1, 2)), torch.zeros(4, dtype=full.dtype))
    assert torch.allclose(full.amax((1, 2)), torch.ones(4, dtype=full.dtype))
    assert torch.equal(full[:, :28, :28], maps)  # the 32 x 32 map cropped: same draws
    step = (full[:, 1:] - full[:, :-1]).abs().mean()
    shuffled = full.flatten(1)[:, torch.randperm(32 * 32, generator=torch.Generator().manual_seed(1))].view(4, 32, 32)
    assert step < 0.5 * (shuffled[:, 1:] - shuffled[:, :-1]).abs().mean()  # neighbours are alike: a fractal


def test_brightness_is_hsv_value_plus_c_also_on_black_pixels():
    import colorsys  # the standard library's HSV, an independent reference
    c = train_vision.CORRUPTIONS["brightness"][4]
    pixels = [(0, 0, 0), (200, 100, 50), (10, 10, 10), (255, 0, 128), (30, 60, 90)]
    x = torch.tensor(pixels, dtype=torch.uint8).T.reshape(1, 3, 1, len(pixels))
    out = train_vision.corrupt(x, "brightness", 5, torch.Generator())
    for i, p in enumerate(pixels):
        h, s, v = colorsys.rgb_to_hsv(*(q / 255 for q in p))
        want = [round(255 * q) for q in colorsys.hsv_to_rgb(h, s, min(v + c, 1.0))]
        assert out[0, :, 0, i].tolist() == pytest.approx(want, abs=1), p
    black = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)  # Fashion-MNIST's background: lifted, not left at 0
    assert (train_vision.corrupt(black, "brightness", 5, torch.Generator()) == round(255 * c)).all()
