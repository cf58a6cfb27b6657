"""Train a character-level GPT on Tiny Shakespeare or on any UTF-8 text file.

    python gpt/train.py --preset cpu                       # a few minutes on a laptop CPU
    python gpt/train.py --preset gpu                       # 6 layers, 6 heads, 384 wide, block 256
    python gpt/train.py --text-file 1984.txt --preset cpu  # your own book
    torchrun --standalone --nproc_per_node=4 gpt/train.py --preset gpu   # data parallel (DDP)
"""
import dataclasses
import math
import os
import shutil
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from model import GPT, CharTokenizer, GPTConfig
from plumbing import (
    Clock,
    MetricsLog,
    autocast,
    config_dict,
    config_from_checkpoint,
    flag,
    load_checkpoint,
    make_out_dir,
    parse_config,
    require,
    rng_state,
    save_checkpoint,
    set_rng_state,
    setup,
    teardown,
)


@dataclass
class Config:
    """Train a character-level GPT (nanoGPT-style) on Tiny Shakespeare or on any UTF-8 text file.
    --preset cpu|gpu applies PRESETS before the explicit flags. With --max-minutes the cosine decay
    of the learning rate runs on the clock instead of over --steps, and the run (evaluations
    included) ends within that time with a checkpoint that --resume continues; so does a Ctrl-C."""
    # data
    dataset: Literal["shakespeare"] = "shakespeare"  # tinyshakespeare/input.txt, fetched if absent
    text_file: str | None = None  # train on this UTF-8 text file instead of --dataset (any book)
    data_dir: str = os.environ.get("DATA_DIR", "data")  # where datasets live ($DATA_DIR, or ./data)
    out_dir: str = "runs/gpt"  # checkpoints (ckpt.pt; best.pt by validation loss) and metrics.csv
    # model
    n_layer: int = 4  # number of Transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # width of the residual stream (a multiple of --n-head)
    block_size: int = 64  # context length in characters
    dropout: float = 0.0  # dropout on embeddings and residual branches (0.2 helps larger models)
    attn_dropout: float | None = None  # dropout on the attention weights (None: --dropout)
    bias: bool = False  # biases in Linear and LayerNorm layers
    # optimisation
    batch_size: int = 12  # sequences per step (per process under torchrun)
    steps: int = 2000  # optimiser steps
    lr: float = 1e-3  # peak AdamW learning rate
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 100  # linear learning-rate warmup
    weight_decay: float = 0.1  # AdamW weight decay, on matrices only
    beta2: float = 0.99  # AdamW beta2 (0.99: few tokens per step)
    grad_clip: float = 1.0  # clip the gradient norm to this (0: off)
    max_minutes: float = 0.0  # limit in minutes, evaluations included; lr decays over it (0: off)
    # evaluation, logging, checkpoints
    eval_interval: int = 250  # evaluate, print a sample and checkpoint every this many steps
    eval_batches: int = 50  # batches per split for the loss estimate
    sample_chars: int = 200  # characters of the sample printed at each evaluation (0: none)
    resume: str | None = None  # continue from this checkpoint (e.g. runs/gpt/ckpt.pt) exactly
    wandb: bool = False  # also log to Weights & Biases (WANDB_MODE=offline works)
    # hardware
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: cuda, then mps, then cpu
    threads: int = 0  # CPU threads for torch (0: torch's default)
    compile: bool = False  # torch.compile the model
    seed: int = 1337  # seeds Python, NumPy and torch

    def __post_init__(self):
        for name in ["n_layer", "n_head", "n_embd", "block_size", "batch_size", "steps",
                     "eval_interval", "eval_batches"]:
            value = getattr(self, name)
            require(value >= 1, f"{flag(name)} must be at least 1, got {value}")
        require(self.n_embd % self.n_head == 0,
                f"--n-embd {self.n_embd} is not a multiple of --n-head {self.n_head}")
        if self.attn_dropout is None:
            self.attn_dropout = self.dropout
        require(self.dropout < 1 and self.attn_dropout < 1,
                "--dropout and --attn-dropout must be below 1")
        require(self.lr > 0, f"--lr must be positive, got {self.lr}")
        require(self.beta2 < 1, f"--beta2 must be below 1, got {self.beta2}")


