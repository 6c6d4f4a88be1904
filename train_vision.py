"""Vision training: NeuroTrails and every baseline of the paper's image experiments.

    python train_vision.py --dataset cifar100                      # the paper's main run
    python train_vision.py --dataset fashion-mnist --model wrn10-2 --train-subset 5000 \\
        --epochs 3 --compare single,treenet,ensemble,neurotrails   # offline quick comparison

Paper map (arXiv 2505.17909):
  Sec. 4.1, App. E.2, Table 9   recipes (SGD, lr, momentum, wd, batch, step decay)  -> RECIPES
  App. E.3, Tables 11, 12, 14   epochs per method (--budget paper|equal|flops|density) -> PAPER_RATIOS, budget()
  Sec. 3, Alg. 1                training: mean-of-heads loss, masked SGD, DST       -> train()
  Sec. 5.1, App. E.2            static sparse and pruning baselines                -> --method static|pruning
  App. E.2                      full ensemble: independent training, soft voting    -> --method ensemble
  App. F, Sec. 5.2              test metrics every epoch                            -> evaluate.summarize()

Methods are settings of one loop: single (M=1, dense), treenet (M heads, dense), ensemble (M
independent full models, each with its own init and data order; the loss is the SUM of the members'
losses so each member trains exactly as alone), neurotrails (M heads, sparse, DST), static (same
init, no topology updates), pruning (dense for 50% of the steps, one-shot global magnitude pruning
to density 1-S, then fine-tuning on the same LR schedule with the topology fixed).

Every run writes under --out: log.jsonl (one JSON object per epoch), last.pt (atomic, every
epoch; loads with torch.load(weights_only=True)), config.json. --resume PATH continues exactly
(bitwise on CPU): weights, masks, DST schedule and RNG, optimizer, epoch, data order. The test set
is only reported, never used for selection: the last epoch is the result.

Deviation: augmentation. Released code: horizontal flip only for CIFAR-100. Ours: pad-4 random
  crop + flip, the standard CIFAR recipe the paper's dense baselines were trained with.
"""
import argparse
import functools
import gzip
import json
import math
import shutil
import sys
import time
import warnings
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

# App. E.2, Table 9 (ImageNet: NVIDIA's ResNet-50 recipe). Fashion-MNIST is our offline
# stand-in, with the CIFAR optimiser settings. The dataset's facts (classes, channels, test image
# size, normalisation) live here and nowhere else; checkpoints carry what readers need of them.
RECIPES = {
    "cifar100": dict(model="wrn28-10", classes=100, channels=3, size=32, lr=0.1, momentum=0.9, weight_decay=5e-4,
                     batch_size=128, delta_t=100, sparsity=0.8, mean=(0.5071, 0.4865, 0.4409),
                     std=(0.2673, 0.2564, 0.2762)),
    "tinyimagenet": dict(model="wrn28-10", classes=200, channels=3, size=64, lr=0.1, momentum=0.9, weight_decay=5e-4,
                         batch_size=128, delta_t=100, sparsity=0.8, mean=(0.480, 0.448, 0.398),
                         std=(0.277, 0.269, 0.282)),
    "imagenet": dict(model="resnet50", classes=1000, channels=3, size=224, lr=0.256, momentum=0.875, weight_decay=3.05e-5,
                     batch_size=256, delta_t=1000, sparsity=0.7, mean=(0.485, 0.456, 0.406),
                     std=(0.229, 0.224, 0.225)),
    "fashion-mnist": dict(model="wrn16-4", classes=10, channels=1, size=28, lr=0.1, momentum=0.9, weight_decay=5e-4,
                          batch_size=128, delta_t=100, sparsity=0.8, mean=(0.2860,), std=(0.3530,)),
}
# Training budgets (App. E.3). E, the single dense network's epochs (Tables 11, 12, 14; the
# offline Fashion-MNIST: ours), and each method's epochs as a multiple of E under --budget paper:
# CIFAR-100 (Table 11): NeuroTrails 450 vs 250 (1.8x; static and SET alike), TreeNet 250, the full
# ensemble 250 per member, pruning 250 + 250; ImageNet (Table 12): 270 vs 90 (3x), TreeNet 180,
# pruning 2x; Tiny-ImageNet (Table 14): 200 vs 100. Fashion-MNIST takes the CIFAR-100 ratios.
DENSE_EPOCHS = {"cifar100": 250, "tinyimagenet": 100, "imagenet": 90, "fashion-mnist": 15}
PAPER_RATIOS = {  # keyed by Method.epochs
    "cifar100": {"dense": 1, "treenet": 1, "sparse": 1.8, "pruning": 2},
    "tinyimagenet": {"dense": 1, "treenet": 1, "sparse": 2, "pruning": 2},
    "imagenet": {"dense": 1, "treenet": 2, "sparse": 3, "pruning": 2},
}
PAPER_RATIOS["fashion-mnist"] = PAPER_RATIOS["cifar100"]
METHODS = list(neurotrails.METHODS)  # every method of the table runs here
SCRIPT = "train_vision.py"  # the writer named in every checkpoint
# Optimizer settings a --resume may change (e.g. a lower --lr after a divergence); recorded in
# config["resumed"] and in the log.
OPTIMIZER_CHANGES = ("lr", "momentum", "weight_decay")
# Config keys that may differ between a checkpoint and the run resuming it.
RESUMABLE_CHANGES = {"data_dir", "out", "device", "workers", "eval_every", "bf16", "channels_last", "world_size", "resumed",
                     *OPTIMIZER_CHANGES, "train_flops_vs_single", "infer_flops_vs_single"}  # these two follow from the rest


# ----------------------------------------------------------------------------------------------
# The training loop


