"""Pretrain a small byte-level GPT five ways and compare the optimizer precisions.

Shows why srkern exists: the same model, initial weights and data order trained with
``fp32``, ``fp32-master`` ((BF16, FP32) mixed precision), ``bf16-nearest``, ``bf16-sr`` (BF16
weights and moments with stochastic rounding, no FP32 master copy: Ozkara, Yu and Park, AISTATS
2025) and ``bf16-kahan``; then one table of final loss / perplexity, memory per parameter and
speed, a plot of validation loss against step, and a JSON of every number. A sixth strategy,
``fp16-sr`` (an FP16 model, FP16 weights written with SR, FP32 moments), runs when named in
``--strategies`` (not by default: see ``DEFAULT_STRATEGIES``; AdamW only).

The optimizer is srkern's AdamW by default; ``--optimizer sgd|lion|adafactor`` trains with
``srkern.torch.SGD`` (momentum 0.9, Nesterov), ``Lion`` or ``Adafactor`` instead, each at its own
default learning rate and weight decay (``OPTIMIZER_DEFAULTS``, from a short sweep) and writing
into ``runs/pretrain/<optimizer>/`` so the runs do not overwrite AdamW's.

Run:  python python/pretrain.py
          (default: 119k parameters, 500 steps x 5 strategies; 2.6 min wall on 2 shared
          AMD EPYC cores at load average 4, one torch thread; writes runs/pretrain/)
      python python/pretrain.py --lr 1e-2 --strategies fp32-master,bf16-sr
      python python/pretrain.py --optimizer lion --seed 1   (writes runs/pretrain/lion/)
      python python/pretrain.py --strategies fp32,fp32-master,bf16-nearest,bf16-sr,bf16-kahan,fp16-sr
      python python/pretrain.py --device cuda --steps 3000 --n-layer 6 --n-embd 384
      mpirun -n 2 python python/pretrain.py --sharded   (srkern.torch.ShardedAdamW over 2 ranks)
      mpirun -n 2 python python/pretrain.py --sharded --optimizer lion   (ShardedLion; sgd: ShardedSGD)
      python python/pretrain.py --help

Corpus (no download): the ``.py`` files of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``), see :func:`load_corpus` for the file order, exclusions,
byte cap and train / validation split. The corpus differs between Python versions; its SHA-256
is recorded in the JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone, no install
import srkern.torch as srtorch  # noqa: E402
from srkern.precisions import param_dtype  # noqa: E402

# The strategies are srkern's precision modes (srkern.PRECISIONS), listed in the order the table
# shows them: the FP32 baselines first.
STRATEGIES = ("fp32", "fp32-master", "bf16-nearest", "bf16-sr", "bf16-kahan", "fp16-sr")
# What runs without --strategies: all but fp16-sr. A sixth 500-step run made the default demo
# 28% slower (69.6 s -> 89.0 s wall for `python python/pretrain.py` on the 2-core machine), and
# the README's table shows these five; fp16-sr is selectable, and the smoke test runs it.
DEFAULT_STRATEGIES = ("fp32", "fp32-master", "bf16-nearest", "bf16-sr", "bf16-kahan")
# Dtype of the model weights (and hence of activations and gradients) for each strategy: the
# mode's weight dtype, so fp32 computes in FP32, fp16-sr in FP16 (an FP16 model), every other
# strategy in BF16 (fp32-master keeps its FP32 master inside the optimizer).
# fp16-sr runs without loss scaling: at the default settings, 15% of the FP16 weight gradients
# of step 0 are subnormal and 0.008% flush to zero, yet the FP16 gradient is within 0.09% (norm)
# of the FP32 model's, against 0.7% for BF16, and fp16-sr ended level with fp32 (validation loss
# 2.2595 against 2.2600 after 500 steps). A larger model or a longer run may need one
# (srkern.torch.AdamW.step(grad_scale=1 / scale) unscales inside the kernel).
MODEL_DTYPE = {s: getattr(torch, param_dtype(s)) for s in STRATEGIES}
# Path components never read from the standard library: installed packages and test suites.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                           "__pycache__"})
VAL_EVERY_NTH_FILE = 10  # files 0, 10, 20, ... of the sorted list form the validation split

OPTIMIZERS = ("adamw", "sgd", "lion", "adafactor")
# Per-optimizer defaults of --lr and --weight-decay (and --betas for the two that have betas).
# Each new lr is the best of a sweep on fp32-master at the default scale (500 steps, seed 1234,
# the same warmup and cosine schedule, one torch thread; final validation loss in nats/byte;
# 2-core Intel Xeon, Dec 2026). AdamW keeps the demo's original lr 3e-3 (not re-swept).
#   sgd (momentum 0.9, Nesterov, no weight decay):
#       lr 0.03: 2.5006  0.05: 2.6292  0.1: 2.3895  0.3: 2.9406  1: nan  3: nan
#   lion (betas 0.9 0.99, weight decay 3e-4 / lr):
#       lr 1e-4: 3.4721  3e-4: 2.7091  1e-3: 2.5979  3e-3: 3.1917
#   adafactor (torch's beta2_decay -0.8, eps2 1e-3, d 1; eps1 2**-23; weight decay 3e-4 / lr):
#       lr 3e-3: 3.0298  1e-2: 2.4386  3e-2: 2.2902  0.1: 2.1708  0.3: 2.2275
#   (Adafactor's step is lr, capped at 1/sqrt(step), times the parameter's RMS: its lr is not
#   comparable to the others'.)
# Weight decay (matrices only, see param_groups): AdamW's 0.1 at lr 3e-3 shrinks a matrix by
# 3e-4 per peak step; Lion and Adafactor decay decoupled as ``p *= 1 - lr * weight_decay`` too,
# so theirs is 3e-4 / lr, the same shrink per peak step. SGD's weight decay is coupled L2 (added
# to the gradient, then scaled by lr and the momentum): 0.
# Adafactor's eps1 (the floor on its second-moment estimate is eps1**2), the same in every
# strategy. torch's default (None) is the machine epsilon of the weights: 2**-7 for BF16 weights,
# 2**-23 for FP32 weights and for fp32-master's FP32 master copy (srkern.adafactor_step). At
# that default every BF16 strategy ended near 2.45 against fp32-master's 2.17 (seed 1234),
# bf16-nearest, bf16-sr and bf16-kahan within 0.003 of each other: a floor of 2**-14 on the
# second moment damps most updates, a change of hyper-parameter rather than of rounding. 2**-23
# everywhere keeps fp32 and fp32-master as they were (to the bit) and compares only the rounding.
ADAFACTOR_EPS1 = 2.0 ** -23
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "adamw": dict(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95)),
    "sgd": dict(lr=0.1, weight_decay=0.0),
    "lion": dict(lr=1e-3, weight_decay=0.3, betas=(0.9, 0.99)),
    "adafactor": dict(lr=1e-1, weight_decay=0.003),
}


# ----------------------------------------------------------------------------------- config


@dataclasses.dataclass
class Config:
    """Everything that defines a run (stored in the JSON)."""
    steps: int = 500
    lr: float = 3e-3
    warmup: int = 20
    min_lr_frac: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    optimizer: str = "adamw"
    momentum: float = 0.9  # SGD only
    nesterov: bool = True  # SGD only
    batch_size: int = 16
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    eval_every: int = 25
    eval_batches: int = 4
    max_bytes: int = 4_000_000
    seed: int = 1234
    device: str = "cpu"
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    out: str = "runs/pretrain"
    sharded: bool = False
    # One thread: with two OpenMP threads on the shared 2-core machine a step took 6x longer
    # (204 ms against 33 ms at load average 5), as each parallel region waits for a thread
    # that another process has descheduled. Use 0 for torch's default on a machine of your own.
    threads: int = 1


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and the module header's layout kept."""


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Parse command-line flags into a :class:`Config`."""
    d = Config()
    p = argparse.ArgumentParser(
        description=__doc__.split("\nCorpus")[0],
        epilog="Writes table.md, results.json and val_loss.png into --out.",
        formatter_class=_HelpFormatter)
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per strategy")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                   help="srkern.torch.AdamW, SGD (Nesterov momentum), Lion or Adafactor")
    lrs = ", ".join(f"{k} {v['lr']:g}" for k, v in OPTIMIZER_DEFAULTS.items())
    wds = ", ".join(f"{k} {v['weight_decay']:g}" for k, v in OPTIMIZER_DEFAULTS.items())
    p.add_argument("--lr", type=float, default=argparse.SUPPRESS,
                   help=f"peak learning rate (linear warmup, cosine decay to min-lr-frac); "
                        f"default per optimizer: {lrs}")
    p.add_argument("--warmup", type=int, default=d.warmup, help="warmup steps")
    p.add_argument("--min-lr-frac", type=float, default=d.min_lr_frac,
                   help="final learning rate as a fraction of --lr")
    p.add_argument("--weight-decay", type=float, default=argparse.SUPPRESS,
                   help="weight decay of the matrices (not LayerNorm / embeddings): decoupled, "
                        f"but coupled L2 for SGD; default per optimizer: {wds}")
    p.add_argument("--betas", type=float, nargs=2, default=argparse.SUPPRESS,
                   help="AdamW or Lion beta1 beta2; default adamw 0.9 0.95, lion 0.9 0.99")
    p.add_argument("--eps", type=float, default=argparse.SUPPRESS,
                   help=f"AdamW epsilon (default {d.eps:g})")
    p.add_argument("--momentum", type=float, default=argparse.SUPPRESS,
                   help=f"SGD momentum (default {d.momentum:g})")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                   help="SGD Nesterov momentum (default on)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="sequences per step (summed over ranks with --sharded)")
    p.add_argument("--block-size", type=int, default=d.block_size, help="context length (bytes)")
    p.add_argument("--n-layer", type=int, default=d.n_layer, help="transformer blocks")
    p.add_argument("--n-head", type=int, default=d.n_head, help="attention heads")
    p.add_argument("--n-embd", type=int, default=d.n_embd, help="model width")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="steps between validation evaluations")
    p.add_argument("--eval-batches", type=int, default=d.eval_batches,
                   help="batches of fixed windows per evaluation")
    p.add_argument("--max-bytes", type=int, default=d.max_bytes,
                   help="cap on corpus bytes read from the standard library")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the initial weights, the batch order and the SR bits")
    p.add_argument("--device", choices=("cpu", "cuda"), default=d.device)
    p.add_argument("--strategies", default=",".join(d.strategies),
                   help=f"comma list out of {','.join(STRATEGIES)}")
    p.add_argument("--out", default=argparse.SUPPRESS,
                   help=f"output folder (default {d.out} for adamw, {d.out}/<optimizer> otherwise)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch CPU threads per process (0: torch's default)")
    p.add_argument("--sharded", action="store_true",
                   help="use srkern.torch.ShardedAdamW (ShardedSGD, ShardedLion with --optimizer) across "
                        "MPI ranks (launch with mpirun)")
    a = p.parse_args(argv)
    for name in ("lr", "weight_decay", "betas", "eps", "momentum", "nesterov", "out"):
        setattr(a, name, getattr(a, name, None))  # None: not given (per-optimizer default)
    strategies = tuple(s.strip() for s in a.strategies.split(",") if s.strip())
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or not strategies:
        p.error(f"--strategies: unknown {bad}; choose from {','.join(STRATEGIES)}")
    if a.n_embd % a.n_head:
        p.error("--n-embd must be a multiple of --n-head")
    for name in ("steps", "batch_size", "block_size", "n_layer", "n_head", "n_embd",
                 "eval_every", "eval_batches", "max_bytes"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    opt, od = a.optimizer, OPTIMIZER_DEFAULTS[a.optimizer]
    # Options another optimizer has no use for are refused rather than silently ignored.
    for flag, value, users in (("--betas", a.betas, ("adamw", "lion")),
                               ("--eps", a.eps, ("adamw",)), ("--momentum", a.momentum, ("sgd",)),
                               ("--nesterov", a.nesterov, ("sgd",))):
        if value is not None and opt not in users:
            p.error(f"{flag} applies to --optimizer {' or '.join(users)}, not {opt}")
    if opt != "adamw" and "fp16-sr" in strategies:
        p.error(f"--strategies fp16-sr needs --optimizer adamw: srkern.torch.{_CLASS[opt]} has no "
                "fp16-sr mode (its modes: fp32, fp32-master, bf16-nearest, bf16-sr, bf16-kahan)")
    if a.sharded and opt == "adafactor":
        p.error("--sharded needs --optimizer adamw, sgd or lion (srkern.torch.ShardedAdamW, ShardedSGD, "
                "ShardedLion): Adafactor's row and column statistics do not shard by flat ranges "
                "(README, \"Adafactor is not sharded\"), got --optimizer adafactor")
    lr = od["lr"] if a.lr is None else a.lr
    if lr < 0:
        p.error("--lr must be >= 0")
    betas = a.betas if a.betas is not None else od.get("betas", (d.beta1, d.beta2))
    return Config(steps=a.steps, lr=lr, warmup=a.warmup, min_lr_frac=a.min_lr_frac,
                  weight_decay=od["weight_decay"] if a.weight_decay is None else a.weight_decay,
                  beta1=betas[0], beta2=betas[1], eps=d.eps if a.eps is None else a.eps,
                  optimizer=opt, momentum=d.momentum if a.momentum is None else a.momentum,
                  nesterov=d.nesterov if a.nesterov is None else a.nesterov,
                  batch_size=a.batch_size, block_size=a.block_size, n_layer=a.n_layer,
                  n_head=a.n_head, n_embd=a.n_embd, eval_every=a.eval_every,
                  eval_batches=a.eval_batches, max_bytes=a.max_bytes, seed=a.seed,
                  device=a.device, strategies=strategies, sharded=a.sharded,
                  out=a.out if a.out is not None else (d.out if opt == "adamw"
                                                        else f"{d.out}/{opt}"),
                  threads=a.threads)


# ----------------------------------------------------------------------------------- corpus


@dataclasses.dataclass
class Corpus:
    train: torch.Tensor  # uint8 bytes
    val: torch.Tensor
    info: dict[str, Any]


def load_corpus(max_bytes: int) -> Corpus:
    """Read the standard library's ``.py`` files into fixed train and validation byte streams.

    Files: every ``*.py`` under ``sysconfig.get_paths()["stdlib"]`` whose relative path has no
    component in ``EXCLUDED_DIRS`` (site-packages, dist-packages, test, tests, idle_test,
    __pycache__), in order of their relative POSIX path (plain string sort). Files are read in
    that order until ``max_bytes`` have been read (the last file is truncated at the cap).
    File ``k`` of that order goes to the validation stream when ``k % 10 == 0``, otherwise to
    the training stream; each stream is the plain concatenation of its files' bytes.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    rels = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                  if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1]))
    train, val, used, total = [], [], 0, 0
    for k, rel in enumerate(rels):
        if total >= max_bytes:
            break
        data = (root / rel).read_bytes()[: max_bytes - total]
        (val if k % VAL_EVERY_NTH_FILE == 0 else train).append(data)
        total += len(data)
        used = k + 1
    tr, va = b"".join(train), b"".join(val)
    info = {"stdlib": str(root), "python": platform.python_version(), "files": used,
            "first_file": rels[0] if rels else None, "last_file": rels[used - 1] if used else None,
            "train_bytes": len(tr), "val_bytes": len(va),
            "sha256": hashlib.sha256(tr + b"\0" + va).hexdigest()}
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return Corpus(as_tensor(tr), as_tensor(va), info)