# Overrides applied before the explicit flags (so `--preset cpu --steps 100` runs 100 steps).
PRESETS = {
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, batch_size=16,
                lr=3e-3, min_lr=2e-4, warmup_steps=50, steps=10000,
                eval_interval=500, eval_batches=25),
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, batch_size=64,
                lr=1e-3, min_lr=1e-4, warmup_steps=100, steps=5000,
                eval_interval=250, eval_batches=200),
}
# What a --resume takes from the checkpoint's config (the model's shape and its text); every other
# field comes from this command line.
FROM_CHECKPOINT = ["n_layer", "n_head", "n_embd", "block_size", "bias", "text_file", "dataset"]
SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/"
                   "input.txt")
RESUME_KEYS = ["config", "vocab", "model", "optimizer", "step", "best_val", "seconds",
               "train_seconds", "rng", "batches"]
COLUMNS = ["step", "train_loss", "val_loss", "lr", "train_seconds", "tokens_per_second"]


def resume_config(cfg):
    """(cfg, checkpoint): with --resume, the checkpoint and the config to go on with: the model's
    shape and its text from the checkpoint, everything else from this command line."""
    if not cfg.resume:
        return cfg, None
    resume = load_checkpoint(cfg.resume, "gpt", keys=RESUME_KEYS)
    now = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in FROM_CHECKPOINT}
    return config_from_checkpoint(Config, resume, cfg.resume, **now), resume


# --------------------------------------------------------------------------------------------- data
def load_text(cfg):
    """The training text: --text-file, or Tiny Shakespeare from --data-dir (fetched if absent)."""
    if cfg.text_file:
        path = Path(cfg.text_file)
        if not path.is_file():
            sys.exit(f"error: text file {path} not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            sys.exit(f"error: {path} is not UTF-8 text ({e.reason} at byte {e.start})")
        if not text:
            sys.exit(f"error: text file {path} is empty")
        return text
    folder = Path(cfg.data_dir) / "tinyshakespeare"
    path = folder / "input.txt"
    if not path.exists():
        created = [p for p in [folder, *folder.parents] if not p.exists()]  # removed on failure
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
                data = response.read()
            path.with_suffix(".tmp").write_bytes(data)
            os.replace(path.with_suffix(".tmp"), path)
        except Exception as e:
            if created:
                shutil.rmtree(created[-1], ignore_errors=True)
            sys.exit(f"error: Tiny Shakespeare not found at {path} and the download failed "
                     f"({type(e).__name__}); put char-rnn's input.txt there, or point --data-dir / "
                     f"DATA_DIR at a folder holding tinyshakespeare/input.txt")
    return path.read_text(encoding="utf-8")


def load_data(cfg, vocab=None):
    """The text, its tokenizer (from `vocab` when resuming) and the 90/10 train/validation split of
    the encoded text, int64 tensors; each part must hold a block and its target."""
    text = load_text(cfg)
    tokenizer = CharTokenizer(vocab) if vocab else CharTokenizer.from_text(text)
    if tokenizer.unknown(text):
        sys.exit(f"error: the text has characters the checkpoint's vocabulary lacks: "
                 f"{tokenizer.unknown(text)!r}")
    data = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    n = int(0.9 * len(data))
    if len(data) - n < cfg.block_size + 1:
        sys.exit(f"error: --block-size {cfg.block_size} is too large for "
                 f"{cfg.text_file or 'Tiny Shakespeare'}: its {len(data)} characters leave "
                 f"{len(data) - n} for validation, fewer than block_size + 1; use a smaller "
                 f"--block-size or a longer text")
    return text, tokenizer, {"train": data[:n], "val": data[n:]}


def get_batch(data, block_size, batch_size, generator):
    """batch_size random windows of the text: inputs x (B, T), targets y = x shifted left by one."""
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    chunks = data[starts[:, None] + torch.arange(block_size + 1)]   # (B, T + 1)
    return chunks[:, :-1], chunks[:, 1:]


# ------------------------------------------------------------------------------- model and schedule
def build(cfg, vocab_size, device, rank, resume=None):
    """The model, its AdamW and this rank's generator of training windows, all as they were at the
    end of `resume` (a checkpoint) when given."""
    batches = torch.Generator().manual_seed(cfg.seed + rank)  # each rank draws its own windows
    model = GPT(GPTConfig(vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd,
                          cfg.dropout, cfg.attn_dropout, cfg.bias)).to(device)
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.lr, (0.9, cfg.beta2), device.type)
    if resume:
        load_weights(model, resume["model"], cfg.resume)
        optimizer.load_state_dict(resume["optimizer"])
        set_rng_state(resume["rng"])
        batches.set_state(resume["batches"][rank % len(resume["batches"])])
    return model, optimizer, batches