def train(cfg, net, masks, opt, train_data, test_data, start_epoch=0, step=0, good=None, changed=None):
    """Train from start_epoch to cfg['epochs']; evaluate, log and checkpoint after every epoch.

    good: the last checkpoint known to be finite (the one resumed from), named if training
    diverges; changed: optimizer settings this resume changed, written into the first log line.
    A state with NaN or inf anywhere (weights, BatchNorm statistics, momentum) is never evaluated
    as a result nor saved: the run stops with exit code 1 and names `good`.

    Under torchrun: DistributedDataParallel averages the gradients (so RigL scores the all-reduced
    gradient), every topology update takes rank 0's masks, and only rank 0 evaluates, logs and saves.
    """
    out, device, method = Path(cfg["out"]), cfg["device"], neurotrails.METHODS[cfg["method"]]
    members = cfg["num_heads"] if method.full_ensemble else 1  # data streams: one per independent member
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    forward = neurotrails.Members(net) if method.full_ensemble else net
    if world > 1:
        forward = DistributedDataParallel(forward, device_ids=[torch.cuda.current_device()]
                                          if device.startswith("cuda") else None)
    sync = sparsity.broadcast_mask if world > 1 else None  # every topology update takes rank 0's masks
    steps_per_epoch = num_train(train_data) // cfg["batch_size"]
    prune_step = cfg["epochs"] * steps_per_epoch // 2  # pruning baseline: half-way
    autocast = torch.autocast(device.split(":")[0], torch.bfloat16, enabled=cfg["bf16"])
    record = None
    for epoch in range(start_epoch, cfg["epochs"]):
        net.train()
        start, loss_sum = time.perf_counter(), torch.zeros((), device=device)
        heartbeat = neurotrails.Heartbeat(f"epoch {epoch + 1}", steps_per_epoch, enabled=None if rank == 0 else False)
        streams = [train_batches(train_data, cfg["batch_size"], cfg["seed"], epoch, i, cfg["dataset"], device,
                                 cfg["workers"], rank, world) for i in range(members)]
        for batches in tqdm(zip(*streams), total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg['epochs']}",
                            leave=False, disable=rank != 0 or not sys.stderr.isatty()):
            lr = lr_at(epoch + (step - epoch * steps_per_epoch) / steps_per_epoch, cfg)  # x0.1 at 25, 50, 75 %
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"]  # the heads' group: --head-lr-scale x lr
            step += 1
            if cfg["channels_last"]:
                batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]

            # The loss. Full ensemble: L = sum_i CE(F_i(x_i), y_i), each member on its own batch, so
            # each trains exactly as alone. Otherwise Sec. 3: L = 1/M sum_i CE(F_h^i(F_s(x)), y).
            with autocast:
                if method.loss == "sum":
                    logits = forward(torch.stack([x for x, _ in batches]))
                    loss = sum(F.cross_entropy(z, y) for z, (_, y) in zip(logits, batches))
                else:
                    x, y = batches[0]
                    loss = neurotrails.ensemble_loss(forward(x), y)
            # On the CPU the check is free: before the step, so the weights stay as they were. On a GPU
            # it would wait for the device every step; there the end-of-epoch check below catches it.
            if device == "cpu" and not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1}, step {step}; "
                                         f"{neurotrails.last_good(good)}")

            # The backward is dense, so p.grad is the dense gradient of the loss that RigL scores.
            opt.zero_grad(set_to_none=True)
            loss.backward()
            loss_sum += loss.detach()

            # Every Delta T steps, BEFORE the step (a foreach SGD adds momentum into p.grad):
            # prune the smallest |w|, regrow as many by |grad| (RigL) or at random (SET).
            if masks is not None and masks.is_update_step(step):
                masks.update(step, opt, sync)

            # The step; then the weights outside the masks (and their momentum) back to exactly 0.
            opt.step()
            if masks is not None:
                masks.apply_(opt)

            # Pruning baseline, once, half-way: global magnitude pruning to 1 - S, then a fixed topology.
            if method.prunes and step == prune_step:  # weights are equal on all ranks
                masks = prune_to_fixed_topology(net, cfg)
            heartbeat.beat(step - epoch * steps_per_epoch, loss)  # off a terminal: a line a minute
        train_time = time.perf_counter() - start

        # Every epoch, all ranks: the whole state must be finite. A step can blow up with a finite
        # loss (inf BatchNorm variance, huge weights); such a state is never evaluated or saved.
        state = {"model": net.state_dict(), "optimizer": opt.state_dict()}
        bad = neurotrails.nonfinite_tensor(state)
        if bad:
            raise FloatingPointError(f"{bad} is NaN or inf after epoch {epoch + 1}; nothing was saved; "
                                     f"{neurotrails.last_good(good)}")

        # Every --eval-every epochs and at the last, rank 0: the test metrics (the test set never
        # selects anything); every epoch one log line.
        if rank == 0:
            evaluated = (epoch + 1) % cfg["eval_every"] == 0 or epoch + 1 == cfg["epochs"]
            record = {"epoch": epoch + 1, "step": step, "lr": lr, "train_loss": loss_sum.item() / steps_per_epoch,
                      **(test_metrics(net, test_data, cfg) if evaluated else {}),
                      "density": neurotrails.component_densities(net, masks),
                      "epoch_time_s": train_time, "ms_per_step": 1000 * train_time / steps_per_epoch}
            if changed and epoch == start_epoch:
                record["resumed_with"] = changed
            record = neurotrails.rounded(record)
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            test = (f"| acc {100 * record['acc']:.1f}% | nll {record['nll']:.3f} | ece {record['ece']:.3f} "
                    f"| pd {100 * record['pd_any']:.1f}% " if evaluated else "")
            print(f"epoch {epoch + 1}/{cfg['epochs']} | loss {record['train_loss']:.3f} | lr {lr:.4g} {test}| "
                  f"{record['ms_per_step']:.0f} ms/step", flush=True)

        # Every epoch, rank 0: the checkpoint (atomic; the other ranks wait for it).
        if rank == 0:
            neurotrails.save_checkpoint(out / "last.pt", SCRIPT, {
                "config": cfg, "epoch": epoch + 1, "step": step, **state,
                "masks": masks.state_dict() if masks is not None else None, "rng": torch.get_rng_state(),
                "model_kwargs": model_kwargs(cfg["dataset"]), "input_shape": input_shape(cfg["dataset"])})
            good = out / "last.pt"
        if world > 1:
            dist.barrier()
    return record


# ----------------------------------------------------------------------------------------------
# Configuration


def model_kwargs(dataset):
    """What the base network needs to know of a dataset: its classes and input channels."""
    return {"num_classes": RECIPES[dataset]["classes"], "in_channels": RECIPES[dataset]["channels"]}


def resolve_config(args):
    """The run's full configuration: flags, filled in from the paper's recipe for the dataset."""
    r, method = RECIPES[args.dataset], neurotrails.METHODS[args.method]
    cfg = {k: v for k, v in vars(args).items()
           if k not in ("resume", "compare", "overwrite", "sweep", "seeds", "config")}
    cfg["model"] = args.model or r["model"]
    for key in ("lr", "momentum", "weight_decay", "batch_size", "delta_t"):
        if cfg[key] is None:
            cfg[key] = r[key]
    cfg["num_heads"] = neurotrails.num_heads_of(args.method, args.num_heads)
    cfg["sparsity"] = (r["sparsity"] if args.sparsity is None else args.sparsity) if method.sparse else 0.0
    cfg["dense_epochs"] = DENSE_EPOCHS[args.dataset] if args.dense_epochs is None else args.dense_epochs
    if not str(args.data_dir).strip():
        raise ValueError("--data-dir must name a folder, got ''")
    cfg["data_dir"] = str(Path(args.data_dir).resolve())
    cfg["device"] = neurotrails.check_device(args.device) if args.device else \
        "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = cfg["device"].startswith("cuda")
    cfg["bf16"] = on_gpu if args.bf16 is None else args.bf16
    cfg["channels_last"] = on_gpu if args.channels_last is None else args.channels_last
    if models.is_language_model(cfg["model"]):
        raise ValueError(f"--model {cfg['model']} is a language model; train it with train_lm.py")
    with torch.device("meta"):  # block count L of the base model, without allocating it
        num_blocks = len(models.build(cfg["model"], **model_kwargs(args.dataset)).blocks)
    if method.full_ensemble:  # each member is a whole model: nothing to split
        cfg["blocks_in_head"] = None
    elif cfg["blocks_in_head"] is None:
        cfg["blocks_in_head"] = neurotrails.default_blocks_in_head(cfg["model"], num_blocks)
    neurotrails.validate(cfg["model"], cfg["num_heads"], cfg["blocks_in_head"], num_blocks, cfg["sparsity"],
                         method.full_ensemble)
    cfg.update(budget(cfg, method))
    epochs = cfg["epochs"]
    cfg["world_size"] = dist.get_world_size() if dist.is_initialized() else 1
    # The default folder names what makes runs differ, so a quick run never lands in a real run's folder.
    subsets = "".join(f"-{k}{v}" for k, v in (("train", args.train_subset), ("test", args.test_subset)) if v)
    # stored absolute, so that a checkpoint is read the same from any working directory
    cfg["out"] = str(Path(args.out or f"runs/{args.dataset}-{cfg['model']}-{args.method}-M{cfg['num_heads']}"
                              f"-S{cfg['sparsity']}-E{cfg['dense_epochs']}-{cfg['budget']}-e{epochs}{subsets}"
                              f"-seed{args.seed}").resolve())
    if cfg["batch_size"] % cfg["world_size"]:
        raise ValueError(f"--batch-size {cfg['batch_size']} must be divisible by the {cfg['world_size']} processes")
    if cfg["momentum"] == 0:  # torch: "Nesterov momentum requires a momentum and zero dampening"
        raise ValueError("--momentum 0: the paper's SGD is Nesterov, which needs a momentum > 0 (its value: 0.9)")
    if method.sparse and cfg["sparsity"] == 0.0:
        raise ValueError(f"--method {args.method} needs --sparsity > 0 (use treenet for a dense multi-head run)")
    return cfg


