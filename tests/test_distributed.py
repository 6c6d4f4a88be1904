"""Multi-process training (torchrun / DistributedDataParallel) on 2 CPU processes with gloo: masks and
weights stay identical on every rank across topology updates, and only rank 0 writes."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import neurotrails
import train_vision

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                                reason="needs the Debian package dataset-fashion-mnist")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, port, data_dir, out, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    neurotrails.init_distributed()
    _, args = train_vision.parse_args(
        ["--dataset", "fashion-mnist", "--data-dir", data_dir, "--model", "wrn10-1", "--train-subset", "128",
         "--test-subset", "64", "--batch-size", "16", "--delta-t", "2", "--grow", "set", "--num-heads", "2",
         "--blocks-in-head", "2", "--epochs", "2", "--budget", "equal", "--out", out])
    cfg = train_vision.resolve_config(args)
    train, test = train_vision.load_data(cfg["dataset"], cfg["data_dir"], cfg["train_subset"], cfg["test_subset"])
    net, masks, opt = train_vision.build_run(cfg, 128 // 16)
    masks.generator.manual_seed(1000 + rank)  # ranks would now draw different SET growth on their own
    Path(out).mkdir(parents=True, exist_ok=True)
    train_vision.train(cfg, net, masks, opt, train, test)
    # parameters only: BatchNorm running statistics follow each rank's own last batch (DDP copies
    # rank 0's buffers at the start of every forward; the checkpoint is rank 0's)
    params = {k: v.detach() for k, v in net.named_parameters()}
    torch.save({"model": params, "masks": masks.masks, "updates": masks.num_updates},
               Path(result_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_masks_and_weights_are_identical_on_both_ranks_after_topology_updates(tmp_path):
    data_dir = tmp_path / "data"
    train_vision.load_data("fashion-mnist", data_dir)
    mp.spawn(worker, args=(free_port(), str(data_dir), str(tmp_path / "out"), str(tmp_path)), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a["updates"] == b["updates"] == 7  # steps 2, 4, ..., 14 of 16
    for k in a["masks"]:
        assert torch.equal(a["masks"][k], b["masks"][k]), k
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    rows = (tmp_path / "out" / "log.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]  # rank 0 alone wrote, once per epoch


def test_torchrun_cli_runs_two_processes(tmp_path):
    data_dir = tmp_path / "data"
    train_vision.load_data("fashion-mnist", data_dir)
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(ROOT / "train_vision.py"), "--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--model",
         "wrn10-1", "--train-subset", "128", "--test-subset", "64", "--batch-size", "16", "--epochs", "1", "--budget", "equal",
         "--num-heads", "2", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert [out.stdout.count(s) for s in ("config {", "epoch 1/1 |", "acc %")] == [1, 1, 1]  # rank 0 alone prints
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["config"]["world_size"] == 2 and ckpt["step"] == 128 // 16