def load_weights(model, state_dict, path):
    """model.load_state_dict, or one line when the checkpoint's weights do not fit this model.py."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError:  # e.g. written before the modules took nanoGPT's names
        sys.exit(f"error: checkpoint {path} holds weights that do not fit this model.py "
                 f"(other module names or shapes)")


def lr_at(progress, cfg, step):
    """Linear warmup over warmup_steps, then cosine decay from lr to min_lr as progress (of --steps,
    or of --max-minutes when set) goes from 0 to 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


# ----------------------------------------------------------------- evaluation, sampling, checkpoint
@torch.no_grad()
def estimate_loss(model, splits, cfg, device):
    """Mean loss over eval_batches batches per split, always the same ones (a fixed generator)."""
    model.eval()
    losses = {}
    for name, data in splits.items():
        generator = torch.Generator().manual_seed(cfg.seed)
        total = 0.0
        for _ in range(cfg.eval_batches):
            x, y = get_batch(data, cfg.block_size, cfg.batch_size, generator)
            with autocast(device):
                total += model(x.to(device), y.to(device))[1].item()
        losses[f"{name}_loss"] = total / cfg.eval_batches
    model.train()
    return losses


def sample_text(model, tokenizer, prompt, cfg, device):
    """--sample-chars characters continuing the prompt (T,), always drawn with the same seed."""
    model.eval()
    out = model.generate(prompt[None].to(device), cfg.sample_chars, temperature=0.8, top_k=40,
                         generator=torch.Generator(device).manual_seed(cfg.seed))
    model.train()
    return tokenizer.decode(out[0].tolist()) + "\n" + "-" * 40


def save(out_dir, is_best, model, optimizer, tokenizer, cfg, batches, ddp, **state):
    """The run as plain data (config, vocabulary, weights, optimiser, RNGs and `state`) to ckpt.pt,
    and to best.pt when is_best. Every rank's batch generator goes in (a collective under DDP), so
    that a resumed run draws the same windows; rank 0 writes."""
    generators = [batches.get_state()]
    if ddp:
        generators = [None] * dist.get_world_size()
        dist.all_gather_object(generators, batches.get_state())
    if not ddp or dist.get_rank() == 0:
        ckpt = {"folder": "gpt", "config": config_dict(cfg), "vocab": tokenizer.chars,
                "model_config": dataclasses.asdict(model.config), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "rng": rng_state(), "batches": generators,
                **state}
        save_checkpoint(out_dir / "ckpt.pt", ckpt)  # the latest state: what --resume continues
        if is_best:  # the best validation loss so far: what sample.py loads by default
            save_checkpoint(out_dir / "best.pt", ckpt)