def budget(cfg, method):
    """The method's epochs under cfg["budget"] (see neurotrails.method_budget) and what its run
    costs relative to the single dense network trained for E = cfg["dense_epochs"]: inference
    FLOPs per image and training FLOPs of the whole run (App. F; the masks' ER/ERK densities,
    topology updates included)."""
    step_cost, infer_cost = train_step_cost(cfg, method)
    epochs = neurotrails.method_budget(cfg["budget"], cfg["dense_epochs"], PAPER_RATIOS[cfg["dataset"]][method.epochs],
                                       cfg["sparsity"], step_cost)
    return {"epochs": epochs, "train_flops_vs_single": round(step_cost * epochs / cfg["dense_epochs"], 4),
            "infer_flops_vs_single": round(infer_cost, 4)}


def train_step_cost(cfg, method):
    """(training FLOPs per step, inference FLOPs per image), each / the single dense network's.
    Pruning: dense for half the steps, then at density 1 - S (estimated as uniform: the global
    magnitude pruning decides the layerwise densities only during the run)."""
    r = RECIPES[cfg["dataset"]]

    def cost(sparsity_, init, delta_t):
        return evaluate.flops_report(cfg["model"], cfg["num_heads"], cfg["blocks_in_head"], sparsity_,
                                     cfg["allocation"], init, method.full_ensemble, r["classes"], r["size"],
                                     delta_t=delta_t, in_channels=r["channels"])
    if method.prunes:
        dense, pruned = cost(0.0, cfg["init"], 0), cost(cfg["sparsity"], "uniform", 0)
        step = (dense["train_flops_per_step_vs_single"] + pruned["train_flops_per_step_vs_single"]) / 2
        return step, pruned["infer_flops_vs_single"]
    c = cost(cfg["sparsity"], cfg["init"], cfg["delta_t"] if method.evolves else 0)
    return c["train_flops_per_step_vs_single"], c["infer_flops_vs_single"]


def build_run(cfg, steps_per_epoch):
    """Network, masks and optimiser for a configuration, initialised from cfg['seed']."""
    torch.manual_seed(cfg["seed"])
    method = neurotrails.METHODS[cfg["method"]]
    net = neurotrails.build_from_config(cfg, **model_kwargs(cfg["dataset"])).to(cfg["device"])
    if cfg["channels_last"]:
        net = net.to(memory_format=torch.channels_last)
    masks = None
    if method.masked_at_start:  # ER/ERK masks at sparsity S; Delta T = 0: a static topology
        masks = neurotrails.build_masks(net, cfg["sparsity"], cfg["allocation"], cfg["init"], cfg["seed"],
                                        prune="magnitude", grow=cfg["grow"], p0=cfg["drop_fraction"],
                                        delta_t=cfg["delta_t"] if method.evolves else 0,
                                        t_end=cfg["epochs"] * steps_per_epoch)
    opt = torch.optim.SGD(neurotrails.param_groups(net, cfg["head_lr_scale"]), lr=cfg["lr"],
                          momentum=cfg["momentum"], nesterov=True, weight_decay=cfg["weight_decay"])
    return net, masks, opt


def lr_at(epoch, cfg):
    """Step decay: lr x 0.1 at 25 %, 50 % and 75 % of the E_m = cfg["epochs"] epochs (App. E.2).
    `epoch` counts from 0 and may be fractional (epoch + step / steps per epoch). From 4 epochs on
    the milestones are whole epochs int(f x E_m), as in the released code (E_m = 450: epoch 112,
    not 113); shorter runs decay at f x E_m itself, mid-epoch, so three decays never fall together."""
    milestones = [int(f * cfg["epochs"]) if cfg["epochs"] >= 4 else f * cfg["epochs"] for f in (0.25, 0.5, 0.75)]
    return cfg["lr"] * 0.1 ** sum(epoch >= m for m in milestones)


def prune_to_fixed_topology(net, cfg):
    """Pruning baseline: one-shot global magnitude pruning to density 1 - S, topology then fixed."""
    weights = neurotrails.masked_weights(net)
    masks = sparsity.Masks(weights, sparsity.global_magnitude_masks(weights, 1.0 - cfg["sparsity"]), delta_t=0)
    masks.apply_()
    return masks


def load_checkpoint(path, cfg=None, flag="--resume"):
    """A train_vision.py checkpoint; with cfg, refused unless it is from the same configuration."""
    return neurotrails.load_checkpoint(path, SCRIPT, flag, cfg, RESUMABLE_CHANGES)


# ----------------------------------------------------------------------------------------------
# Entry points


