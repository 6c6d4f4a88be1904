"""Language modelling: NeuroTrails and its baselines as LLaMA pretraining on C4 (paper Sec. 4.2).

    python train_lm.py --model llama-130m                          # the paper's LLaMA-130M run
    python train_lm.py --model llama-350m                          # the 350M recipe
    python train_lm.py --dataset text --data-dir /usr/share/doc/python3.11/html/_sources \\
        --train-tokenizer 4096 --model llama-9m --seq-len 128 --batch-size 16 --pack --updates 150 \\
        --delta-t 25 --eval-tokens 50000 --eval-every 50 --log-every 25 \\
        --compare single,treenet,neurotrails                       # offline quick run, ~4.5 min on 2 cores

Paper map (arXiv 2505.17909):
  Sec. 4.2, App. E.2, Table 10  recipe: Adam, lr, warmup + cosine, 512 seqs, S=0.1  -> RECIPES, resolve_config()
  App. C                        LLaMA split: embeddings + first L-k layers | k layers + norm + lm_head
  Sec. 3, Alg. 1                mean-of-heads loss, masked Adam, DST every 50 updates  -> train()
  Sec. 2.2, Zhang et al. 2025   soft-magnitude pruning (T=3) + RigL on the accumulated gradient
  Sec. 4.2, Table 4             validation perplexity of the soft vote, per head     -> evaluate.perplexity()
  App. H.1                      parameter-matched dense llama-250m                   -> evaluate.py flops

Methods are settings of one loop: single (M=1, dense), treenet (M heads, dense), ensemble (M
independent full models, each on its own sequences), neurotrails (M heads, sparse, DST), static
(sparse, no topology updates); `--grow set` gives the SET variant.

Data: a stream of documents (C4 "en" from the hub, local C4 json.gz shards, or local text files),
tokenized on the fly; each document is followed by EOS. Default (the released code): one document
per sequence, truncated to --seq-len and right-padded, padding ignored by the loss. --pack
concatenates documents and cuts the stream into full sequences instead. Every process reads the
whole global batch and keeps its own share of it (sequences rank, rank + world, ...), so the
data of an update does not depend on the number of processes. Batches are read and tokenized
ahead in a DataLoader worker process (--data-workers 0: in the training process).

Loss of an update: mean over heads of the token-summed cross-entropy, divided by the number of
target tokens in the whole update (all micro-batches, all processes), so gradient accumulation and
DDP give the same gradient as one big batch.

Every run writes under --out: log.jsonl (one JSON object per --log-every updates, with
perplexities every --eval-every), last.pt (atomic, every --save-every updates and at the end),
config.json, tokenizer.json (a --train-tokenizer run). --resume PATH continues exactly (bitwise
on CPU): weights, masks, DST schedule and RNG, Adam state, LR schedule and the position in the
data stream.

Deviation: C4 order. Released code: the streamed C4 is shuffled with a buffer. Ours: C4 in its
  stored order (its shards are already in random order), because a shuffle buffer's contents cannot
  be restored on --resume. Local text files are shuffled by paragraph with the seed (exactly resumable).
"""
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import evaluate
import models
import neurotrails
import sparsity
from neurotrails import float_in, int_in

# App. E.2, Tables 10 and 13. dense_updates: U, the updates of the single dense network (and of
# TreeNet and of each full-ensemble member); under --budget paper sparse methods train
# floor(U / (1 - S)) (Table 13: 10,000 -> 11,111 at S = 0.1). Other sizes take the 130M recipe.
RECIPES = {
    "llama-130m": dict(lr=1.5e-3, dense_updates=10_000),
    "llama-350m": dict(lr=5e-4, dense_updates=40_000),
}
DEFAULT_RECIPE = RECIPES["llama-130m"]
METHODS = [m for m, method in neurotrails.METHODS.items() if not method.prunes]  # no pruning baseline for LMs
SCRIPT = "train_lm.py"  # the writer named in every checkpoint
# Optimizer settings a --resume may change (e.g. a lower --lr after a divergence); recorded in
# config["resumed"] and in the log.
OPTIMIZER_CHANGES = ("lr", "weight_decay", "warmup", "min_lr_ratio")
# Config keys that may differ between a checkpoint and the run resuming it.
RESUMABLE_CHANGES = {"data_dir", "out", "device", "bf16", "world_size", "stop_after", "eval_every",
                     "log_every", "save_every", "data_workers", "resumed", *OPTIMIZER_CHANGES,
                     "train_flops_vs_single", "infer_flops_vs_single"}  # these two follow from the rest
VALIDATION_EVERY = 20  # --dataset text: every 20th file (sorted by path) is held out for validation


# ----------------------------------------------------------------------------------------------
# The training loop


def bf16_autocast(cfg):
    """bf16 autocast on the run's device when --bf16 is on (a no-op context otherwise)."""
    return torch.autocast(cfg["device"].split(":")[0], torch.bfloat16, enabled=cfg["bf16"])


def head_nll_sums(logits, targets):
    """Token-summed cross-entropy of each head (M,): logits (M, B, T, V), targets (M or 1, B, T)."""
    num_heads, vocab = logits.shape[0], logits.shape[-1]
    targets = targets.expand(num_heads, *targets.shape[1:])
    nll = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), ignore_index=-100, reduction="none")
    return nll.view(num_heads, -1).sum(1)


