"""train_lm.py on 2 CPU processes with gloo (as under torchrun): masks and weights stay identical on
both ranks through soft-magnitude + RigL updates, and match one process training on the same
global batches (each rank trains on its own share of every batch)."""
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import models
import neurotrails
import train_lm
from test_train_lm import write_corpus


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flags(corpus, tokenizer, out):
    return ["--dataset", "text", "--data-dir", str(corpus), "--tokenizer", str(tokenizer), "--model", "llama-9m",
            "--seq-len", "24", "--batch-size", "4", "--micro-batch-size", "1", "--eval-tokens", "200",
            "--updates", "6", "--budget", "equal", "--delta-t", "2", "--log-every", "3", "--eval-every", "6", "--out", str(out)]


def train_once(argv, mask_seed, result):
    """build + train, with the mask generator reseeded: ranks would now draw different topologies."""
    _, args = train_lm.parse_args(argv)
    cfg = train_lm.resolve_config(args)
    tok = models.load_tokenizer(cfg["tokenizer"])
    stream = train_lm.TokenStream(train_lm.document_source(cfg, "train"), tok, cfg["seq_len"], cfg["pack"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    val = train_lm.validation_batches(cfg, tok) if rank == 0 else None
    net, masks, opt = train_lm.build_run(cfg, len(tok))
    masks.generator.manual_seed(mask_seed)
    Path(cfg["out"]).mkdir(parents=True, exist_ok=True)
    train_lm.train(cfg, net, masks, opt, stream, val)
    torch.save({"model": {k: v.detach() for k, v in net.state_dict().items()}, "masks": masks.masks,
                "updates": masks.num_updates, "world": cfg["world_size"]}, result)


def worker(rank, port, argv, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    neurotrails.init_distributed()
    train_once(argv, 1000 + rank, Path(result_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_keep_identical_masks_and_weights_and_match_one_process(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(train_lm.train_tokenizer(train_lm.text_files(corpus, "train"), 300))
    mp.spawn(worker, args=(free_port(), flags(corpus, tokenizer, tmp_path / "ddp"), str(tmp_path)), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a["world"] == b["world"] == 2
    assert a["updates"] == b["updates"] == 2  # topology updates at 2 and 4 (t_end = 6)
    for k in a["masks"]:
        assert torch.equal(a["masks"][k], b["masks"][k]), k
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # The same run in one process, with rank 0's mask generator. Guaranteed: the same topology
    # budget. Not guaranteed bitwise: 4 micro-batches are summed here, 2 per rank plus an all-reduce
    # there, and that float summation order differs by CPU kernel (AVX2 vs AVX-512). RigL then ranks
    # |grad| values that differ in the last bits, so a near-tie at the growth threshold can go the
    # other way. Bound: per tensor, at most 2% of the active positions differ (a tie flips a few
    # out of thousands; a missing broadcast or a wrong gradient would move about half of those that
    # grew), and the weights at positions active in both runs agree to float32 accumulation
    # tolerance (rtol 1e-3 over 6 Adam updates).
    train_once(flags(corpus, tokenizer, tmp_path / "one"), 1000, tmp_path / "one.pt")
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    for k in a["masks"]:
        assert int(a["masks"][k].sum()) == int(one["masks"][k].sum()), k
        differ = int((a["masks"][k] != one["masks"][k]).sum()) // 2  # each moved weight: one off, one on
        assert differ <= 0.02 * int(a["masks"][k].sum()), (k, differ)
    for k in a["model"]:
        both = a["masks"][k] & one["masks"][k] if k in a["masks"] else torch.ones_like(a["model"][k], dtype=torch.bool)
        torch.testing.assert_close(a["model"][k][both], one["model"][k][both], rtol=1e-3, atol=1e-4)
    assert (tmp_path / "ddp" / "log.jsonl").read_text().count("\n") == 2  # rank 0 alone logs