def run(cfg, resume=None, overwrite=False):
    """One configuration end to end; returns the last epoch's record plus cost figures, also
    written to OUT/results.json with the config, times, versions and machine.

    --out is checked before anything is loaded (a folder holding another run is refused) and
    locked while training; resuming into a new folder carries the old log over.
    """
    began, out, rank = time.perf_counter(), Path(cfg["out"]), dist.get_rank() if dist.is_initialized() else 0
    state = load_checkpoint(resume, cfg) if resume else None
    if rank == 0:
        neurotrails.check_run_folder(out, resume, overwrite)
    train_data, test_data = load_data(cfg["dataset"], cfg["data_dir"], cfg["train_subset"], cfg["test_subset"])
    if isinstance(train_data, dict) and cfg["device"] != "cpu":  # small datasets live on the GPU, as uint8
        train_data, test_data = ({**d, "x": d["x"].to(cfg["device"]), "y": d["y"].to(cfg["device"])}
                                 for d in (train_data, test_data))
    steps_per_epoch = num_train(train_data) // cfg["batch_size"]
    if steps_per_epoch < 1:
        raise ValueError(f"--batch-size {cfg['batch_size']} is larger than the training set ({num_train(train_data)})")
    net, masks, opt = build_run(cfg, steps_per_epoch)
    start_epoch, step, changed = 0, 0, None
    if state is not None:
        # the optimizer keeps this run's settings: a resume may lower --lr, --momentum, --weight-decay
        masks = neurotrails.restore(state, net, opt, momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
        start_epoch, step = state["epoch"], state["step"]
        changed = neurotrails.record_resume(cfg, state, resume, OPTIMIZER_CHANGES, "epoch")
    with neurotrails.run_folder(out, resume, overwrite) if rank == 0 else nullcontext():
        if rank == 0:
            source = Path(resume).parent / "log.jsonl" if resume else None
            lines = source.read_text().splitlines()[:start_epoch] if source and source.exists() else []
            (out / "log.jsonl").write_text("".join(line + "\n" for line in lines))  # a kill may leave later lines
            (out / "config.json").write_text(json.dumps(cfg, indent=1))
            print("config " + json.dumps(cfg), flush=True)
        if dist.is_initialized():
            dist.barrier()
        record = train(cfg, net, masks, opt, train_data, test_data, start_epoch, step, resume, changed)
        if rank != 0:
            return None
        if record is None:  # resumed a finished run: its result is the model as saved
            record = {"epoch": start_epoch, "step": step, **test_metrics(net, test_data, cfg)}
        example = next(test_batches(test_data, 1, cfg["dataset"], cfg["device"]))[0]
        record.update(evaluate.parameter_counts(net), **cost_vs_single(net, cfg, example))
        record = neurotrails.rounded(record)
        # results.json marks the run finished: written while the folder is still locked
        print(f"wrote {neurotrails.write_results(out, SCRIPT, cfg, record, time.perf_counter() - began)}", flush=True)
    return record


def test_metrics(net, test_data, cfg):
    """Accuracy, NLL, ECE, disagreement and per-head accuracy of the soft vote on the test set."""
    batches = test_batches(test_data, 256, cfg["dataset"], cfg["device"], cfg["workers"])
    return evaluate.summarize(*evaluate.predict(net, batches), cfg["aggregate"])


def cost_vs_single(net, cfg, example):
    """Inference FLOPs of this network and as a ratio to the single dense base model."""
    single = models.build(cfg["model"], **model_kwargs(cfg["dataset"])).to(example.device)
    base = evaluate.inference_flops(single, example)["dense"]
    flops = evaluate.inference_flops(net, example)["sparse"]
    return {"infer_flops": flops, "infer_flops_vs_single": flops / base}


def eval_only(argv):
    """`train_vision.py --eval-only --checkpoint PATH ...`:
    a checkpoint's metrics on its own test set, read here where the data loading lives."""
    prog, args = evaluate.eval_only_args(argv, SCRIPT, tuple(CORRUPTIONS))
    try:
        state = load_checkpoint(args.checkpoint, flag="--checkpoint")
        check_corruption_flags(args, state)  # before the network and the data are built
        cfg, device = state["config"], "cuda" if torch.cuda.is_available() else "cpu"
        net = neurotrails.model_from_checkpoint(state, device, f"--checkpoint {args.checkpoint}")
        if args.image_folder:
            data = _flat_image_folder(cfg["dataset"], Path(args.image_folder))
            batches = torch.utils.data.DataLoader(data, args.batch_size)
        else:  # the checkpoint's own data_dir is only read: a folder the user did not name is never written
            _, data = load_data(cfg["dataset"], args.data_dir or cfg.get("data_dir", "data"), None,
                                cfg.get("test_subset"),
                                download=bool(args.data_dir))
            batches = test_batches(data, args.batch_size, cfg["dataset"], device)
        if (args.corruptions or args.heads_grid) and not isinstance(data, dict):
            raise ValueError(f"--{'corruptions' if args.corruptions else 'heads-grid'} needs an in-memory test set "
                             "(CIFAR-100 or Fashion-MNIST checkpoints)")
        models_to_grid = [(Path(args.checkpoint).resolve().parent.name, net)]
        if args.grid_with:
            other = load_checkpoint(args.grid_with, flag="--grid-with")
            if other["config"]["dataset"] != cfg["dataset"]:
                raise ValueError(f"--grid-with {args.grid_with} is a {other['config']['dataset']} model, "
                                 f"not {cfg['dataset']}")
            models_to_grid.append((Path(args.grid_with).resolve().parent.name,
                                   neurotrails.model_from_checkpoint(other, device)))
    except (ValueError, OSError, RuntimeError) as e:
        neurotrails.fail(prog, e)
    if args.heads_grid:  # Fig. 9 / App. K
        logits = [(name, evaluate.predict(m, test_batches(data, args.batch_size, cfg["dataset"], device))[0])
                  for name, m in models_to_grid]
        evaluate.plot_head_grid(data["x"], data["y"].tolist(), logits, data.get("classes"), args.heads_grid)
        print(f"wrote {args.heads_grid}", file=sys.stderr if args.json else sys.stdout)
    report_image_checkpoint(net, batches, args, args.aggregate or cfg["aggregate"], data,
                                     lambda x: normalize(x.to(device), cfg["dataset"]))


def check_corruption_flags(args, state):
    """--corruptions names known corruptions (no colour-only one on one-channel images);
    --corruptions-dir is a CIFAR-100-C folder whose images and labels fit the checkpoint's input and
    classes; not both."""
    names = corruption_names(args.corruptions, state["input_shape"][0])
    if any(n not in CORRUPTIONS for n in names):
        raise ValueError(f"--corruptions: unknown corruption in {args.corruptions!r}; choose from "
                         f"{', '.join(CORRUPTIONS)}")
    if args.corruptions_dir:
        if args.corruptions:
            raise ValueError("--corruptions (generated) and --corruptions-dir (the published files): give one")
        corruption_files(args.corruptions_dir, state["input_shape"], state["model_kwargs"]["num_classes"])


def input_shape(dataset):
    """(C, H, W) of a dataset's test images: what an exported graph takes."""
    return (RECIPES[dataset]["channels"], RECIPES[dataset]["size"], RECIPES[dataset]["size"])


def _flat_image_folder(dataset, folder):
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    r = RECIPES[dataset]
    steps = [T.Resize(256), T.CenterCrop(224)] if dataset == "imagenet" else [T.Resize((r["size"], r["size"]))]
    if r["channels"] == 1:
        steps.append(T.Grayscale())
    return ImageFolder(str(folder), T.Compose([*steps, T.ToTensor(), T.Normalize(r["mean"], r["std"])]))


# The --compare table: header, then how a run's record is shown.
TABLE = [("acc %", lambda r: f"{100 * r['acc']:.2f}"), ("NLL", lambda r: f"{r['nll']:.4f}"),
         ("ECE", lambda r: f"{r['ece']:.4f}"), ("PD any %", lambda r: f"{100 * r['pd_any']:.2f}"),
         ("PD pair %", lambda r: f"{100 * r['pd_pairwise']:.2f}"),
         ("FLOPs vs single", lambda r: f"{r['infer_flops_vs_single']:.3f}"),
         ("active params", lambda r: f"{r['active_params']:,}")]


def parse_args(argv=None):
    ap = neurotrails.Parser(prog=SCRIPT, description="Train NeuroTrails or a baseline on an image dataset (paper "
                            "Sec. 4.1). Defaults are the paper's recipe for the dataset; flags left unset take them. "
                            "`train_vision.py --eval-only --checkpoint PATH` evaluates a checkpoint instead (its "
                            "flags: `train_vision.py --eval-only --help`).")
    method, data, training, run = (ap.add_argument_group(title) for title in (
        "method (Sec. 3, 4)", "data", "training (App. E; budgets: App. E.3)", "run: folder, device, sweeps"))
    data.add_argument("--dataset", default="cifar100", choices=list(RECIPES), help="dataset (default: cifar100)")
    data.add_argument("--data-dir", default="data", help="dataset folder; CIFAR-100 / Fashion-MNIST are downloaded "
                    "here if missing, ImageNet / Tiny-ImageNet need train/ and val/ ImageFolder sub-folders")
    method.add_argument("--method", default="neurotrails", choices=METHODS,
                    help="neurotrails | single (dense, M=1) | treenet (dense heads) | ensemble (M full models) | "
                         "static (sparse, no topology updates) | pruning (dense 50%%, prune, fine-tune)")
    method.add_argument("--compare", default=None,
                    help="comma-separated methods to train one after another, then print one comparison table")
    method.add_argument("--model", default=None, help="base network (default per dataset: wrn28-10, resnet50, wrn16-4): "
                    + ", ".join(n for n in models.model_names() if not models.is_language_model(n)))
    neurotrails.add_arguments(method, None, " (default: 0.8; ImageNet 0.7); dense methods use 0", dst=True,
                              delta_t_help=" (default: 100; ImageNet 1000)",
                              blocks_help="the paper's: 8 for WRN-28-10, 10 for ResNet-50, else about 2/3 of the blocks")
    method.add_argument("--aggregate", default="probs", choices=["probs", "logits"],
                    help="ensemble prediction: mean of probabilities (paper) or of logits (released code)")
    training.add_argument("--epochs", dest="dense_epochs", metavar="E", type=int_in(1), default=None,
                    help="E, the single dense network's epochs, from which --budget gives each method its own "
                         "(default: the paper's, 250 CIFAR-100, 100 Tiny-ImageNet, 90 ImageNet; 15 Fashion-MNIST)")
    training.add_argument("--budget", default="paper", choices=neurotrails.BUDGETS,
                    help="epochs per method: paper = the paper's ratio to E (Tables 11, 12, 14; CIFAR-100: "
                         "NeuroTrails / static / SET 1.8x, TreeNet 1x, full ensemble 1x per member, pruning 2x; "
                         "ImageNet: sparse 3x, TreeNet 2x, pruning 2x; Tiny-ImageNet: sparse 2x; Fashion-MNIST "
                         "takes the CIFAR-100 ratios); equal = E for all; flops = the epochs whose training FLOPs "
                         "equal the single network's at E; density = E / (1 - S) for sparse methods "
                         "(default: paper)")
    training.add_argument("--batch-size", type=int_in(1), default=None, help="images per step (128; ImageNet 256)")
    training.add_argument("--lr", type=float_in(0, lo_open=True), default=None,
                    help="initial learning rate > 0 (0.1; ImageNet 0.256); may change on --resume")
    training.add_argument("--momentum", type=float_in(0, 1, hi_open=True), default=None,
                    help="SGD Nesterov momentum in [0, 1) (0.9; ImageNet 0.875); may change on --resume")
    training.add_argument("--weight-decay", type=float_in(0), default=None,
                    help="L2 weight decay >= 0 (5e-4; ImageNet 3.05e-5); may change on --resume")
    data.add_argument("--train-subset", type=int_in(1), default=None, help="train on a fixed random subset of N images")
    data.add_argument("--test-subset", type=int_in(1), default=None, help="test on a fixed random subset of N images")
    training.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0,
                    help="seed of init, masks, data order and augmentation, in [0, 2^32)")
    neurotrails.add_run_arguments(run, "runs/<dataset>-<model>-<method>-M<M>-S<S>-E<E>-<budget>-e<epochs>-...-seed<seed>")
    run.add_argument("--eval-every", type=int_in(1), default=1,
                    help="epochs between test evaluations (the last epoch is always evaluated; default: 1)")
    data.add_argument("--workers", type=int_in(0, 256), default=0, help="DataLoader workers for ImageFolder datasets")
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                    help="channels-last memory format (default: on with CUDA)")
    return ap, ap.parse_args(neurotrails.with_config(ap, sys.argv[1:] if argv is None else argv))