def train(cfg, net, masks, opt, stream, val_batches, start=0, tokens=0, save_state=None, good=None, changed=None):
    """Train from update `start` to cfg['updates'] (or --stop-after updates of this call); log,
    evaluate and checkpoint on their intervals. Returns the last evaluation record.

    good: the last checkpoint known to be finite (the one resumed from), named if training
    diverges; changed: optimizer settings this resume changed, written into the first log line.

    Under torchrun, DDP all-reduces the accumulated gradient once per update (no_sync on the other
    micro-batches), so soft magnitude and RigL see the all-reduced accumulated gradient; every
    topology update takes rank 0's masks; rank 0 alone evaluates, logs and saves.
    """
    out, device = Path(cfg["out"]), cfg["device"]
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    ensemble = neurotrails.METHODS[cfg["method"]].full_ensemble
    members = cfg["num_heads"] if ensemble else 1
    forward = neurotrails.Members(net) if ensemble else net
    if world > 1:
        forward = DistributedDataParallel(forward, device_ids=[torch.cuda.current_device()]
                                          if device.startswith("cuda") else None)
    sync = sparsity.broadcast_mask if world > 1 else None
    autocast = bf16_autocast(cfg)
    # the whole global batch, on every process
    batches = Prefetcher(stream, members * cfg["batch_size"], cfg["data_workers"])
    # "sum": each independent member trains as if alone; "mean": L = 1/M sum_i L_i (Sec. 3)
    head_weight = 1.0 if neurotrails.METHODS[cfg["method"]].loss == "sum" else 1.0 / cfg["num_heads"]
    end = cfg["updates"] if not cfg["stop_after"] else min(cfg["updates"], start + cfg["stop_after"])
    record = None
    log_loss, log_tokens, log_seconds, log_updates = 0.0, 0, 0.0, 0  # since the last log line
    run_tokens, run_time = 0, 0.0  # this invocation's training tokens and seconds (evaluation excluded)
    bar = tqdm(range(start, end), initial=start, total=cfg["updates"], desc="updates", leave=False,
               disable=rank != 0 or not sys.stderr.isatty())
    heartbeat = neurotrails.Heartbeat("updates", end - start, enabled=None if rank == 0 else False)
    net.train()
    for update in bar:
        began = time.perf_counter()
        lr = lr_at(update, cfg)  # App. E.2: linear warmup, then cosine to min_lr_ratio x lr
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]  # the heads' group: --head-lr-scale x lr

        # The batch: every process reads the whole global batch (members x batch sequences) and
        # keeps its share, so an update sees the same data for any number of processes. The loss
        # is normalised by the target tokens of the WHOLE update, counted before the split.
        ids, targets = batches.take()
        ids, targets = ids.view(members, cfg["batch_size"], -1), targets.view(members, cfg["batch_size"], -1)
        counts = (targets != -100).flatten(1).sum(1).to(device).clamp(min=1)  # target tokens per member
        ids, targets = ids[:, rank::world].to(device), targets[:, rank::world].to(device)  # this process's share

        opt.zero_grad(set_to_none=True)
        loss_sum = accumulate_gradient(forward, ids, targets, counts, cfg["micro_batch_size"], head_weight, autocast,
                                       ensemble, world)
        if not torch.isfinite(loss_sum):  # before the step: the model and the last checkpoint stay good
            raise FloatingPointError(f"loss is {loss_sum.item()} at update {update + 1}; "
                                     f"{neurotrails.last_good(good)}")

        # Every Delta T updates, before the step: soft-magnitude prune + RigL regrow, scored on the
        # accumulated (all-reduced) gradient of the loss. Then the step, and inactive weights back
        # to exactly 0 (Adam's moments stay warm: see sparsity.py on regrown weights' first steps).
        step = update + 1
        if masks is not None and masks.is_update_step(step):
            masks.update(step, opt, sync)
        opt.step()
        if masks is not None:
            masks.apply_(opt)
        if device.startswith("cuda"):
            torch.cuda.synchronize()  # honest tokens/s: wait for the GPU before reading the clock
        update_tokens, seconds = int(counts.sum()), time.perf_counter() - began
        tokens += update_tokens
        run_tokens, run_time = run_tokens + update_tokens, run_time + seconds
        log_loss, log_tokens = log_loss + loss_sum.item(), log_tokens + update_tokens
        log_seconds, log_updates = log_seconds + seconds, log_updates + 1
        # Each interval on its own: a save every --save-every whatever --log-every is.
        evaluate_now = step % cfg["eval_every"] == 0 or step == cfg["updates"]
        log_now = step % cfg["log_every"] == 0 or evaluate_now or step == end
        save_now = step % cfg["save_every"] == 0 or step == end

        # Before a save: the whole state must be finite. A step can blow up with a finite loss,
        # so the loss check above is not enough; nothing non-finite is logged as a result or saved.
        if save_now:
            state = {"model": net.state_dict(), "optimizer": opt.state_dict()}
            bad = neurotrails.nonfinite_tensor(state)
            if bad:
                raise FloatingPointError(f"{bad} is NaN or inf after update {step}; nothing was saved; "
                                         f"{neurotrails.last_good(good)}")

        # Every --log-every updates (with perplexities every --eval-every): one log line.
        if log_now and rank == 0:
            record = {"update": step, "tokens": tokens, "loss": log_loss / log_updates, "lr": lr,
                      "tokens_per_s": log_tokens / log_seconds, "interval_time_s": log_seconds,
                      "density": neurotrails.component_densities(net, masks)}
            if changed and step == start + 1:
                record["resumed_with"] = changed
            if evaluate_now:
                record.update(evaluate.perplexity(net, val_batches, autocast))
            record = neurotrails.rounded(record)
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            (print if bar.disable else tqdm.write)(log_line(record, cfg["updates"]))
            sys.stdout.flush()
        if log_now:
            log_loss, log_tokens, log_seconds, log_updates = 0.0, 0, 0.0, 0
        heartbeat.beat(step - start, loss_sum)  # off a terminal: a line a minute between log lines

        # Every --save-every updates, and at the end of this invocation: the checkpoint.
        if save_now and rank == 0:
            neurotrails.save_checkpoint(out / "last.pt", SCRIPT, {
                "config": cfg, "update": step, "tokens": tokens, **state,
                "masks": masks.state_dict() if masks is not None else None,
                "rng": torch.get_rng_state(), "data": batches.state, **(save_state or {})})
            good = out / "last.pt"
        if save_now and world > 1:
            dist.barrier()
    bar.close()
    if record is not None:
        record["run_tokens_per_s"] = run_tokens / max(run_time, 1e-9)
    return record