def evaluate(model, splits, tokenizer, cfg, device, log, bar, **row):
    """The loss on both splits, logged with `row` (metrics.csv, W&B) and printed, then a sample
    printed; returns the validation loss."""
    row.update(estimate_loss(model, splits, cfg, device))
    log.log(**row)
    bar.write(f"step {row['step']}: train {row['train_loss']:.4f}, val {row['val_loss']:.4f}, "
              f"{row['train_seconds']:.0f} s, {row['tokens_per_second']:,.0f} tokens/s")
    if cfg.sample_chars:
        bar.write(sample_text(model, tokenizer, splits["train"][:1], cfg, device))
    return row["val_loss"]


# ----------------------------------------------------------------------------------------- training
def main(argv=None):
    cfg, resume = resume_config(parse_config(Config, argv, PRESETS))
    ddp, rank, world, device = setup(cfg)
    master = rank == 0  # logs, samples and writes the checkpoints
    clock = Clock(cfg.max_minutes, seconds=resume["seconds"] if resume else 0.0)
    text, tokenizer, splits = load_data(cfg, resume["vocab"] if resume else None)
    raw_model, optimizer, batches = build(cfg, len(tokenizer), device, rank, resume)
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if ddp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    step, best_val, train_seconds = (resume["step"], resume["best_val"], resume["train_seconds"]) \
        if resume else (0, math.inf, 0.0)
    out_dir = make_out_dir(cfg.out_dir)
    log = MetricsLog(out_dir, COLUMNS, resume=bool(resume), project="gpt", enabled=master,
                     wandb_config=config_dict(cfg) if cfg.wandb else None)
    if master:  # e.g. "1,115,394 characters, vocabulary 65; 0.80M parameters on cpu x 1"
        print(f"{len(text):,} characters, vocabulary {len(tokenizer)}; "
              f"{raw_model.num_params() / 1e6:.2f}M parameters on {device} x {world}")
    resumed_at, tokens_per_step = step if resume else None, cfg.batch_size * cfg.block_size * world
    bar = tqdm(total=cfg.steps, initial=step, disable=not master, desc="train", dynamic_ncols=True)
    window_start, window_step, reserve = time.perf_counter(), step, 0.0  # reserve: one evaluation
    while True:
        progress = clock.fraction() if cfg.max_minutes else step / cfg.steps  # of the schedule
        done = step >= cfg.steps or clock.done(reserve)  # the budget, the last evaluation kept
        if done or step % cfg.eval_interval == 0 and step != resumed_at:  # evaluate, sample, save
            eval_start = time.perf_counter()
            train_seconds += eval_start - window_start  # training time, evaluations excluded
            speed = (step - window_step) * tokens_per_step / (eval_start - window_start)
            val_loss = evaluate(raw_model, splits, tokenizer, cfg, device, log, bar, step=step,
                                lr=optimizer.param_groups[0]["lr"], train_seconds=train_seconds,
                                tokens_per_second=speed) if master else math.inf
            is_best, best_val = val_loss < best_val, min(best_val, val_loss)
            save(out_dir, is_best, raw_model, optimizer, tokenizer, cfg, batches, ddp, step=step,
                 best_val=best_val, seconds=clock.seconds, train_seconds=train_seconds)
            window_start, window_step = time.perf_counter(), step
            reserve = window_start - eval_start  # what the last evaluation will need, about
        if done:
            break

        # one optimisation step: schedule -> batch -> forward -> loss -> backward -> clip -> step
        lr = lr_at(progress, cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(splits["train"], cfg.block_size, cfg.batch_size, batches)
        with autocast(device):
            _, loss = model(x.to(device), y.to(device))
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if master and step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
    bar.close()
    log.close()
    clock.close()
    if master:
        print(f"best val loss {best_val:.4f}; checkpoints in {out_dir}")
    teardown(ddp)
    return best_val


if __name__ == "__main__":
    main()
