"""Every command line refuses bad input the same way: one line on stderr naming the flag and what is
valid, exit code != 0, no traceback, nothing written. The table below holds the cases (at least 150
over the seven command lines: train_vision.py, train_lm.py, evaluate.py and its flops and lm-eval
subcommands, export_bench.py, neurotrails.py). Flags are checked before data are loaded, so each
case takes well under a second (a few load a checkpoint or the data to find what is wrong)."""
import shutil
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import export_bench
import neurotrails
import train_lm
import train_vision
from test_train_lm import write_corpus

DEBIAN = Path("/usr/share/datasets/fashion-mnist")

VISION = ["--dataset", "fashion-mnist", "--model", "wrn10-1", "--train-subset", "64", "--test-subset", "32",
          "--batch-size", "16", "--epochs", "1", "--budget", "equal", "--num-heads", "2", "--blocks-in-head", "2", "--delta-t", "2",
          "--data-dir", "{data}", "--out", "{out}"]
LM = ["--dataset", "text", "--data-dir", "{corpus}", "--tokenizer", "{tok}", "--model", "llama-9m", "--seq-len", "16",
      "--batch-size", "2", "--micro-batch-size", "1", "--updates", "2", "--budget", "equal", "--eval-tokens", "50", "--out", "{out}"]