def accumulate_gradient(forward, ids, targets, counts, micro, head_weight, autocast, ensemble, world):
    """One update's gradient, accumulated over micro-batches of this process's share (M, B, T):
    each adds its part of the update's mean loss, so the summed gradient is that of one big batch,
    under DDP too (no_sync: one all-reduce, at the last micro-batch). Returns the update's loss."""
    loss_sum = torch.zeros((), device=ids.device)
    for j in range(0, ids.shape[1], micro):
        x, y = ids[:, j:j + micro], targets[:, j:j + micro]
        last = j + micro >= ids.shape[1]
        with nullcontext() if last or world == 1 else forward.no_sync():
            with autocast:
                logits = forward(x) if ensemble else forward(x[0])
                # Sec. 3: L = 1/M sum_i L_i, each L_i the mean NLL over the update's target tokens.
                loss = (head_nll_sums(logits, y) / counts).sum() * head_weight
            (loss * world).backward()  # DDP averages over processes; the loss is already a global mean
        loss_sum += loss.detach()
    if world > 1:
        dist.all_reduce(loss_sum)
    return loss_sum


def log_line(record, updates):
    """The printed form of a log record: loss, lr, tokens/s and, when evaluated, the perplexities."""
    line = (f"update {record['update']}/{updates} | loss {record['loss']:.4f} | lr {record['lr']:.3g} | "
            f"{record['tokens_per_s']:,.0f} tok/s")
    if "ppl" in record:
        line += (f" | ppl {record['ppl']:.2f} (logits {record['ppl_logits']:.2f}; heads "
                 + " ".join(f"{p:.2f}" for p in record["ppl_heads"]) + ")")
    return line


# ----------------------------------------------------------------------------------------------
# Configuration