class Batches:
    """Deterministic batches: the same windows in the same order for every strategy.

    Training step ``s`` uses the windows starting at ``starts[s]``, drawn once from
    ``numpy.random.default_rng(seed)``; evaluation uses fixed, evenly spaced windows.
    With ``world > 1`` rank ``r`` takes rows ``r::world`` of each global batch.
    """

    def __init__(self, corpus: Corpus, cfg: Config, rank: int = 0, world: int = 1):
        t, b = cfg.block_size, cfg.batch_size
        for name, data in (("train", corpus.train), ("val", corpus.val)):
            if len(data) < t + 2:
                raise ValueError(f"{name} split has {len(data)} bytes, fewer than "
                                 f"--block-size + 2; raise --max-bytes")
        rng = np.random.default_rng(cfg.seed)
        self.starts = rng.integers(0, len(corpus.train) - t - 1, size=(cfg.steps, b))
        self.corpus, self.t, self.b, self.rank, self.world = corpus, t, b, rank, world
        self.device = torch.device(cfg.device)
        n_eval = cfg.eval_batches * b
        self.eval_starts = {
            name: np.linspace(0, len(data) - t - 1, n_eval).astype(np.int64)
            for name, data in (("train", corpus.train), ("val", corpus.val))}

    def _windows(self, data: torch.Tensor, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(starts)[:, None] + torch.arange(self.t + 1)[None, :]
        w = data[idx].long()
        return w[:, :-1].to(self.device), w[:, 1:].to(self.device)

    def train(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of training step ``step`` for this rank, shape (rows, block)."""
        return self._windows(self.corpus.train, self.starts[step][self.rank::self.world])

    def eval(self, split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed evaluation batches of ``split`` (``"train"`` or ``"val"``)."""
        data = self.corpus.train if split == "train" else self.corpus.val
        s = self.eval_starts[split]
        return [self._windows(data, s[i:i + self.b]) for i in range(0, len(s), self.b)]


# ------------------------------------------------------------------------------------ model

_HALF = (torch.bfloat16, torch.float16)  # the 16-bit model dtypes, computed through FP32 on CPU


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T``; on CPU, BF16 (FP16) operands are multiplied by an FP32 GEMM and rounded to
    BF16 (FP16).

    PyTorch's BF16 GEMM on CPUs without AVX512-BF16 / AMX was ~10x slower than FP32 here (an
    AMD EPYC with AVX2: 188 ms against 17 ms per default training step). Upcasting BF16 is
    exact, so the FP32 GEMM computes the same thing a GPU BF16 tensor-core GEMM does (exact
    products, FP32 accumulation, output rounded to BF16), up to summation order. Autograd
    rounds the gradients back to BF16 through the casts, so BF16 weights get BF16 gradients.
    The same holds for FP16 (``fp16-sr``): exact upcast, FP32 GEMM, output and gradients
    rounded to FP16, as an FP16 tensor-core GEMM computes.
    """
    if x.dtype in _HALF and x.device.type == "cpu":
        return F.linear(x.float(), w.float()).to(x.dtype)
    return F.linear(x, w)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention; on CPU, BF16 (FP16) inputs go through FP32, the output rounded back.

    As a GPU flash-attention kernel does with BF16 inputs (FP32 softmax and accumulation), and
    8x faster here than PyTorch's BF16 CPU attention backward (16 ms against 2 ms per call).
    """
    if q.dtype in _HALF and q.device.type == "cpu":
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention and a 4x GELU MLP."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.fc_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = _linear(self.ln1(x), self.qkv.weight).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = _attention(q, k, v)
        x = x + _linear(y.transpose(1, 2).reshape(b, t, c), self.proj.weight)
        return x + _linear(F.gelu(_linear(self.ln2(x), self.fc.weight)), self.fc_proj.weight)


class GPT(nn.Module):
    """Byte-level GPT (vocabulary 256), learned positions, output head tied to the embedding."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.wte = nn.Embedding(256, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg.n_embd, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-byte cross-entropy (nats), computed from FP32 logits."""
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = _linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.float().view(-1, 256), targets.reshape(-1))