def main(argv=None):
    """--eval-only, a sweep, --method or --compare (then one table; with --compare --out, also
    OUT/compare.md and OUT/compare.csv)."""
    neurotrails.run_command(main, sys.argv[1:] if argv is None else argv, parse_args, resolve_config, run, METHODS,
                            lambda rows, out: evaluate.print_comparison(rows, TABLE, out), eval_only)


# ----------------------------------------------------------------------------------------------
# Data: small datasets live in memory as uint8 tensors; ImageNet-style folders use a DataLoader.


def load_data(dataset, data_dir, train_subset=None, test_subset=None, download=True):
    """(train, test) as dicts {x: uint8 (N,C,H,W), y: int64 (N)} or ImageFolder datasets.
    download=False: only read data_dir (nothing is downloaded or unpacked into it)."""
    data_dir = Path(data_dir)
    # Too large for memory (and decoded per image anyway): read through a DataLoader.
    if dataset in ("tinyimagenet", "imagenet"):
        return _image_folders(dataset, data_dir)
    import torchvision
    if dataset == "fashion-mnist" and download:
        _fashion_mnist_from_debian(data_dir)
    cls = torchvision.datasets.CIFAR100 if dataset == "cifar100" else torchvision.datasets.FashionMNIST
    try:
        sets = [cls(str(data_dir), train=t, download=download) for t in (True, False)]
    except Exception as e:  # offline download (URLError), corrupt or partial files, ...
        hint = ("put cifar-100-python.tar.gz (or its extracted folder) in it" if dataset == "cifar100" else
                "install the Debian package dataset-fashion-mnist, or put the IDX files in "
                f"{data_dir / 'FashionMNIST' / 'raw'}")
        raise ValueError(f"--data-dir {data_dir}: {dataset} could not be loaded or downloaded "
                         f"({type(e).__name__}: {str(e)[:120]}); {hint}") from None
    # Small datasets as one uint8 tensor each: augmentation and batching are then tensor indexing,
    # with no worker processes and no per-image Python (the CPU quick run spends its time training).
    out = []
    for ds, subset in zip(sets, (train_subset, test_subset)):
        x = torch.as_tensor(ds.data)
        x = x.permute(0, 3, 1, 2) if x.dim() == 4 else x[:, None]  # (N, C, H, W)
        y = torch.as_tensor(ds.targets, dtype=torch.long)
        if subset:  # a fixed random subset, the same for every run
            idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:subset]
            x, y = x[idx], y[idx]
        out.append({"x": x.contiguous(), "y": y, "classes": list(ds.classes)})
    return out


def _fashion_mnist_from_debian(data_dir, source=Path("/usr/share/datasets/fashion-mnist")):
    """Unpack the Debian package's IDX files where torchvision's loader looks for them."""
    raw = data_dir / "FashionMNIST" / "raw"
    if not source.is_dir() or (raw / "t10k-labels-idx1-ubyte").exists():
        return
    raw.mkdir(parents=True, exist_ok=True)
    for gz in source.glob("*-ubyte.gz"):
        with gzip.open(gz) as src, open(raw / gz.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)