V, L = "train_vision", "train_lm"
E, F, H, X, N = "evaluate", "evaluate flops", "evaluate lm-eval", "export_bench", "neurotrails"
VE, LE = "train_vision --eval-only", "train_lm --eval-only"
CASES = [
    # train_vision.py: silently wrong before
    (V, ["--epochs", "0"], "argument --epochs: must be an integer >= 1, got 0"),
    (V, ["--epochs", "-1"], "argument --epochs: must be an integer >= 1"),
    (V, ["--epochs", "1.5"], "argument --epochs: expected an integer, got '1.5'"),
    (V, ["--epochs", "nan"], "argument --epochs: expected an integer"),
    (V, ["--train-subset", "0"], "argument --train-subset: must be an integer >= 1, got 0"),
    (V, ["--train-subset", "-5"], "argument --train-subset: must be an integer >= 1"),
    (V, ["--test-subset", "0"], "argument --test-subset: must be an integer >= 1"),
    (V, ["--drop-fraction", "-1"], "argument --drop-fraction: must be a finite number in [0, 1], got -1"),
    (V, ["--drop-fraction", "2"], "argument --drop-fraction: must be a finite number in [0, 1], got 2"),
    (V, ["--drop-fraction", "nan"], "argument --drop-fraction: must be a finite number in [0, 1], got nan"),
    (V, ["--drop-fraction", "inf"], "argument --drop-fraction: must be a finite number"),
    (V, ["--delta-t", "0"], "argument --delta-t: must be an integer >= 1, got 0"),
    (V, ["--delta-t", "-1"], "argument --delta-t: must be an integer >= 1"),
    (V, ["--num-heads", "0"], "argument --num-heads: must be an integer in [1, 64], got 0"),
    (V, ["--num-heads", "-1"], "argument --num-heads: must be an integer in [1, 64]"),
    (V, ["--num-heads", "100000000"], "argument --num-heads: must be an integer in [1, 64], got 100000000"),
    (V, ["--num-heads", "65"], "argument --num-heads: must be an integer in [1, 64]"),
    (V, ["--blocks-in-head", "0"], "argument --blocks-in-head: must be an integer >= 1, got 0"),
    (V, ["--blocks-in-head", "4"], "--blocks-in-head must be in [1, 3] for wrn10-1, got 4"),
    (V, ["--sparsity", "1"], "argument --sparsity: must be a finite number in [0, 1), got 1"),
    (V, ["--sparsity", "-0.2"], "argument --sparsity: must be a finite number in [0, 1)"),
    (V, ["--sparsity", "nan"], "argument --sparsity: must be a finite number in [0, 1), got nan"),
    (V, ["--sparsity", "inf"], "argument --sparsity: must be a finite number"),
    (V, ["--sparsity", "0"], "--method neurotrails needs --sparsity > 0"),
    (V, ["--lr", "0"], "argument --lr: must be a finite number > 0, got 0"),
    (V, ["--lr", "-1"], "argument --lr: must be a finite number > 0"),
    (V, ["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    (V, ["--lr", "inf"], "argument --lr: must be a finite number > 0, got inf"),
    (V, ["--lr", "abc"], "argument --lr: expected a number, got 'abc'"),
    (V, ["--momentum", "-0.1"], "argument --momentum: must be a finite number in [0, 1)"),
    (V, ["--momentum", "1"], "argument --momentum: must be a finite number in [0, 1), got 1"),
    (V, ["--momentum", "nan"], "argument --momentum: must be a finite number"),
    (V, ["--weight-decay", "-1"], "argument --weight-decay: must be a finite number >= 0"),
    (V, ["--weight-decay", "nan"], "argument --weight-decay: must be a finite number >= 0, got nan"),
    (V, ["--weight-decay", "inf"], "argument --weight-decay: must be a finite number"),
    (V, ["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
    (V, ["--batch-size", "-3"], "argument --batch-size: must be an integer >= 1"),
    (V, ["--batch-size", "1000"], "--batch-size 1000 is larger than the training set (64)"),
    (V, ["--seed", "-1"], "argument --seed: must be an integer in [0, 4294967295], got -1"),
    (V, ["--seed", str(2**70)], "argument --seed: must be an integer in [0, 4294967295]"),
    (V, ["--workers", "-1"], "argument --workers: must be an integer in [0, 256]"),
    (V, ["--device", "nosuch"], "--device must be cpu, cuda or cuda:N, got 'nosuch'"),
    (V, ["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
    (V, ["--device", "cuda:99"], "--device cuda:99: this machine has"),
    (V, ["--data-dir", ""], "--data-dir must name a folder"),
    (V, ["--dataset", "mnist"], "argument --dataset: invalid choice: 'mnist'"),
    (V, ["--model", "vgg11"], "--model: unknown model 'vgg11'"),
    (V, ["--model", "wrn11-1"], "WRN depth must be 6n+4"),
    (V, ["--model", "llama-9m"], "--model llama-9m is a language model; train it with train_lm.py"),
    (V, ["--method", "foo"], "argument --method: invalid choice: 'foo'"),
    (V, ["--compare", "single,foo"], "--compare: unknown method 'foo'"),
    (V, ["--compare", "single", "--resume", "{vckpt}"], "--resume continues one run; it cannot be combined"),
    (V, ["--grow", "foo"], "argument --grow: invalid choice: 'foo'"),
    (V, ["--allocation", "foo"], "argument --allocation: invalid choice: 'foo'"),
    (V, ["--init", "foo"], "argument --init: invalid choice: 'foo'"),
    (V, ["--aggregate", "foo"], "argument --aggregate: invalid choice: 'foo'"),
    (V, ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (V, ["--config", "{junk}"], "not a run's config.json or results.json"),
    (V, ["--config", "{out}/none.json"], "not a run's config.json or results.json (No such file"),
    (V, ["--sweep", "epochs"], "--sweep 'epochs': expected FLAG=V1,V2"),
    (V, ["--sweep", "blocks-in-head=1,4"], "sweep point blocks-in-head=4_seed=0: --blocks-in-head must be in [1, 3]"),
    (V, ["--sweep", "epochs=1,0"], "argument --epochs: must be an integer >= 1, got 0"),
    (V, ["--seeds", "0,0"], "--seeds 0,0: seeds must be distinct"),
    (V, ["--sweep", "seed=1,2"], "--seed cannot be swept (use --seeds)"),
    (V, ["--out", "{file}"], "is a file, not a folder"),
    (V, ["--out", "{file}/sub"], "cannot create or write it"),
    (V, ["--out", "{run}"], "already holds a run (log.jsonl and last.pt); continue it with --resume"),
    (V, ["--resume", "{out}/nope.pt"], "no such checkpoint"),
    (V, ["--resume", "{junk}"], "not a checkpoint of this project (unreadable"),
    (V, ["--resume", "{plain}"], "not a checkpoint of this project (no train_vision.py / train_lm.py state)"),
    (V, ["--resume", "{lmckpt}"], "written by train_lm.py, not train_vision.py; use train_lm.py for it"),
    (V, ["--resume", "{lacking}"], "incomplete train_vision.py checkpoint (lacks optimizer)"),
    (V, ["--resume", "{vckpt}", "--sparsity", "0.5"], "different configuration (sparsity: checkpoint 0.8 vs now 0.5)"),
    # train_lm.py
    (L, ["--updates", "0"], "argument --updates: must be an integer >= 1, got 0"),
    (L, ["--updates", "-1"], "argument --updates: must be an integer >= 1"),
    (L, ["--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (L, ["--micro-batch-size", "0"], "argument --micro-batch-size: must be an integer >= 1"),
    (L, ["--batch-size", "4", "--micro-batch-size", "3"], "--micro-batch-size 3 must divide the 4 sequences"),
    (L, ["--seq-len", "0"], "argument --seq-len: must be an integer in [2, 1048576], got 0"),
    (L, ["--seq-len", "1"], "argument --seq-len: must be an integer in [2, 1048576]"),
    (L, ["--temperature", "nan"], "argument --temperature: must be a finite number in (0, 1000], got nan"),
    (L, ["--temperature", "-3"], "argument --temperature: must be a finite number in (0, 1000]"),
    (L, ["--temperature", "inf"], "argument --temperature: must be a finite number"),
    (L, ["--temperature", "0"], "argument --temperature: must be a finite number in (0, 1000], got 0"),
    (L, ["--min-lr-ratio", "-1"], "argument --min-lr-ratio: must be a finite number in [0, 1], got -1"),
    (L, ["--min-lr-ratio", "2"], "argument --min-lr-ratio: must be a finite number in [0, 1]"),
    (L, ["--min-lr-ratio", "nan"], "argument --min-lr-ratio: must be a finite number"),
    (L, ["--warmup", "-0.1"], "argument --warmup: must be a finite number in [0, 1)"),
    (L, ["--warmup", "1"], "argument --warmup: must be a finite number in [0, 1), got 1"),
    (L, ["--warmup", "nan"], "argument --warmup: must be a finite number"),
    (L, ["--lr", "0"], "argument --lr: must be a finite number > 0, got 0"),
    (L, ["--lr", "-1"], "argument --lr: must be a finite number > 0"),
    (L, ["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    (L, ["--lr", "inf"], "argument --lr: must be a finite number > 0, got inf"),
    (L, ["--weight-decay", "-1"], "argument --weight-decay: must be a finite number >= 0"),
    (L, ["--weight-decay", "nan"], "argument --weight-decay: must be a finite number"),
    (L, ["--drop-fraction", "-1"], "argument --drop-fraction: must be a finite number in [0, 1]"),
    (L, ["--drop-fraction", "2"], "argument --drop-fraction: must be a finite number in [0, 1]"),
    (L, ["--drop-fraction", "nan"], "argument --drop-fraction: must be a finite number in [0, 1], got nan"),
    (L, ["--delta-t", "0"], "argument --delta-t: must be an integer >= 1, got 0"),
    (L, ["--delta-t", "-1"], "argument --delta-t: must be an integer >= 1"),
    (L, ["--stop-after", "-1"], "argument --stop-after: must be an integer >= 1, got -1"),
    (L, ["--stop-after", "0"], "argument --stop-after: must be an integer >= 1"),
    (L, ["--eval-tokens", "0"], "argument --eval-tokens: must be an integer >= 1"),
    (L, ["--eval-every", "0"], "argument --eval-every: must be an integer >= 1"),
    (L, ["--log-every", "0"], "argument --log-every: must be an integer >= 1"),
    (L, ["--save-every", "0"], "argument --save-every: must be an integer >= 1"),
    (L, ["--seed", str(2**70)], "argument --seed: must be an integer in [0, 4294967295]"),
    (L, ["--seed", "-1"], "argument --seed: must be an integer in [0, 4294967295]"),
    (L, ["--num-heads", "0"], "argument --num-heads: must be an integer in [1, 64], got 0"),
    (L, ["--num-heads", "100000000"], "argument --num-heads: must be an integer in [1, 64]"),
    (L, ["--blocks-in-head", "0"], "argument --blocks-in-head: must be an integer >= 1"),
    (L, ["--blocks-in-head", "5"], "--blocks-in-head must be in [1, 4] for llama-9m, got 5"),
    (L, ["--sparsity", "1"], "argument --sparsity: must be a finite number in [0, 1)"),
    (L, ["--sparsity", "nan"], "argument --sparsity: must be a finite number in [0, 1), got nan"),
    (L, ["--sparsity", "0"], "--method neurotrails needs --sparsity > 0"),
    (L, ["--train-tokenizer", "10"], "argument --train-tokenizer: must be an integer in [259, 1048576], got 10"),
    (L, ["--dataset", "c4", "--train-tokenizer", "300"], "--train-tokenizer needs --dataset text"),
    (L, ["--data-workers", "2"], "argument --data-workers: invalid choice: 2"),
    (L, ["--device", "nosuch"], "--device must be cpu, cuda or cuda:N, got 'nosuch'"),
    (L, ["--device", "cuda:99"], "--device cuda:99: this machine has"),
    (L, ["--model", "wrn28-10"], "--model 'wrn28-10' is not a language model"),
    (L, ["--model", "llama-1b"], "--model 'llama-1b' is not a language model"),
    (L, ["--method", "pruning"], "argument --method: invalid choice: 'pruning'"),
    (L, ["--prune", "foo"], "argument --prune: invalid choice: 'foo'"),
    (L, ["--compare", "single,foo"], "--compare: unknown method 'foo'"),
    (L, ["--compare", "single", "--resume", "{lmckpt}"], "--resume continues one run; it cannot be combined"),
    (L, ["--config", "{file}"], "not a run's config.json or results.json"),
    (L, ["--sweep", "model=llama-9m,nosuch"], "sweep point model=nosuch_seed=0: --model 'nosuch' is not a language"),
    (L, ["--seeds", "a"], "--seeds 'a': expected comma-separated integers"),
    (L, ["--data-dir", "{out}/nope"], "no such folder"),
    (L, ["--data-dir", "{badtext}"], "needs at least 2 non-empty UTF-8 .txt/.md/.rst files, found 1 (2 skipped)"),
    (L, ["--tokenizer", "{binary}"], "--tokenizer"),
    (L, ["--tokenizer", "{file}"], "not a tokenizer file"),
    (L, ["--tokenizer", "{emptydir}"], "not a tokenizer file or folder"),
    (L, ["--tokenizer", "no-such-org/no-such-tokenizer"], "not in the local cache and the HuggingFace hub cannot"),
    (L, ["--dataset", "c4", "--data-dir", "{emptydir}"], "no C4 train shards"),
    (L, ["--resume", "{vckpt}"], "written by train_vision.py, not train_lm.py; use train_vision.py for it"),
    (L, ["--resume", "{junk}"], "not a checkpoint of this project (unreadable"),
    (L, ["--resume", "{out}/nope.pt"], "no such checkpoint"),
    (L, ["--resume", "{lmckpt}", "--sparsity", "0.2"], "different configuration (sparsity: checkpoint 0.1 vs now 0.2)"),
    (L, ["--out", "{file}"], "is a file, not a folder"),
    (L, ["--out", "{lmrun}"], "already holds a run"),
    (L, ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    # evaluate.py
    (E, [], "choose a command: history, flops, report or lm-eval"),
    (E, ["--checkpoint", "{vckpt}", "--json"], "python train_vision.py --eval-only --checkpoint {vckpt} --json"),
    (E, ["--checkpoint", "{lmckpt}"], "python train_lm.py --eval-only --checkpoint {lmckpt}"),
    (VE, ["--checkpoint", "{out}/nope.pt"], "--checkpoint {out}/nope.pt: no such checkpoint"),
    (VE, ["--checkpoint", "{junk}"], "--checkpoint {junk}: not a checkpoint of this project"),
    (VE, ["--checkpoint", "{plain}"], "not a checkpoint of this project"),
    (VE, ["--checkpoint", "{lacking}"], "--checkpoint {lacking}: incomplete train_vision.py checkpoint"),
    (VE, ["--checkpoint", "{vckpt}", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
    (VE, ["--checkpoint", "{vckpt}", "--grid-with", "{vckpt}"], "--grid-with adds a second model to --heads-grid"),
    (VE, ["--checkpoint", "{vckpt}", "--corruptions-dir", "{emptydir}"], "no labels.npy (expected the CIFAR-100-C"),
    (VE, ["--checkpoint", "{vckpt}", "--corruptions-dir", "{emptydir}", "--corruptions"], "give one"),
    (VE, ["--checkpoint", "{vckpt}", "--heads-grid", "{emptydir}/g.png", "--grid-with", "{lmckpt}"],
     "--grid-with {lmckpt} was written by train_lm.py, not train_vision.py"),
    (VE, ["--checkpoint", "{vckpt}", "--heads-grid", "{out}/no/dir/g.png"], "--heads-grid"),
    (LE, ["--checkpoint", "{lmckpt}", "--heads-grid", "{emptydir}/g.png"], "--heads-grid is for image checkpoints"),
    (VE, ["--checkpoint", "{vckpt}", "--plot", "{out}/no/such/dir/rel.png"], "--plot"),
    (VE, ["--checkpoint", "{vckpt}", "--plot", "{emptydir}"], "--plot {emptydir}: name a figure file ending in .png"),
    (E, ["history", "{out}/nope.jsonl"], "{out}/nope.jsonl: no such log file"),
    (E, ["history", "{vlog}", "{lmlog}"], "either vision logs or language-model logs, not both"),
    (E, ["history", "{file}"], "{file}"),
    (E, ["report", "--out", "{out}/r"], "give run folders, --rows files and/or --bench files"),
    (E, ["report", "--rows", "{junk}", "--out", "{out}/r"], "--rows {junk}: not a results.csv"),
    (E, ["report", "--rows", "{vlog}", "--out", "{out}/r"], "--rows {vlog}: not a results.csv"),
    (E, ["report", "--rows", "{out}/missing.csv", "--out", "{out}/r"], "--rows {out}/missing.csv: cannot read"),
    (E, ["report", "{out}/missing", "--out", "{out}/r"], "no such folder"),
    (E, ["report", "--bench", "{junk}", "--out", "{out}/r"], "not an export_bench.py --json file"),
    (E, ["report", "--bench", "{vlog}", "--out", "{out}/r"], "not an export_bench.py --json file"),
    (E, ["report", "{emptydir}", "--out", "{file}"], "is a file, not a folder"),
    (E, ["history", "{vlog}", "--plot", "{out}/no/such/dir/h.png"], "--plot"),
    (VE, ["--checkpoint", "{vckpt}", "--corruptions", "frost"], "--corruptions: unknown corruption in 'frost'"),
    (VE, ["--checkpoint", "{vckpt}", "--corruptions", "fog,saturate"],
     "--corruptions: saturate changes colour; these images have 1 channel(s)"),
    (VE, ["--checkpoint", "{vckpt}", "--aggregate", "foo"], "argument --aggregate: invalid choice: 'foo'"),
    (VE, ["--checkpoint", "{vckpt}", "--image-folder", "{out}/nope"], "--image-folder {out}/nope: no such folder"),
    (VE, ["--checkpoint", "{vckpt}", "--image-folder", "{file}"], "--image-folder {file}: no such folder"),
    (E, ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    # evaluate.py flops
    (F, ["--num-heads", "0"], "argument --num-heads: must be an integer in [1, 64], got 0"),
    (F, ["--num-heads", "100000000"], "argument --num-heads: must be an integer in [1, 64]"),
    (F, ["--epochs", "nan"], "argument --epochs: must be a finite number > 0, got nan"),
    (F, ["--epochs", "inf"], "argument --epochs: must be a finite number > 0, got inf"),
    (F, ["--epochs", "-1"], "argument --epochs: must be a finite number > 0"),
    (F, ["--epochs", "0"], "argument --epochs: must be a finite number > 0, got 0"),
    (F, ["--single-epochs", "0"], "argument --single-epochs: must be a finite number > 0"),
    (F, ["--sparsity", "1"], "argument --sparsity: must be a finite number in [0, 1)"),
    (F, ["--sparsity", "nan"], "argument --sparsity: must be a finite number in [0, 1), got nan"),
    (F, ["--image-size", "0"], "argument --image-size: must be an integer in [8, 4096], got 0"),
    (F, ["--seq-len", "0"], "argument --seq-len: must be an integer in [1, 1048576], got 0"),
    (F, ["--num-classes", "0"], "argument --num-classes: must be an integer >= 1, got 0"),
    (F, ["--train-examples", "0"], "argument --train-examples: must be an integer >= 1"),
    (F, ["--delta-t", "-1"], "argument --delta-t: must be an integer >= 0, got -1"),
    (F, ["--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (F, ["--model", "vgg11"], "--model: unknown model 'vgg11'"),
    (F, ["--blocks-in-head", "13"], "--blocks-in-head must be in [1, 12] for wrn28-10, got 13"),
    (F, ["--allocation", "foo"], "argument --allocation: invalid choice: 'foo'"),
    # evaluate.py lm-eval
    (H, [], "the following arguments are required: --checkpoint"),
    (H, ["--checkpoint", "{lmckpt}", "--num-fewshot", "-1"], "argument --num-fewshot: must be an integer >= 0"),
    (H, ["--checkpoint", "{lmckpt}", "--limit", "0"], "argument --limit: must be an integer >= 1, got 0"),
    (H, ["--checkpoint", "{lmckpt}", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (H, ["--checkpoint", "{lmckpt}", "--tasks", ""], "--tasks: give at least one task name"),
    (H, ["--checkpoint", "{lmckpt}", "--tasks", ","], "--tasks: give at least one task name"),
    (H, ["--checkpoint", "{lmckpt}", "--include-path", "{out}/nope"], "--include-path {out}/nope: no such folder"),
    (H, ["--checkpoint", "{lmckpt}", "--device", "nosuch"], "--device must be cpu, cuda or cuda:N"),
    (H, ["--checkpoint", "{vckpt}"], "written by train_vision.py, not train_lm.py"),
    (H, ["--checkpoint", "{junk}"], "--checkpoint {junk}: not a checkpoint of this project"),
    (H, ["--checkpoint", "{out}/nope.pt"], "--checkpoint {out}/nope.pt: no such checkpoint"),
    (H, ["--checkpoint", "{lmckpt}", "--aggregate", "foo"], "argument --aggregate: invalid choice: 'foo'"),
    # export_bench.py
    (X, ["bench", "--json", "{out}/no/such/dir/b.json"], "--json"),
    (X, ["table7", "--json", "{emptydir}"], "--json"),
    (X, ["export", "--num-heads", "0"], "argument --num-heads: must be an integer in [1, 64], got 0"),
    (X, ["export", "--sparsity", "1"], "argument --sparsity: must be a finite number in [0, 1)"),
    (X, ["export", "--sparsity", "nan"], "argument --sparsity: must be a finite number in [0, 1), got nan"),
    (X, ["export", "--checkpoint", "{out}/nope.pt"], "--checkpoint {out}/nope.pt: no such checkpoint"),
    (X, ["export", "--checkpoint", "{junk}"], "not a checkpoint of this project"),
    (X, ["export", "--checkpoint", "{lmckpt}"], "written by train_lm.py, not train_vision.py"),
    (X, ["export", "--out", "{out}/no/such/dir/m.onnx"], "--out"),
    (X, ["export", "--out", "{emptydir}"], "--out {emptydir} is a folder"),
    (X, ["export", "--image-size", "0"], "argument --image-size: must be an integer in [8, 4096], got 0"),
    (X, ["export", "--num-classes", "0"], "argument --num-classes: must be an integer >= 1"),
    (X, ["export", "--model", "wrn10-1", "--blocks-in-head", "99"], "--blocks-in-head must be in [1, 3]"),
    (X, ["bench", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
    (X, ["bench", "--rounds", "0"], "argument --rounds: must be an integer >= 1, got 0"),
    (X, ["bench", "--threads", "-1"], "argument --threads: must be an integer in [0, 1024]"),
    (X, ["bench", "--num-heads", "100000000"], "argument --num-heads: must be an integer in [1, 64]"),
    (X, ["bench", "--engines", "tensorrt"], "--engines: unknown engine 'tensorrt'"),
    (X, ["bench", "--variants", "nt:abc"], "--variants: 'nt:abc' is not nt:<sparsity>"),
    (X, ["bench", "--variants", "moe"], "--variants: unknown variant 'moe'"),
    (X, ["bench", "--variants", "nt:1.5"], "the sparsity of 'nt:1.5' must be in (0, 1)"),
    (X, ["bench", "--variants", "nt:nan"], "the sparsity of 'nt:nan' must be in (0, 1)"),
    (X, ["bench", "--model", "wrn10-1", "--blocks-in-head", "9"], "--blocks-in-head must be in [1, 3]"),
    (X, ["table7", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (X, ["table7", "--model", "vgg11"], "--model: unknown model 'vgg11'"),
    (X, ["fly"], "argument command: invalid choice: 'fly'"),
    (X, [], "the following arguments are required: command"),
    # found by the new-user audit: tracebacks or silently something else before
    (V, ["--model", "wrn10-0"], "WRN width must be >= 1, got 0"),
    (V, ["--compare", ""], "--compare '': give comma-separated methods"),
    (V, ["--compare", "single,"], "--compare 'single,': give comma-separated methods"),
    (V, ["--seeds", ""], "--seeds '': expected comma-separated integers"),
    (V, ["--momentum", "0"], "--momentum 0: the paper's SGD is Nesterov, which needs a momentum > 0"),
    (V, ["--budget", "fair"], "argument --budget: invalid choice: 'fair'"),
    (L, ["--budget", "fair"], "argument --budget: invalid choice: 'fair'"),
    (L, ["--compare", ""], "--compare '': give comma-separated methods"),
    (L, ["--seeds", ""], "--seeds '': expected comma-separated integers"),
    (X, ["export", "--checkpoint", "{vckpt}", "--model", "wrn10-2"], "--model cannot be combined with it"),
    (X, ["export", "--checkpoint", "{vckpt}", "--sparsity", "0.5"], "--sparsity cannot be combined with it"),
    (X, ["export", "--checkpoint", "{vckpt}", "--num-heads=4"], "--num-heads cannot be combined with it"),
    # neurotrails.py
    (N, ["--num-heads", "0"], "argument --num-heads: must be an integer in [1, 64], got 0"),
    (N, ["--num-heads", "100000000"], "argument --num-heads: must be an integer in [1, 64]"),
    (N, ["--sparsity", "1"], "argument --sparsity: must be a finite number in [0, 1), got 1"),
    (N, ["--sparsity", "nan"], "argument --sparsity: must be a finite number in [0, 1), got nan"),
    (N, ["--sparsity", "-0.1"], "argument --sparsity: must be a finite number in [0, 1)"),
    (N, ["--blocks-in-head", "0"], "argument --blocks-in-head: must be an integer >= 1"),
    (N, ["--blocks-in-head", "13"], "--blocks-in-head must be in [1, 12] for wrn28-10, got 13"),
    (N, ["--num-classes", "0"], "argument --num-classes: must be an integer >= 1"),
    (N, ["--model", "llama-9m", "--vocab-size", "0"], "argument --vocab-size: must be an integer >= 1"),
    (N, ["--model", "foo"], "--model: unknown model 'foo'"),
    (N, ["--allocation", "foo"], "argument --allocation: invalid choice: 'foo'"),
    (N, ["--init", "foo"], "argument --init: invalid choice: 'foo'"),
]


def invoke(cli, argv, monkeypatch):
    if cli == "evaluate":
        monkeypatch.setattr(sys, "argv", ["evaluate.py", *argv])
        return evaluate.main()
    if cli == "neurotrails":
        monkeypatch.setattr(sys, "argv", ["neurotrails.py", *argv])
        return neurotrails.main()
    if cli in (VE, LE):
        return (train_vision if cli == VE else train_lm).main(["--eval-only", *argv])
    main = {"train_vision": train_vision.main, "train_lm": train_lm.main, "export_bench": export_bench.main,
            "evaluate flops": lambda a: evaluate.main(["flops", *a]),
            "evaluate lm-eval": lambda a: evaluate.main(["lm-eval", *a])}[cli]
    return main(argv)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Everything the cases point at, outside the folder each case runs in."""
    root = tmp_path_factory.mktemp("inputs")
    f = {"data": root / "data", "corpus": write_corpus(root / "corpus", 6), "emptydir": root / "emptydir"}
    f["emptydir"].mkdir()
    f["tok"] = root / "tok.json"
    f["tok"].write_text(train_lm.train_tokenizer(train_lm.text_files(f["corpus"], "train"), 300))
    f.update(file=root / "notes.txt", junk=root / "junk.pt", binary=root / "binary.bin", plain=root / "plain.pt")
    f["file"].write_text("just some text\n")
    f["junk"].write_bytes(b"\x00\x01 not a torch file")
    f["binary"].write_bytes(bytes(range(256)) * 8)
    torch.save({"a": 1}, f["plain"])
    badtext = f["badtext"] = root / "badtext"
    badtext.mkdir()
    (badtext / "empty.txt").write_text("")
    (badtext / "binary.txt").write_bytes(b"\xff\xfe\x00binary")
    (badtext / "good.txt").write_text("One paragraph of real text.\n")
    if DEBIAN.is_dir():
        train_vision.main([a.format(data=f["data"], out=root / "vrun") for a in VISION])
        f["vckpt"], f["vlog"] = root / "vrun" / "last.pt", root / "vrun" / "log.jsonl"
        shutil.copytree(root / "vrun", f.setdefault("run", root / "run"))
        state = torch.load(f["vckpt"], weights_only=True)
        del state["optimizer"]
        neurotrails.save_checkpoint(f.setdefault("lacking", root / "lacking.pt"), "train_vision.py", state)
    train_lm.main([a.format(corpus=f["corpus"], tok=f["tok"], out=root / "lmrun") for a in LM])
    f["lmckpt"], f["lmlog"], f["lmrun"] = root / "lmrun" / "last.pt", root / "lmrun" / "log.jsonl", root / "lmrun"
    return f


def test_the_table_covers_every_command_line():
    counts = {cli: sum(c[0] == cli for c in CASES) for cli in (V, L, E, F, H, X, N)}
    assert len(CASES) >= 150 and min(counts.values()) >= 10, counts


@pytest.mark.parametrize("cli,extra,match", CASES, ids=[f"{c[0]}:{' '.join(c[1])}" for c in CASES])
def test_bad_input_gets_one_clear_line_and_writes_nothing(cli, extra, match, files, tmp_path, monkeypatch, capsys):
    vision_files = ("{vckpt}", "{vlog}", "{run}", "{lacking}")
    if (cli == V or any(k in a for a in extra for k in vision_files)) and not DEBIAN.is_dir():
        pytest.skip("needs the Debian package dataset-fashion-mnist")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # anything written relative to the working directory shows up here
    out = tmp_path / "out"
    base = VISION if cli == V else LM if cli == L else []
    argv = [a.format(out=out, **{k: str(v) for k, v in files.items()}) for a in base + extra]
    snapshot = {p: p.stat().st_mtime_ns for p in Path(files["corpus"]).parent.rglob("*")}
    with pytest.raises(SystemExit) as exit_:
        invoke(cli, argv, monkeypatch)
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert exit_.value.code not in (0, None)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match.format(out=out, **{k: str(v) for k, v in files.items()}) in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == [], "a bad input wrote files"
    assert {p: p.stat().st_mtime_ns for p in Path(files["corpus"]).parent.rglob("*")} == snapshot


def range_checked_flags():
    """(command line, flag, kind, bounds) for every flag of the trainers and export_bench.py whose
    type is a range-checked int or float: each must refuse what lies outside its range."""
    import argparse
    parsers = [(V, train_vision.parse_args([])[0], []), (L, train_lm.parse_args([])[0], [])]
    ap = export_bench.parse_args(["table7"])[0]
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    parsers += [(X, p, [name]) for name, p in sub.choices.items()]
    for cli, parser, prefix in parsers:
        for action in parser._actions:
            bounds = getattr(action.type, "bounds", None)
            if bounds and action.option_strings:
                kind = "int" if action.type.__qualname__.startswith("int_in") else "float"
                yield cli, prefix, action.option_strings[0], kind, bounds


def out_of_range(kind, bounds):
    """Values each such flag must refuse, with the words of its one-line error."""
    lo, hi, lo_open, hi_open = bounds
    values = [("abc", "expected an integer" if kind == "int" else "expected a number")]
    if kind == "int":
        values += [(str(lo - 1), "must be an integer"), ("1.5", "expected an integer")]
        if hi is not None:
            values.append((str(hi + 1), "must be an integer"))
    else:
        values += [("nan", "must be a finite number"), ("inf", "must be a finite number")]
        if lo != float("-inf"):
            values.append((f"{lo:g}" if lo_open else f"{lo - 1:g}", "must be a finite number"))
        if hi != float("inf"):
            values.append((f"{hi:g}" if hi_open else f"{hi + 1:g}", "must be a finite number"))
    return values


RANGE_CASES = [(cli, [*prefix, flag, value], f"argument {flag}: {words}")
               for cli, prefix, flag, kind, bounds in range_checked_flags() for value, words in out_of_range(kind, bounds)]


def test_every_range_checked_flag_is_covered():
    assert len(RANGE_CASES) >= 150 and len(CASES) + len(RANGE_CASES) >= 400, (len(CASES), len(RANGE_CASES))


@pytest.mark.parametrize("cli,extra,match", RANGE_CASES, ids=[f"{c[0]}:{' '.join(c[1])}" for c in RANGE_CASES])
def test_every_range_checked_flag_refuses_out_of_range_values_in_one_line(cli, extra, match, tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        invoke(cli, [a.format(out=tmp_path / "out") for a in extra], monkeypatch)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    assert list(tmp_path.iterdir()) == [], "a bad input wrote files"