def initial_state(cfg: Config) -> dict[str, torch.Tensor]:
    """FP32 initial weights (GPT-2 scheme), every value exactly representable in BF16.

    Rounding the initial weights to BF16 once makes the FP32 and BF16 strategies start from
    identical values, so the runs differ only in how they train. The FP16 model of ``fp16-sr``
    holds the same values rounded to nearest FP16: exact except where they lie below FP16's
    normal range with more significant bits than its subnormals keep (25 of the 119k default
    weights, each moved by at most 2**-25).
    """
    torch.manual_seed(cfg.seed)
    model = GPT(cfg)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith(("proj.weight",)) else 0.02
            nn.init.normal_(p, 0.0, std)
    return {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not embeddings, LayerNorm weights or biases)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() == 2 and not name.startswith(("wte", "wpe")) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup over ``cfg.warmup`` steps, then cosine decay to ``min_lr_frac * lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


# --------------------------------------------------------------------------------- training


_CLASS = {"adamw": "AdamW", "sgd": "SGD", "lion": "Lion", "adafactor": "Adafactor"}


def make_optimizer(model: nn.Module, strategy: str, cfg: Config, comm: Any = None):
    """srkern's ``cfg.optimizer`` (AdamW, SGD, Lion or Adafactor; ShardedAdamW, ShardedSGD or
    ShardedLion with ``comm``) in
    the strategy's precision mode."""
    groups = param_groups(model, cfg.weight_decay)
    common = dict(lr=cfg.lr, precision=strategy, seed=cfg.seed)
    if cfg.optimizer == "sgd":
        if comm is not None:
            return srtorch.ShardedSGD(groups, comm, momentum=cfg.momentum, nesterov=cfg.nesterov, **common)
        return srtorch.SGD(groups, momentum=cfg.momentum, nesterov=cfg.nesterov, **common)
    if cfg.optimizer == "lion":
        if comm is not None:
            return srtorch.ShardedLion(groups, comm, betas=(cfg.beta1, cfg.beta2), **common)
        return srtorch.Lion(groups, betas=(cfg.beta1, cfg.beta2), **common)
    if cfg.optimizer == "adafactor":  # torch.optim.Adafactor's defaults but eps1
        return srtorch.Adafactor(groups, eps=(ADAFACTOR_EPS1, 1e-3), **common)
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, precision=strategy,
              seed=cfg.seed)
    if comm is None:
        return srtorch.AdamW(groups, **kw)
    from srkern.torch import ShardedAdamW  # noqa: PLC0415 (only needed with --sharded)
    return ShardedAdamW(groups, comm=comm, **kw)