def _image_folders(dataset, data_dir):
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    r = RECIPES[dataset]
    norm = T.Normalize(r["mean"], r["std"])
    if dataset == "imagenet":
        train_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        test_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm])
    else:
        train_tf = T.Compose([T.RandomCrop(64, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        test_tf = T.Compose([T.ToTensor(), norm])
    for split in ("train", "val"):
        if not (data_dir / split).is_dir():
            raise ValueError(f"--data-dir {data_dir}: expected ImageFolder sub-folders train/ and val/ "
                             f"(one folder per class) for {dataset}; {data_dir / split} is missing")
    return ImageFolder(str(data_dir / "train"), train_tf), ImageFolder(str(data_dir / "val"), test_tf)


def epoch_order(n, seed, epoch, member):
    """The data order of one epoch: a permutation fixed by (seed, epoch, ensemble member)."""
    # A fresh generator per (seed, epoch, member): a resumed run draws exactly the order it would
    # have drawn, without replaying earlier epochs; each full-ensemble member sees its own order.
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1009 + member)
    return torch.randperm(n, generator=g), g


def train_batches(data, batch_size, seed, epoch, member, dataset, device, workers=0, rank=0, world=1):
    """Yield augmented, normalised (x, y) batches for one epoch (last partial batch dropped).

    batch_size is the global batch; with `world` processes, process `rank` gets every world-th
    item of each global batch, so the data a step sees does not depend on the number of processes.
    """
    if not isinstance(data, dict):  # ImageFolder
        order, g = epoch_order(len(data), seed, epoch, member)
        steps = len(order) // batch_size
        mine = order[:steps * batch_size].view(steps, batch_size)[:, rank::world].reshape(-1)
        loader = torch.utils.data.DataLoader(data, batch_size // world, sampler=mine.tolist(), num_workers=workers,
                                             drop_last=True, generator=g, pin_memory=device != "cpu")
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return
    order, g = epoch_order(len(data["y"]), seed, epoch, member)
    steps = len(order) // batch_size
    if steps == 0:
        return
    # The epoch's crops and flips, drawn here in the order the batches use them, then moved to
    # the data's device with the order: one copy per epoch, none per step (on a GPU a copy from
    # the host waits for the device, so the next step could not be queued while this one runs).
    draws = torch.stack([crop_flip_draws(batch_size, g) for _ in range(steps)])
    order, draws = order.to(data["x"].device), draws.to(data["x"].device)
    for i in range(steps):
        idx = order[i * batch_size:(i + 1) * batch_size]
        x = augment(data["x"][idx], draws[i])[rank::world]  # the whole batch is drawn: same RNG stream everywhere
        yield normalize(x.to(device), dataset), data["y"][idx][rank::world].to(device)


def crop_flip_draws(n, g, pad=4):
    """A batch's random crop offsets and flips, drawn from generator g: (3, n) = dx, dy, flip."""
    dx, dy = torch.randint(0, 2 * pad + 1, (2, n), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    return torch.stack([dx, dy, flip.long()])


def augment(x, draws, pad=4):
    """Pad-4 random crop + random horizontal flip of a uint8 batch, as `crop_flip_draws` drew them
    (on x's device)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))  # zeros around, as torchvision's RandomCrop(padding=4)
    dx, dy, flip = draws[0], draws[1], draws[2].bool()
    # image i's crop: rows dy_i .. dy_i + h - 1, columns dx_i .. dx_i + w - 1, read right to left if flipped
    rows = dy[:, None] + torch.arange(h, device=x.device)
    cols = dx[:, None] + torch.where(flip[:, None], torch.arange(w - 1, -1, -1, device=x.device),
                                     torch.arange(w, device=x.device))
    index = torch.arange(n, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None]
    return padded[index[0], index[1], rows[:, None, :, None], cols[:, None, None, :]]


def normalize(x, dataset):
    """uint8 (N, C, H, W) -> float, (x / 255 - mean) / std per channel (on x's device: GPU runs
    move the uint8 batch, a quarter of the bytes)."""
    mean, std = channel_stats(dataset, x.device)
    return (x.float() / 255 - mean) / std


@functools.cache
def channel_stats(dataset, device):
    """The recipe's per-channel mean and std as (C, 1, 1) tensors on device, made once per device."""
    r = RECIPES[dataset]
    return (torch.tensor(r["mean"], device=device)[:, None, None],
            torch.tensor(r["std"], device=device)[:, None, None])


def test_batches(data, batch_size, dataset, device, workers=0):
    """(x, y) test batches in stored order: no augmentation, every image once (the last batch partial)."""
    if not isinstance(data, dict):
        loader = torch.utils.data.DataLoader(data, batch_size, num_workers=workers)
        return ((x.to(device), y) for x, y in loader)
    return ((normalize(data["x"][i:i + batch_size].to(device), dataset), data["y"][i:i + batch_size])
            for i in range(0, len(data["y"]), batch_size))


def num_train(data):
    return len(data["y"]) if isinstance(data, dict) else len(data)


# ----------------------------------------------------------------------------------------------
# Corrupted test sets (Sec. 4.1, Fig. 2; Hendrycks & Dietterich 2019, CIFAR-10/100-C)
#
# --corruptions-dir evaluates on the published CIFAR-100-C files (all 19 corruptions x 5 severities:
# the numbers papers quote), corruption_table_from_files(). Offline, --corruptions generates 14 of
# the 19 on the fly with the parameters of the benchmark's generation code: the noise family
# (gaussian, shot, impulse, speckle), defocus, glass, zoom and gaussian blur, fog, brightness,
# contrast, saturate (colour images only), pixelate and JPEG. Left out: frost (needs the benchmark's
# frost photographs), motion blur and snow (ImageMagick's motion-blur kernel), spatter (OpenCV's
# Canny edges and distance transform) and elastic (OpenCV's affine warp): no short exact version
# with the project's packages. Random draws come from torch's generator, so a generated set has the
# benchmark's distribution, not its pixels; numbers from it are not comparable to a CIFAR-100-C mean
# from the published files.

# Severity 1..5 parameters of the CIFAR-10/100-C generation code (Hendrycks & Dietterich 2019,
# make_cifar_c.py of their robustness repository); the algorithms below are written from its description.
CORRUPTIONS = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),   # std of additive noise
    "shot_noise": (500, 250, 100, 75, 50),              # Poisson rate scale
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),    # salt-and-pepper fraction
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # disk radius, its anti-alias sigma
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),  # sigma, max shift, passes
    "zoom_blur": (1.06, 1.11, 1.16, 1.21, 1.26),       # zooms numpy.arange(1, this, 0.01), averaged
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),  # fog strength, plasma wibble decay
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),          # HSV value shift
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),            # contrast factor
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),          # down-sampling factor
    "jpeg_compression": (80, 65, 58, 50, 40),           # JPEG quality
    "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),      # std of multiplicative noise
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),         # blur sigma in pixels
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),  # HSV saturation x a + b (severities
}                                                       # 1-2 desaturate, 3-5 saturate: not monotone)
COLOUR_ONLY = ("saturate",)  # a one-channel image has no saturation to change


def _gaussian(x, sigma, truncate=4.0):
    """Gaussian blur of (N, C, H, W) per channel as scipy / skimage do it: radius int(4 sigma + 0.5),
    edge pixels repeated ('nearest')."""
    radius = int(truncate * sigma + 0.5)
    if radius == 0:
        return x
    i = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (i / sigma) ** 2)
    k = k / k.sum()
    n, c, h, w = x.shape
    y = x.reshape(n * c, 1, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return y.reshape(n, c, h, w)


def _disk(radius, alias_sigma):
    """The defocus kernel: a 17 x 17 disk of the radius (normalised), anti-aliased by a 3 x 3
    Gaussian of alias_sigma (OpenCV's GaussianBlur with the kernel's edge reflected)."""
    r = torch.arange(-8, 9, dtype=torch.float64)
    disk = ((r[:, None] ** 2 + r[None, :] ** 2) <= radius ** 2).double()
    disk = disk / disk.sum()
    g = torch.exp(-torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64) / (2 * alias_sigma ** 2))
    g = (g / g.sum())[:, None] * (g / g.sum())[None, :]
    return F.conv2d(F.pad(disk[None, None], (1, 1, 1, 1), mode="reflect"), g[None, None])[0, 0]