def resolve_config(args):
    """The run's full configuration: flags, filled in from the paper's recipe for the model."""
    r, method = RECIPES.get(args.model, DEFAULT_RECIPE), neurotrails.METHODS[args.method]
    cfg = {k: v for k, v in vars(args).items()
           if k not in ("resume", "compare", "overwrite", "sweep", "seeds", "config")}
    if not models.is_language_model(args.model):
        raise ValueError(f"--model {args.model!r} is not a language model; choose one of "
                         f"{', '.join(models.LLAMA_CONFIGS)} (image models: train_vision.py)")
    cfg["lr"] = r["lr"] if args.lr is None else args.lr
    if args.train_tokenizer is not None:  # the config names the tokenizer actually used
        cfg["tokenizer"] = f"byte-level BPE of {args.train_tokenizer} tokens trained on --data-dir (tokenizer.json)"
    cfg["num_heads"] = neurotrails.num_heads_of(args.method, args.num_heads)
    cfg["sparsity"] = args.sparsity if method.sparse else 0.0
    cfg["dense_updates"] = r["dense_updates"] if args.dense_updates is None else args.dense_updates
    num_blocks = models.LLAMA_CONFIGS[args.model][0]
    if method.full_ensemble:  # each member is a whole model: nothing to split
        cfg["blocks_in_head"] = None
    elif cfg["blocks_in_head"] is None:
        cfg["blocks_in_head"] = neurotrails.default_blocks_in_head(args.model, num_blocks)
    neurotrails.validate(args.model, cfg["num_heads"], cfg["blocks_in_head"], num_blocks, cfg["sparsity"],
                         method.full_ensemble)
    cfg.update(budget(cfg, method))
    cfg["device"] = neurotrails.check_device(args.device) if args.device else \
        "cuda" if torch.cuda.is_available() else "cpu"
    cfg["bf16"] = cfg["device"].startswith("cuda") if args.bf16 is None else args.bf16
    cfg["world_size"] = dist.get_world_size() if dist.is_initialized() else 1
    cfg["micro_batch_size"] = min(args.micro_batch_size, max(1, args.batch_size // cfg["world_size"]))
    # The default folder names what makes runs differ, so a quick run never lands in a real run's folder.
    # stored absolute, so that a checkpoint is read the same from any working directory
    cfg["out"] = str(Path(args.out or f"runs/lm-{args.model}-{args.method}-M{cfg['num_heads']}-S{cfg['sparsity']}"
                              f"-U{cfg['dense_updates']}-{cfg['budget']}-u{cfg['updates']}-seed{args.seed}").resolve())
    validate(cfg)
    if cfg["data_dir"] is not None:
        cfg["data_dir"] = str(Path(cfg["data_dir"]).resolve())
    return cfg


def budget(cfg, method):
    """The method's updates under cfg["budget"] (see neurotrails.method_budget; paper = Table 13:
    floor(U / (1 - S)) for sparse methods, U for the others) and its cost relative to the single
    dense network trained for U updates: inference FLOPs per sequence and training FLOPs of the
    run (App. F; vocabulary: --train-tokenizer N, else 32,000 as t5-base)."""
    report = evaluate.flops_report(cfg["model"], cfg["num_heads"], cfg["blocks_in_head"], cfg["sparsity"],
                                   cfg["allocation"], cfg["init"], method.full_ensemble, seq_len=cfg["seq_len"],
                                   delta_t=cfg["delta_t"] if method.evolves else 0,
                                   vocab_size=cfg["train_tokenizer"] or 32000)
    step_cost = report["train_flops_per_step_vs_single"]
    mode = "density" if cfg["budget"] == "paper" else cfg["budget"]  # Table 13 is the 1/(1-S) rule
    updates = neurotrails.method_budget(mode, cfg["dense_updates"], 1, cfg["sparsity"], step_cost)
    return {"updates": updates, "train_flops_vs_single": round(step_cost * updates / cfg["dense_updates"], 4),
            "infer_flops_vs_single": round(report["infer_flops_vs_single"], 4)}


def validate(cfg):
    """One clear ValueError per bad combination, naming the flag (single values are range-checked
    by their argparse types)."""
    per_rank = cfg["batch_size"] // cfg["world_size"]
    if cfg["batch_size"] % cfg["world_size"] or per_rank % cfg["micro_batch_size"]:
        raise ValueError(f"--micro-batch-size {cfg['micro_batch_size']} must divide the {per_rank} sequences per "
                         f"process (--batch-size {cfg['batch_size']} over {cfg['world_size']} processes)")
    if neurotrails.METHODS[cfg["method"]].sparse and cfg["sparsity"] == 0.0:
        raise ValueError(f"--method {cfg['method']} needs --sparsity > 0 (use treenet for a dense multi-head run)")
    if cfg["dataset"] == "text" and not cfg["data_dir"]:
        raise ValueError("--dataset text needs --data-dir, a folder of .txt/.md/.rst files")
    if cfg["data_dir"] is not None and not Path(cfg["data_dir"]).is_dir():
        raise ValueError(f"--data-dir {cfg['data_dir']!r}: no such folder")
    if cfg["train_tokenizer"] is not None and cfg["dataset"] != "text":
        raise ValueError("--train-tokenizer needs --dataset text (it is trained on the training files)")


def lr_at(update, cfg):
    """Linear warmup over the first --warmup of the updates, then cosine to --min-lr-ratio x lr."""
    warm = max(1, round(cfg["warmup"] * cfg["updates"]))
    if update < warm:
        return cfg["lr"] * (update + 1) / warm
    progress = (update - warm) / max(1, cfg["updates"] - warm)
    return cfg["lr"] * (cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_run(cfg, vocab_size):
    """Network, masks and Adam for a configuration, initialised from cfg['seed']."""
    torch.manual_seed(cfg["seed"])
    method = neurotrails.METHODS[cfg["method"]]
    net = neurotrails.build_from_config(cfg, vocab_size=vocab_size).to(cfg["device"])
    masks = None
    if method.masked_at_start:  # ER masks at sparsity S (attention saturates to dense); Delta T = 0: static
        masks = neurotrails.build_masks(net, cfg["sparsity"], cfg["allocation"], cfg["init"], cfg["seed"],
                                        prune=cfg["prune"].replace("-", "_"), grow=cfg["grow"],
                                        temperature=cfg["temperature"], p0=cfg["drop_fraction"],
                                        delta_t=cfg["delta_t"] if method.evolves else 0, t_end=cfg["updates"])
    opt = torch.optim.Adam(neurotrails.param_groups(net, cfg["head_lr_scale"]), lr=cfg["lr"],
                           weight_decay=cfg["weight_decay"])
    return net, masks, opt


def load_checkpoint(path, cfg=None, flag="--resume"):
    """A train_lm.py checkpoint; with cfg, refused unless it is from the same configuration."""
    return neurotrails.load_checkpoint(path, SCRIPT, flag, cfg, RESUMABLE_CHANGES)


# ----------------------------------------------------------------------------------------------
# Entry points


def tokenizer_for(cfg, state=None):
    """(tokenizer, its tokenizer.json text or None): from the checkpoint, trained, or loaded."""
    if state is not None and state.get("tokenizer_json"):
        return models.load_tokenizer(tokenizer_json=state["tokenizer_json"]), state["tokenizer_json"]
    if cfg["train_tokenizer"] is not None:
        text = train_tokenizer(text_files(cfg["data_dir"], "train"), cfg["train_tokenizer"])
        return models.load_tokenizer(tokenizer_json=text), text
    return models.load_tokenizer(cfg["tokenizer"]), None


def run(cfg, resume=None, overwrite=False):
    """One configuration end to end; returns the last evaluation record plus cost figures (in
    OUT/results.json too, once the whole budget is trained). The folder is checked before the
    data and the tokenizer are loaded, and locked while training."""
    began, out, rank = time.perf_counter(), Path(cfg["out"]), dist.get_rank() if dist.is_initialized() else 0
    state = load_checkpoint(resume, cfg) if resume else None
    if rank == 0:
        neurotrails.check_run_folder(out, resume, overwrite)
    source = document_source(cfg, "train")
    tokenizer, tokenizer_json = tokenizer_for(cfg, state)
    stream = TokenStream(source, tokenizer, cfg["seq_len"], cfg["pack"])
    val_batches = validation_batches(cfg, tokenizer) if rank == 0 else None
    net, masks, opt = build_run(cfg, len(tokenizer))
    start, tokens, changed = 0, 0, None
    if state is not None:
        masks = neurotrails.restore(state, net, opt, weight_decay=cfg["weight_decay"])
        stream.load_state_dict(state["data"])  # the position in the data stream
        start, tokens = state["update"], state["tokens"]
        changed = neurotrails.record_resume(cfg, state, resume, OPTIMIZER_CHANGES, "update")
    with neurotrails.run_folder(out, resume, overwrite) if rank == 0 else nullcontext():
        if rank == 0:
            log = Path(resume).parent / "log.jsonl" if resume else None
            lines = [line for line in log.read_text().splitlines() if json.loads(line)["update"] <= start] \
                if log and log.exists() else []  # a kill may have left lines after the checkpoint
            (out / "log.jsonl").write_text("".join(line + "\n" for line in lines))
            if tokenizer_json:
                (out / "tokenizer.json").write_text(tokenizer_json)
            (out / "config.json").write_text(json.dumps(cfg, indent=1))
            print("config " + json.dumps(cfg), flush=True)
        if dist.is_initialized():
            dist.barrier()
        described = {"tokenizer_json": tokenizer_json, "model_kwargs": {"vocab_size": len(tokenizer)}}
        record = train(cfg, net, masks, opt, stream, val_batches, start, tokens, described, resume, changed)
        if rank != 0:
            return None
        if record is None or "ppl" not in record:  # resumed a finished run, or stopped between evaluations
            record = dict(record or {}, **evaluate.perplexity(net, val_batches, bf16_autocast(cfg)))
        record.update(evaluate.parameter_counts(net), **cost_vs_single(net, cfg, len(tokenizer)))
        record = neurotrails.rounded(record)
        end = min(cfg["updates"], start + cfg["stop_after"]) if cfg["stop_after"] else cfg["updates"]
        if end == cfg["updates"]:  # the whole budget: results.json marks it finished, written under the lock
            print(f"wrote {neurotrails.write_results(out, SCRIPT, cfg, record, time.perf_counter() - began)}",
                  flush=True)
    return record


def cost_vs_single(net, cfg, vocab_size):
    """Inference FLOPs per sequence and as a ratio to the single dense base model."""
    example = torch.zeros(1, cfg["seq_len"], dtype=torch.long, device=cfg["device"])
    single = models.build(cfg["model"], vocab_size=vocab_size).to(cfg["device"])
    base = evaluate.inference_flops(single, example)["dense"]
    flops = evaluate.inference_flops(net, example)["sparse"]
    return {"infer_flops": flops, "infer_flops_vs_single": flops / base}


def eval_only(argv):
    """`train_lm.py --eval-only --checkpoint PATH [--data-dir D] [--json]`: the validation
    perplexities of a checkpoint, read here with the data."""
    prog, args = evaluate.eval_only_args(argv, SCRIPT)
    try:
        net, tokenizer, cfg = evaluate.load_language_model(args.checkpoint)
        cfg["data_dir"] = args.data_dir or cfg["data_dir"]
        batches = validation_batches(cfg, tokenizer)
    except (ValueError, OSError) as e:
        neurotrails.fail(prog, e)
    # the validation perplexities: soft vote, mean of logits, per head
    result = {**evaluate.perplexity(net, batches, bf16_autocast(cfg)), **evaluate.parameter_counts(net)}
    if args.json:
        print(json.dumps(result))
        return
    heads = " ".join(f"{p:.3f}" for p in result.pop("ppl_heads"))
    print(" | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())
          + f" | ppl_heads {heads}")


# The --compare table: header, then how a run's record is shown (tok/s 0: nothing trained in this call).
TABLE = [("ppl", lambda r: f"{r['ppl']:.2f}"), ("ppl logits", lambda r: f"{r['ppl_logits']:.2f}"),
         ("ppl heads", lambda r: " ".join(f"{p:.1f}" for p in r["ppl_heads"])),
         ("tok/s", lambda r: f"{r.get('run_tokens_per_s', 0):,.0f}"),
         ("FLOPs vs single", lambda r: f"{r['infer_flops_vs_single']:.3f}"),
         ("active params", lambda r: f"{r['active_params']:,}")]


def parse_args(argv=None):
    ap = neurotrails.Parser(prog=SCRIPT, description="Pretrain NeuroTrails or a baseline LLaMA on C4 (paper Sec. 4.2). Defaults are the "
                "paper's recipe for --model; flags left unset take them. `train_lm.py --eval-only --checkpoint PATH` "
                "evaluates a checkpoint instead (its flags: `train_lm.py --eval-only --help`).")
    method, data, training, run = (ap.add_argument_group(title) for title in (
        "method (Sec. 3, 4)", "data", "training (App. E; budgets: Table 13)", "run: folder, device, logging, sweeps"))
    method.add_argument("--model", default="llama-130m", help="base LLaMA: " + ", ".join(models.LLAMA_CONFIGS))
    method.add_argument("--method", default="neurotrails", choices=METHODS,
                    help="neurotrails | single (dense, M=1) | treenet (dense heads) | ensemble (M full models) | "
                         "static (sparse, no topology updates)")
    method.add_argument("--compare", default=None,
                    help="comma-separated methods to train one after another, then print one comparison table")
    neurotrails.add_arguments(method, 0.1, " of sparse methods (dense methods: 0)", dst=True, delta_t=50,
                              delta_t_help=" (default: 50)",
                              blocks_help="the paper's: 8 decoder layers for llama-130m, 16 for llama-350m, else "
                                          "about 2/3 of the layers")
    method.add_argument("--prune", default="soft-magnitude", choices=["soft-magnitude", "magnitude"],
                    help="pruning: survivors sampled with probability ~ |w|^T (Zhang 2025), or smallest |w|")
    method.add_argument("--temperature", type=float_in(0, 1e3, lo_open=True), default=3.0,
                    help="T in (0, 1000], the soft-magnitude exponent (larger: closer to hard magnitude)")
    training.add_argument("--updates", dest="dense_updates", metavar="U", type=int_in(1), default=None,
                    help="U, the single dense network's optimizer updates, from which --budget gives each method "
                         "its own (default: the paper's, 10,000 for llama-130m and smaller, 40,000 for 350m)")
    training.add_argument("--budget", default="paper", choices=neurotrails.BUDGETS,
                    help="updates per method: paper = Table 13 (sparse methods floor(U / (1 - S)), e.g. 11,111 at "
                         "S = 0.1; the others U); equal = U for all; flops = the updates whose training FLOPs equal "
                         "the single network's at U; density = the same rule as paper (default: paper)")
    training.add_argument("--batch-size", type=int_in(1), default=512, help="sequences per update (per ensemble member)")
    training.add_argument("--micro-batch-size", type=int_in(1), default=32,
                    help="sequences per forward/backward on each process; gradients accumulate to --batch-size. "
                         "Sets memory use: 32 fits llama-350m (M=3) on an 80 GB GPU, 64 llama-130m")
    data.add_argument("--seq-len", type=int_in(2, 1 << 20), default=256, help="tokens per sequence (truncation), >= 2")
    data.add_argument("--pack", action="store_true",
                    help="concatenate documents into full sequences instead of one truncated, padded document each")
    training.add_argument("--lr", type=float_in(0, lo_open=True), default=None,
                    help="peak learning rate > 0 (1.5e-3; llama-350m 5e-4); may change on --resume")
    training.add_argument("--warmup", type=float_in(0, 1, hi_open=True), default=0.1,
                    help="fraction in [0, 1) of the updates with linear warmup; may change on --resume")
    training.add_argument("--min-lr-ratio", type=float_in(0, 1), default=0.1,
                    help="in [0, 1]: the cosine decays to this x lr; may change on --resume")
    training.add_argument("--weight-decay", type=float_in(0), default=0.0, help="Adam weight decay >= 0; may change on --resume")
    data.add_argument("--dataset", default="c4", choices=["c4", "text"],
                    help="c4: allenai/c4 'en' streamed from the hub, or local shards with --data-dir; "
                         "text: paragraphs of the .txt/.md/.rst files under --data-dir")
    data.add_argument("--data-dir", default=None,
                    help="c4: folder of c4-{train,validation}.*.json.gz shards; text: folder of text files "
                         f"(every {VALIDATION_EVERY}th file, sorted by path, is the validation set)")
    data.add_argument("--tokenizer", default="t5-base", help="HF tokenizer name or local file/folder (default: t5-base)")
    data.add_argument("--train-tokenizer", type=int_in(259, 1 << 20), default=None, metavar="N",
                    help="instead of --tokenizer: train a byte-level BPE of N tokens on the training files "
                         "(--dataset text; saved in the checkpoint and as OUT/tokenizer.json)")
    data.add_argument("--data-workers", type=int, default=1, choices=[0, 1],
                    help="1: read and tokenize the next batches in a worker process (default); 0: in this process")
    run.add_argument("--eval-tokens", type=int_in(1), default=10_000_000, help="validation target tokens (paper: 10M)")
    run.add_argument("--eval-every", type=int_in(1), default=1000, help="updates between validation perplexities")
    run.add_argument("--log-every", type=int_in(1), default=10, help="updates between log lines")
    run.add_argument("--save-every", type=int_in(1), default=1000, help="updates between checkpoints")
    run.add_argument("--stop-after", type=int_in(1), default=None,
                    help="save and exit after this many updates of this invocation (e.g. a job's time limit); "
                         "continue with --resume OUT/last.pt")
    training.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0,
                    help="seed of init, masks, DST sampling and data order, in [0, 2^32)")
    neurotrails.add_run_arguments(run, "runs/lm-<model>-<method>-M<M>-S<S>-U<U>-<budget>-u<updates>-seed<seed>")
    return ap, ap.parse_args(neurotrails.with_config(ap, sys.argv[1:] if argv is None else argv))


def main(argv=None):
    """--eval-only, a sweep, --method or --compare (then one table; with --compare --out, also
    OUT/compare.md and OUT/compare.csv)."""
    neurotrails.run_command(main, sys.argv[1:] if argv is None else argv, parse_args, resolve_config, run, METHODS,
                            lambda rows, out: evaluate.print_comparison(rows, TABLE, out), eval_only)


# ----------------------------------------------------------------------------------------------
# Tokenizer and documents


def train_tokenizer(files, vocab_size):
    """A byte-level BPE of vocab_size tokens trained on `files`; returns its tokenizer.json text."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(f) for f in files], trainer)
    return tok.to_str()


def text_files(data_dir, split, warn=False):
    """--dataset text: *.txt / *.md / *.rst files under data_dir; every VALIDATION_EVERY-th is validation.
    Files that are empty or not UTF-8 text are skipped (warn: say how many, once per run)."""
    candidates = sorted(p for p in Path(data_dir).rglob("*") if p.suffix in (".txt", ".md", ".rst") and p.is_file())
    files = [p for p in candidates if _is_text(p)]
    skipped = [p for p in candidates if p not in set(files)]
    if skipped and warn:
        print(f"warning: skipped {len(skipped)} of {len(candidates)} files under --data-dir that are empty or "
              f"not UTF-8 text (first: {skipped[0]})", file=sys.stderr)
    if len(files) < 2:
        raise ValueError(f"--data-dir {data_dir}: --dataset text needs at least 2 non-empty UTF-8 .txt/.md/.rst "
                         f"files, found {len(files)}" + (f" ({len(skipped)} skipped)" if skipped else ""))
    val = files[VALIDATION_EVERY // 2::VALIDATION_EVERY] or files[:1]
    return val if split == "validation" else [f for f in files if f not in val]


def _is_text(path):
    """Non-empty UTF-8 without NUL bytes (which text never has and binary files usually do)."""
    try:
        data = path.read_bytes()
        return bool(data.strip()) and b"\0" not in data and bool(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError):
        return False


def document_source(cfg, split):
    """A function epoch -> datasets.IterableDataset of {"text": ...} for 'train' or 'validation'."""
    from datasets import disable_progress_bars, load_dataset
    disable_progress_bars()
    if cfg["dataset"] == "text":
        files = [str(f) for f in text_files(cfg["data_dir"], split, warn=split == "train")]
        table = load_dataset("text", data_files={split: files}, sample_by="paragraph", split=split)
        # Paragraphs shuffled with the seed and the epoch: files mix, and the order is exactly resumable.
        return lambda epoch: table.shuffle(seed=cfg["seed"] * 1009 + epoch).to_iterable_dataset()
    if cfg["data_dir"]:  # local C4 shards: c4-train.00000-of-01024.json.gz, c4-validation.00000-of-00008.json.gz
        files = sorted(str(p) for p in Path(cfg["data_dir"]).glob(f"*{split}*.json*"))
        if not files:
            raise ValueError(f"--data-dir {cfg['data_dir']}: no C4 {split} shards (*{split}*.json.gz) in it")
        return lambda epoch: load_dataset("json", data_files={split: files}, split=split,
                                          streaming=True).select_columns(["text"])
    if not models.hub_reachable():
        raise ValueError("C4 is streamed from the HuggingFace hub (allenai/c4), which cannot be reached; give "
                         "--data-dir with local C4 json.gz shards, or --dataset text --data-dir with text files")
    return lambda epoch: load_dataset("allenai/c4", "en", split=split, streaming=True).select_columns(["text"])


class TokenStream:
    """Fixed-length token sequences from a document stream, with its exact position in state_dict().

    take(n) -> (inputs, targets), both (n, seq_len - 1): a sequence of seq_len tokens predicts its
    last seq_len - 1 from the ones before; targets are -100 at padding. pack=False: one document
    per sequence, truncated and right-padded; pack=True: documents concatenated (the stream's
    unused tail is `carry`) and cut into full sequences. loop=False: stop at the end of the data.
    """

    def __init__(self, source, tokenizer, seq_len, pack, loop=True, docs_per_call=64):
        self.source, self.tok, self.seq_len, self.pack, self.loop = source, tokenizer, seq_len, pack, loop
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or 0)
        self.docs_per_call = docs_per_call  # packed mode reads (and tokenizes) this many documents at once
        self.epoch, self.carry, self.done = 0, [], False
        self.docs, self.iterator, self.read_in_epoch = source(0), None, False

    def take(self, n):
        seqs = []
        while len(seqs) < n:
            # Packed: full sequences come from the carried tail first, so the carry stays shorter
            # than one read and the stream's state (epoch, position, carry) stays small to save.
            if self.pack and len(self.carry) >= self.seq_len:
                seqs.append(self.carry[:self.seq_len])
                self.carry = self.carry[self.seq_len:]
                continue
            if self.done:
                break
            texts = self._read(n - len(seqs) if not self.pack else self.docs_per_call)
            # one document per sequence: the tokenizer stops at seq_len tokens (C4 documents are long)
            cut = {} if self.pack else {"truncation": True, "max_length": self.seq_len}
            ids = self.tok(texts, add_special_tokens=False, **cut)["input_ids"] if texts else []
            for doc in ids:
                doc = doc + [self.eos] if self.eos is not None else doc
                if self.pack:
                    self.carry += doc
                elif len(doc) >= 2:  # a sequence needs at least one target
                    seqs.append(doc[:self.seq_len])
        # inputs are tokens 0..L-2, targets tokens 1..L-1; padding gets target -100 (ignored by the loss)
        ids = torch.full((len(seqs), self.seq_len), self.pad, dtype=torch.long)
        targets = torch.full((len(seqs), self.seq_len - 1), -100, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            targets[i, :len(s) - 1] = ids[i, 1:len(s)]
        return ids[:, :-1], targets

    def _read(self, n):
        """Up to n document texts; at the end of the data, the next epoch (loop) or stop."""
        texts = []
        while len(texts) < n:
            if self.iterator is None:
                self.iterator = iter(self.docs)
            try:
                texts.append(next(self.iterator)["text"])
                self.read_in_epoch = True
            except StopIteration:
                if not self.loop:
                    self.done = True
                    break
                if not self.read_in_epoch:
                    raise ValueError("the training data holds no text") from None
                self.epoch += 1
                self.docs, self.iterator, self.read_in_epoch = self.source(self.epoch), None, False
        return texts

    def state_dict(self):
        return {"epoch": self.epoch, "docs": self.docs.state_dict(), "carry": list(self.carry)}

    def load_state_dict(self, state):
        self.epoch, self.carry = state["epoch"], list(state["carry"])
        self.docs, self.iterator, self.read_in_epoch = self.source(self.epoch), None, True
        self.docs.load_state_dict(state["docs"])


class Batches(torch.utils.data.IterableDataset):
    """stream.take(n) forever, each batch with the stream's state after it (the position to
    checkpoint: the batches consumed, not the ones read ahead). An error is passed on as an item,
    so that it reaches the training loop as itself."""

    def __init__(self, stream, n):
        self.stream, self.n = stream, n

    def __iter__(self):
        while True:
            try:
                ids, targets = self.stream.take(self.n)
            except Exception as e:
                yield e
                return
            yield ids, targets, self.stream.state_dict()


class Prefetcher:
    """Batches made ahead in --data-workers DataLoader worker processes (0: in this process, in
    turn with training), so that reading and tokenizing text neither waits for nor slows the GPU:
    a thread here would hold the interpreter lock the training loop needs to launch kernels."""

    def __init__(self, stream, n, workers=1):
        self.state = stream.state_dict()
        # fork: the worker inherits the stream as it is (its document source is a closure)
        # Its own generator: the loader's seed draw must not advance the global RNG that the
        # checkpoint saves (a resumed run would otherwise save a different RNG state).
        loader = torch.utils.data.DataLoader(Batches(stream, n), batch_size=None, num_workers=min(workers, 1),
                                             generator=torch.Generator().manual_seed(0),
                                             prefetch_factor=2 if workers else None,
                                             multiprocessing_context="fork" if workers else None)
        self.iterator = iter(loader)

    def take(self):
        item = next(self.iterator)
        if isinstance(item, Exception):
            raise item
        ids, targets, self.state = item
        return ids, targets


def validation_batches(cfg, tokenizer):
    """The first --eval-tokens target tokens of the validation data, as micro-batches (kept in memory)."""
    stream = TokenStream(document_source(cfg, "validation"), tokenizer, cfg["seq_len"], cfg["pack"], loop=False)
    batches, count = [], 0
    while count < cfg["eval_tokens"]:
        ids, targets = stream.take(cfg["micro_batch_size"])
        if not len(ids):  # the end of the validation data
            break
        batches.append((ids, targets))
        count += int((targets != -100).sum())
    if not count:
        raise ValueError("the validation data holds no text")
    return batches


if __name__ == "__main__":
    main()