def optimizer_bytes_per_param(opt: Any, weight_bytes: int) -> float:
    """Bytes of optimizer state (moments, FP32 master, compensation) per parameter on this rank.

    ``bytes_per_param()`` of ``srkern.torch.AdamW`` (SGD, Lion, Adafactor) counts the weights
    too; ``ShardedAdamW``'s counts only this rank's optimizer state (plus its reduced-gradient
    shard), per model parameter.
    """
    if isinstance(opt, (srtorch.AdamW, srtorch.SGD, srtorch.Lion, srtorch.Adafactor)):
        return float(opt.bytes_per_param() - weight_bytes)
    return float(opt.bytes_per_param())


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean loss over fixed batches (equal sizes, so the mean of means is the mean)."""
    return float(np.mean([model(x, y).item() for x, y in batches]))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_one(strategy: str, init: dict[str, torch.Tensor], data: Batches, cfg: Config,
              comm: Any = None, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Train one strategy from ``init`` and return its history and final metrics."""
    from tqdm import tqdm  # noqa: PLC0415

    model = GPT(cfg)
    model.load_state_dict(init)
    model.to(device=cfg.device, dtype=MODEL_DTYPE[strategy])
    opt = make_optimizer(model, strategy, cfg, comm)
    evals = {"train": data.eval("train"), "val": data.eval("val")}
    hist: dict[str, list] = {"step": [], "val_loss": [], "train_loss_step": []}
    times: list[float] = []
    bar = tqdm(range(cfg.steps), desc=f"{strategy:>12}", disable=rank != 0, leave=True,
               dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
    for step in bar:
        if step % cfg.eval_every == 0:
            hist["step"].append(step)
            hist["val_loss"].append(evaluate(model, evals["val"]))
        x, y = data.train(step)
        _sync(cfg.device)
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss = model(x, y)
        loss.backward()
        if step == 0:  # BF16 (FP16) strategies must hand the optimizer BF16 (FP16) gradients
            dt = {p.grad.dtype for g in opt.param_groups for p in g["params"]}
            if dt != {MODEL_DTYPE[strategy]}:
                raise RuntimeError(f"{strategy}: gradient dtypes {dt}, expected "
                                   f"{MODEL_DTYPE[strategy]}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(cfg.device)
        times.append(time.perf_counter() - t0)
        hist["train_loss_step"].append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{hist['val_loss'][-1]:.3f}", refresh=False)
    bar.close()
    hist["step"].append(cfg.steps)
    hist["val_loss"].append(evaluate(model, evals["val"]))
    train_loss = evaluate(model, evals["train"])
    step_s = float(np.median(times[min(3, len(times) - 1):]))  # first steps: compile, warm-up
    w_bytes = torch.finfo(MODEL_DTYPE[strategy]).bits // 8
    o_bytes = optimizer_bytes_per_param(opt, w_bytes)
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "strategy": strategy, "params": n_params,
        "train_loss": train_loss, "train_ppl": math.exp(train_loss),
        "val_loss": hist["val_loss"][-1], "val_ppl": math.exp(hist["val_loss"][-1]),
        "weight_bytes_per_param": w_bytes, "optimizer_bytes_per_param": o_bytes,
        "grad_bytes_per_param": w_bytes,
        "weight_opt_bytes_per_param": w_bytes + o_bytes,
        "step_time_s": step_s, "tokens_per_s": cfg.batch_size * cfg.block_size / step_s,
        "train_time_s": float(np.sum(times)), "history": hist,
    }


# ---------------------------------------------------------------------------------- reports


def describe_optimizer(cfg: Config) -> str:
    """The optimizer and its hyper-parameters, as one line (the table's caption)."""
    name = ("Sharded" if cfg.sharded else "") + _CLASS[cfg.optimizer]
    extra = {"adamw": f", betas ({cfg.beta1:g}, {cfg.beta2:g}), eps {cfg.eps:g}",
             "sgd": f", momentum {cfg.momentum:g}{', Nesterov' if cfg.nesterov else ''}",
             "lion": f", betas ({cfg.beta1:g}, {cfg.beta2:g})",
             "adafactor": ""}[cfg.optimizer]
    return (f"srkern.torch.{name}, peak lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}{extra}, "
            f"{cfg.warmup} warmup steps, cosine to {cfg.min_lr_frac:g} x lr")


def format_table(results: list[dict[str, Any]], world: int = 1) -> str:
    """One Markdown table of the final numbers of every strategy.

    Bytes per parameter: weights plus optimizer state (moments, FP32 master, compensation),
    then plus the gradient (model dtype); with ``world > 1`` per rank, the optimizer state
    sharded by ShardedAdamW (its reduced-gradient shard included).
    """
    head = ("| strategy | train loss | train ppl | val loss | val ppl | weights+opt B/param "
            "| +grad B/param | step ms | tokens/s |")
    rows = [head, "|" + "---|" * 9]
    for r in results:
        rows.append(
            f"| {r['strategy']} | {r['train_loss']:.4f} | {r['train_ppl']:.3f} "
            f"| {r['val_loss']:.4f} | {r['val_ppl']:.3f} | {r['weight_opt_bytes_per_param']:g} "
            f"| {r['weight_opt_bytes_per_param'] + r['grad_bytes_per_param']:g} "
            f"| {1e3 * r['step_time_s']:.1f} | {r['tokens_per_s']:,.0f} |")
    if world > 1:
        rows.append(f"\nBytes per parameter are per rank: optimizer state sharded over {world} "
                    "ranks (reduced-gradient shard included), weights and gradients replicated.")
    return "\n".join(rows)


def plot(results: list[dict[str, Any]], cfg: Config, path: Path) -> None:
    """Validation loss against step for every strategy, and its gap to ``fp32-master``.

    The right panel subtracts the reference's curve (``fp32-master``, or the first strategy
    when it was not run), since the gaps are small against the fall of the loss itself.
    """
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    ref = next((r for r in results if r["strategy"] == "fp32-master"), results[0])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        h = r["history"]
        a1.plot(h["step"], h["val_loss"], marker=".", label=r["strategy"])
        gap = np.asarray(h["val_loss"]) - np.asarray(ref["history"]["val_loss"])
        a2.plot(h["step"], gap, marker=".", label=r["strategy"])
    a1.set(xlabel="step", ylabel="validation loss (nats/byte)", title="Validation loss")
    a2.set(xlabel="step", ylabel=f"val loss - {ref['strategy']} val loss",
           title=f"Gap to {ref['strategy']} (lower is better)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(f"byte-level GPT {cfg.n_layer}L x {cfg.n_embd}, ctx {cfg.block_size}, "
                 f"batch {cfg.batch_size}, {_CLASS[cfg.optimizer]} lr {cfg.lr:g}, "
                 f"{cfg.steps} steps, seed {cfg.seed}, "
                 f"{cfg.device}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_info(device: str) -> dict[str, Any]:
    """Where the numbers were measured."""
    info = {"platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f
                                if ln.startswith("model name")), "")
    except OSError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every selected strategy, print the table, write table.md / results.json / PNG."""
    cfg = parse_args(argv)
    comm, rank, world = None, 0, 1
    if cfg.sharded:
        try:
            from srkern.torch import ShardedAdamW  # noqa: F401, PLC0415
        except ImportError as e:
            raise SystemExit(f"--sharded needs srkern.torch.ShardedAdamW ({e})") from None
        from mpi4py import MPI  # noqa: PLC0415
        comm, rank, world = MPI.COMM_WORLD, MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
        if cfg.batch_size % world:
            raise SystemExit(f"--batch-size {cfg.batch_size} must be a multiple of the "
                             f"{world} ranks")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible to PyTorch")
        torch.cuda.set_device(rank % torch.cuda.device_count())
    t_start = time.perf_counter()
    corpus = load_corpus(cfg.max_bytes)
    data = Batches(corpus, cfg, rank, world)
    init = initial_state(cfg)
    results = [train_one(s, init, data, cfg, comm, rank, world) for s in cfg.strategies]
    wall = time.perf_counter() - t_start
    if rank != 0:
        return {}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(results, world)
    print(table)
    print(f"\n{results[0]['params']:,} parameters, {world} rank(s), wall time {wall:.1f} s; "
          f"outputs in {out}/")
    print(f"optimizer: {describe_optimizer(cfg)}")
    report = {"config": dataclasses.asdict(cfg), "corpus": corpus.info,
              "machine": machine_info(cfg.device), "world_size": world, "wall_time_s": wall,
              "results": results}
    (out / "table.md").write_text(f"{table}\n\noptimizer: {describe_optimizer(cfg)}\n")
    (out / "results.json").write_text(json.dumps(report, indent=1))
    plot(results, cfg, out / "val_loss.png")
    return report


if __name__ == "__main__":
    main()