def _plasma(n, size, decay, generator):
    """n diamond-square height maps of side size (the next power of two, cropped), in [0, 1]."""
    m = 1 << (size - 1).bit_length()
    a = torch.zeros(n, m, m, dtype=torch.float64)
    step, wibble = m, 100.0

    def wibbled_mean(total):  # mean of 4 neighbours + uniform noise of amplitude wibble^2
        return total / 4 + wibble * (2 * torch.rand(total.shape, generator=generator, dtype=torch.float64) - 1) * wibble

    while step >= 2:
        half = step // 2
        corners = a[:, ::step, ::step]
        squares = corners + corners.roll(-1, 1)
        a[:, half::step, half::step] = wibbled_mean(squares + squares.roll(-1, 2))
        centres, corners = a[:, half::step, half::step], a[:, ::step, ::step]
        a[:, ::step, half::step] = wibbled_mean(centres + centres.roll(1, 1) + corners + corners.roll(-1, 2))
        a[:, half::step, ::step] = wibbled_mean(centres + centres.roll(1, 2) + corners + corners.roll(-1, 1))
        step, wibble = half, wibble / decay
    a = a - a.amin((1, 2), keepdim=True)
    return (a / a.amax((1, 2), keepdim=True))[:, :size, :size]


def _clipped_zoom(x, zoom):
    """Zoom into the centre of (N, C, H, H) by zoom (bilinear, corners aligned as scipy.ndimage.zoom's
    order 1) and crop back to H x H."""
    h = x.shape[-1]
    ch = math.ceil(h / zoom)
    top = (h - ch) // 2
    out = F.interpolate(x[..., top:top + ch, top:top + ch], size=(round(ch * zoom),) * 2, mode="bilinear",
                        align_corners=True)
    trim = (out.shape[-1] - h) // 2
    return out[..., trim:trim + h, trim:trim + h]


def _glass_shuffle(x, shift, passes, generator):
    """CIFAR-C's local pixel shuffle: visit pixels from the bottom-right corner inwards and swap each
    with a neighbour at an offset drawn from [-shift, shift) in each axis, per image."""
    n, _, h, w = x.shape
    rows = torch.arange(n)
    for _ in range(passes):
        for i in range(h - shift, shift, -1):
            for j in range(w - shift, shift, -1):
                d = torch.randint(-shift, shift, (n, 2), generator=generator)
                i2, j2 = i + d[:, 1], j + d[:, 0]
                here, there = x[rows, :, i, j].clone(), x[rows, :, i2, j2].clone()
                x[rows, :, i, j], x[rows, :, i2, j2] = there, here
    return x


def corrupt(images, name, severity, generator):
    """Corrupt a uint8 batch (N, C, H, W) at severity 1..5; returns uint8. Same seed, same result."""
    from torchvision.io import decode_jpeg, encode_jpeg
    c = CORRUPTIONS[name][severity - 1]
    if name in COLOUR_ONLY and images.shape[1] != 3:
        raise ValueError(f"{name} changes colour; these images have {images.shape[1]} channel(s)")
    if name == "jpeg_compression":
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its JPEG codec for torchcodec
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.stack([decode_jpeg(encode_jpeg(img, quality=c)) for img in images])
    x = images.float() / 255
    if name == "gaussian_noise":
        x = x + c * torch.randn(x.shape, generator=generator)
    elif name == "shot_noise":
        x = torch.poisson(x * c, generator=generator) / c
    elif name == "impulse_noise":
        u = torch.rand(x.shape, generator=generator)
        x = torch.where(u < c / 2, 0.0, torch.where(u > 1 - c / 2, 1.0, x))
    elif name == "speckle_noise":
        x = x + x * c * torch.randn(x.shape, generator=generator)
    elif name == "gaussian_blur":
        x = _gaussian(x, c)
    elif name == "defocus_blur":  # each channel filtered with the disk, edges reflected (OpenCV's default)
        k = _disk(*c).to(x.dtype)
        n, ch, h, w = x.shape
        x = F.conv2d(F.pad(x.reshape(n * ch, 1, h, w), (8, 8, 8, 8), mode="reflect"), k[None, None])
        x = x.reshape(n, ch, h, w)
    elif name == "glass_blur":  # blur, quantise to uint8 by truncation (as the benchmark does), shuffle, blur
        sigma, shift, passes = c
        x = _glass_shuffle(torch.floor(_gaussian(x.double(), sigma) * 255), shift, passes, generator)
        x = _gaussian(x / 255, sigma)
    elif name == "zoom_blur":
        import numpy as np  # numpy's arange, so the zoom factors are the benchmark's to the last bit
        zooms = np.arange(1, c, 0.01)
        x = (x + sum(_clipped_zoom(x, float(z)) for z in zooms)) / (len(zooms) + 1)
    elif name == "fog":  # a plasma fractal per image added, then rescaled by the image's maximum
        strength, decay = c
        peak = x.amax((1, 2, 3), keepdim=True)
        x = x + strength * _plasma(len(x), max(x.shape[-2:]), decay, generator)[:, None, :x.shape[2], :x.shape[3]]
        x = x * peak / (peak + strength)
    elif name == "contrast":
        means = x.mean((2, 3), keepdim=True)
        x = (x - means) * c + means
    elif name == "brightness":  # HSV: V' = min(V + c, 1) with hue and saturation kept
        # V = max over channels. V > 0: RGB x V'/V keeps H and S. V = 0 (black): S = 0, so the
        # pixel becomes grey (V', V', V'); on a one-channel image this is x + c everywhere.
        v = x.max(1, keepdim=True).values
        lifted = (v + c).clamp(max=1)
        x = torch.where(v > 0, x * lifted / v.clamp(min=1e-12), lifted.expand_as(x))
    elif name == "saturate":  # HSV: S' = clip(a S + b, 0, 1) with hue and value kept
        # Every channel is V - V S k(H) with k in [0, 1], so x' = V - (V - x) S'/S. Grey pixels
        # (S = 0) have hue 0 (red), as skimage and colorsys convert them: R = V, G = B = V (1 - S').
        v, low = x.max(1, keepdim=True).values, x.min(1, keepdim=True).values
        delta = v - low
        s = torch.where(v > 0, delta / v.clamp(min=1e-12), 0.0)
        s2 = (s * c[0] + c[1]).clamp(0, 1)
        grey = torch.cat([v, v * (1 - s2), v * (1 - s2)], 1)
        x = torch.where(delta > 0, v - (v - x) * v * s2 / delta.clamp(min=1e-12), grey)
    elif name == "pixelate":
        h, w = x.shape[-2:]
        small = F.interpolate(x, size=(int(h * c), int(w * c)), mode="area")
        x = F.interpolate(small, size=(h, w), mode="nearest")
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def corruption_table(net, test_data, normalize, names, aggregate="probs", batch_size=256, seed=0):
    """Accuracy, NLL and ECE of the soft vote per corruption and severity (Sec. 4.1, Fig. 2)."""
    from tqdm import tqdm
    out = {}
    grid = [(n, s) for n in names for s in range(1, 6)]
    for name, severity in tqdm(grid, desc="corruptions", leave=False, disable=not sys.stderr.isatty()):
        g = torch.Generator().manual_seed(seed)
        x = test_data["x"]
        batches = ((normalize(corrupt(x[i:i + batch_size], name, severity, g)), test_data["y"][i:i + batch_size])
                   for i in range(0, len(x), batch_size))
        m = evaluate.summarize(*evaluate.predict(net, batches), aggregate)
        out[name, severity] = {k: m[k] for k in ("acc", "nll", "ece")}
    return out


# The 19 corruptions of the published CIFAR-10/100-C files (Hendrycks & Dietterich 2019): the 15
# of the benchmark's mean, then the 4 extra ones. Each NAME.npy holds the test set 5 times
# (severity 1 to 5, in that order) as uint8 (5 N, H, W, C); labels.npy holds the labels (5 N).
CIFAR_C = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
           "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
           "jpeg_compression", "speckle_noise", "gaussian_blur", "spatter", "saturate")


def corruption_files(folder, shape=None, num_classes=None):
    """The corruption names of a CIFAR-100-C style folder (NAME.npy beside labels.npy), checked
    before any evaluation: readable arrays (never pickles), uint8 pixels, 5 severities of the same
    test set, integer labels; given the model's input shape (C, H, W) and classes, those too."""
    import numpy as np
    folder = Path(folder)
    flag = f"--corruptions-dir {folder}"
    if not (folder / "labels.npy").is_file():
        raise ValueError(f"{flag}: no labels.npy (expected the CIFAR-100-C layout: NAME.npy per corruption and "
                         "labels.npy)")
    names = [n for n in CIFAR_C if (folder / f"{n}.npy").is_file()]
    names += sorted(p.stem for p in folder.glob("*.npy") if p.stem not in CIFAR_C and p.stem != "labels")
    if not names:
        raise ValueError(f"{flag}: no corruption .npy files beside labels.npy")

    def array(name):
        try:  # allow_pickle=False: a pickled .npy could run code
            return np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        except Exception as e:
            raise ValueError(f"{flag}: {name}.npy is not a plain numpy array (not a .npy file, or pickled objects, "
                             f"which are never loaded; {type(e).__name__})") from None
    labels = array("labels")
    n = len(labels) if labels.ndim == 1 else -1
    if n <= 0 or n % 5 or labels.dtype.kind not in "iu":
        raise ValueError(f"{flag}: labels.npy must hold integer labels, 5 severities x the test set (got "
                         f"{labels.dtype} {labels.shape})")
    if num_classes is not None and not (0 <= int(labels.min()) and int(labels.max()) < num_classes):
        raise ValueError(f"{flag}: labels.npy has labels outside [0, {num_classes}) for a {num_classes}-class model")
    for name in names:
        x = array(name)
        if x.shape[:1] != (n,) or x.ndim not in (3, 4):
            raise ValueError(f"{flag}: {name}.npy has shape {x.shape}, expected ({n}, H, W[, C]) with {n} = 5 "
                             "severities x the test set")
        if x.dtype != np.uint8:
            raise ValueError(f"{flag}: {name}.npy holds {x.dtype}, expected uint8 pixels 0-255 as published")
        image = (1, *x.shape[1:]) if x.ndim == 3 else (x.shape[3], *x.shape[1:3])
        if shape is not None and tuple(image) != tuple(shape):
            raise ValueError(f"{flag}: {name}.npy holds {image[0]} x {image[1]} x {image[2]} images (C x H x W); "
                             f"the model takes {shape[0]} x {shape[1]} x {shape[2]}")
    return names


def corruption_table_from_files(net, folder, normalize, aggregate="probs", batch_size=256):
    """Accuracy, NLL and ECE of the soft vote on the published corrupted test sets, per corruption
    and severity: the numbers papers quote as CIFAR-100-C."""
    import numpy as np
    folder, out = Path(folder), {}
    labels = torch.from_numpy(np.load(folder / "labels.npy").astype(np.int64))
    per = len(labels) // 5
    for name in corruption_files(folder):
        data = np.load(folder / f"{name}.npy", mmap_mode="r")
        for severity in range(1, 6):
            lo = (severity - 1) * per
            x = torch.from_numpy(np.array(data[lo:lo + per]))  # a copy: the memory map is read-only
            x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W)
            y = labels[lo:lo + per]
            batches = ((normalize(x[i:i + batch_size]), y[i:i + batch_size]) for i in range(0, per, batch_size))
            m = evaluate.summarize(*evaluate.predict(net, batches), aggregate)
            out[name, severity] = {k: m[k] for k in ("acc", "nll", "ece")}
    return out


def corruption_names(spec, channels=3):
    """The corruptions a --corruptions value asks for; 'all' leaves out the colour-only ones on
    one-channel images, naming one of them there is an error."""
    if not spec:
        return []
    if spec == "all":
        return [n for n in CORRUPTIONS if channels == 3 or n not in COLOUR_ONLY]
    names = spec.split(",")
    if channels != 3 and any(n in COLOUR_ONLY for n in names):
        raise ValueError(f"--corruptions: {', '.join(n for n in names if n in COLOUR_ONLY)} changes colour; "
                         f"these images have {channels} channel(s)")
    return names


def report_image_checkpoint(net, batches, args, aggregate, test_data=None, normalize=None):
    """Metrics of a vision checkpoint on its test batches (what `train_vision.py --eval-only` prints),
    plus the corruption table (test_data: the uint8 test set, normalize: its normalisation) and
    the reliability diagram when asked for."""
    logits, labels = evaluate.predict(net, batches)
    result = {**evaluate.summarize(logits, labels, aggregate), **evaluate.parameter_counts(net)}
    names = corruption_names(args.corruptions, test_data["x"].shape[1] if isinstance(test_data, dict) else 3)
    if args.corruptions_dir:  # the published files: every corruption they hold
        table = corruption_table_from_files(net, args.corruptions_dir, normalize, aggregate, args.batch_size)
        names = list(dict.fromkeys(n for n, _ in table))
    elif names:
        table = corruption_table(net, test_data, normalize, names, aggregate, args.batch_size)
    if names:
        result["corruptions"] = {f"{n}/{s}": v for (n, s), v in table.items()}
        result["corruption_acc_by_severity"] = [sum(table[n, s]["acc"] for n in names) / len(names)
                                                for s in range(1, 6)]
    if args.plot:
        evaluate.plot_reliability(neurotrails.soft_vote(logits, aggregate), labels, args.plot,
                         Path(args.checkpoint).resolve().parent.name)
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)  # stdout stays one JSON object
    if args.json:
        print(json.dumps(result))
        return
    corruptions = result.pop("corruptions", None)
    by_severity = result.pop("corruption_acc_by_severity", None)
    print(" | ".join(f"{k} {evaluate.rounded(v)}" for k, v in result.items()))
    if corruptions:
        print(f"\n{'corruption':<18}" + "".join(f"{'sev ' + str(s):>9}" for s in range(1, 6)) + "   (accuracy %)")
        for n in names:
            print(f"{n:<18}" + "".join(f"{100 * corruptions[f'{n}/{s}']['acc']:>9.2f}" for s in range(1, 6)))
        print(f"{'mean':<18}" + "".join(f"{100 * a:>9.2f}" for a in by_severity))
        for metric in ("nll", "ece"):  # calibration under shift, mean over the corruptions
            print(f"{'mean ' + metric.upper():<18}" + "".join(
                f"{sum(corruptions[f'{n}/{s}'][metric] for n in names) / len(names):>9.3f}" for s in range(1, 6)))


if __name__ == "__main__":
    main()
