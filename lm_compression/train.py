"""Train the byte-level Transformer that sample.py uses to compress.

Trains on the first 90% of a text (Tiny Shakespeare by default) and keeps the last 10% unseen, so
that the compression rate on it measures generalisation, as in the paper's evaluation. Every
training crop starts with BOS, exactly as every coding context does (see model.Stepper).

    python train.py                        # Tiny Shakespeare from $DATA_DIR, laptop CPU defaults
    python train.py --max-minutes 6        # stop after 6 minutes (evaluation included), checkpoint
    python train.py --resume runs/lm_compression/ckpt.pt   # ...and continue exactly there
"""
import dataclasses
import math
import os
import shutil
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import ByteTransformer
from plumbing import (
    Clock,
    MetricsLog,
    autocast,
    config_dict,
    config_from_checkpoint,
    load_checkpoint,
    make_out_dir,
    parse_config,
    require,
    rng_state,
    save_checkpoint,
    set_rng_state,
    setup,
)

FOLDER = "lm_compression"
SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/"
                   "input.txt")


@dataclass
class Config:
    """Train the byte-level Transformer used as the compressor's model."""
    # data
    data_dir: str = os.environ.get("DATA_DIR", "data")  # tinyshakespeare/ is here ($DATA_DIR)
    text_file: str | None = None  # train on this file instead of Tiny Shakespeare
    out_dir: str = "runs/lm_compression"  # ckpt.pt, ckpt_stepN.pt and metrics.csv go here
    # model
    block_size: int = 128  # context length in bytes
    n_layer: int = 4  # Transformer blocks
    n_head: int = 4  # attention heads
    n_embd: int = 128  # width of the residual stream
    dropout: float = 0.0  # dropout rate
    # optimisation
    batch_size: int = 16  # crops per step
    lr: float = 3e-3  # peak AdamW learning rate
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 50  # linear learning-rate warmup
    weight_decay: float = 0.1  # AdamW weight decay (matrices only)
    grad_clip: float = 1.0  # clip the gradient norm to this (0: off)
    steps: int = 1200  # total optimisation steps (the cosine schedule's length)
    # evaluation and checkpoints
    eval_interval: int = 100  # evaluate the held-out loss every N steps
    eval_batches: int = 4  # batches of held-out text per evaluation
    keep_every: int = 0  # also keep ckpt_stepN.pt every N steps (0: off)
    max_minutes: float = 0.0  # stop after N minutes (evaluation included), checkpoint (0: off)
    resume: str | None = None  # continue from this checkpoint exactly where it stopped
    # machine
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: cuda, then mps, then cpu
    threads: int = 0  # CPU threads for torch (0: torch's default)
    seed: int = 1337  # seeds Python, NumPy and torch
    compile: bool = False  # torch.compile the model
    wandb: bool = False  # also log to Weights & Biases (WANDB_MODE=offline works)

    def __post_init__(self):
        for name in ["block_size", "n_layer", "n_head", "n_embd", "batch_size", "steps",
                     "eval_interval", "eval_batches"]:
            require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1")
        require(self.n_embd % self.n_head == 0, "--n-embd must be divisible by --n-head")
        require(self.lr > 0, "--lr must be > 0")
        require(self.dropout < 1, "--dropout must be below 1")


# a resumed run keeps the architecture and the schedule of its checkpoint
RESUMED = ["block_size", "n_layer", "n_head", "n_embd", "dropout", "batch_size", "lr", "min_lr",
           "warmup_steps", "weight_decay", "steps", "seed"]
CHECKPOINT_KEYS = ["config", "model", "optimizer", "step", "rng", "train_seconds", "seconds"]
COLUMNS = ["step", "train_seconds", "lr", "train_loss", "val_loss", "val_bits_per_byte"]


# --------------------------------------------------------------------------------------------------
# Data: bytes of the text, first 90% to train on, last 10% held out


def load_text(cfg):
    if cfg.text_file:
        if not os.path.isfile(cfg.text_file):
            sys.exit(f"error: --text-file {cfg.text_file} does not exist")
        return open(cfg.text_file, "rb").read()
    folder = os.path.join(cfg.data_dir, "tinyshakespeare")
    path = os.path.join(folder, "input.txt")
    if not os.path.isfile(path):
        created = not os.path.isdir(folder)
        try:
            os.makedirs(folder, exist_ok=True)
            with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response, \
                    open(path + ".tmp", "wb") as f:
                f.write(response.read())
            os.replace(path + ".tmp", path)
        except Exception:
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
            if created:
                shutil.rmtree(folder, ignore_errors=True)
            sys.exit(f"error: Tiny Shakespeare not found at {path} and the download failed; put "
                     f"input.txt there, or point --data-dir / DATA_DIR at a folder holding "
                     f"tinyshakespeare/input.txt")
    return open(path, "rb").read()


def split(data):
    """First 90% train, last 10% held out (for Tiny Shakespeare: the last 111,540 bytes)."""
    n = int(0.9 * len(data))
    return (torch.tensor(list(data[:n]), dtype=torch.long),
            torch.tensor(list(data[n:]), dtype=torch.long))


def get_batch(data, batch_size, block_size, generator):
    """x = BOS + crop[:-1], y = crop: every crop is a fresh context, as in coding."""
    ix = torch.randint(len(data) - block_size + 1, (batch_size,), generator=generator)
    y = torch.stack([data[i:i + block_size] for i in ix.tolist()])
    x = torch.cat([torch.full((batch_size, 1), 256, dtype=torch.long), y[:, :-1]], dim=1)
    return x, y


@torch.no_grad()
def evaluate(model, data, cfg, device):
    """Mean held-out loss in nats/byte over fixed crops (the same crops at every evaluation)."""
    model.eval()
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(cfg.eval_batches):
        x, y = get_batch(data, cfg.batch_size, cfg.block_size, g)
        logits, _ = model(x.to(device))
        losses.append(F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def lr_at(step, cfg):
    """Linear warm-up, then cosine decay to min_lr at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model, cfg):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99))


def resumed_config(cfg, ckpt):
    """The command line's config with the architecture and schedule of the checkpoint."""
    stored = config_from_checkpoint(Config, ckpt, cfg.resume)
    return dataclasses.replace(cfg, **{name: getattr(stored, name) for name in RESUMED})


def log_evaluation(log, model, val_data, cfg, device, step, train_seconds, lr, train_loss):
    val = evaluate(model, val_data, cfg, device)
    log.log(step=step, train_seconds=round(train_seconds, 1), lr=lr, train_loss=train_loss,
            val_loss=val, val_bits_per_byte=val / math.log(2))
    tqdm.write(f"step {step}: train {train_loss:.3f}  held-out {val:.3f} nats/byte = "
               f"{val / math.log(2):.3f} bits/byte  ({train_seconds:.0f} s)")


def save(path, cfg, model, optimizer, step, generator, train_seconds, clock):
    save_checkpoint(path, {"folder": FOLDER, "config": config_dict(cfg),
                           "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "step": step,
                           "rng": rng_state(generator), "train_seconds": train_seconds,
                           "seconds": clock.seconds})


# --------------------------------------------------------------------------------------------------


def main(argv=None):
    cfg = parse_config(Config, argv)
    ckpt = load_checkpoint(cfg.resume, FOLDER, keys=CHECKPOINT_KEYS) if cfg.resume else None
    if ckpt:
        cfg = resumed_config(cfg, ckpt)
    _, _, _, device = setup(cfg)
    generator = torch.Generator().manual_seed(cfg.seed)  # draws the training crops
    train_data, val_data = split(load_text(cfg))
    if len(val_data) < cfg.block_size:
        sys.exit(f"error: the held-out 10% ({len(val_data)} bytes) is shorter than --block-size "
                 f"{cfg.block_size}")
    model = ByteTransformer(cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout)
    model = model.to(device)
    optimizer = make_optimizer(model, cfg)
    step, train_seconds = 0, 0.0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, train_seconds = ckpt["step"], ckpt["train_seconds"]
        set_rng_state(ckpt["rng"], generator)
    out_dir = make_out_dir(cfg.out_dir)
    clock = Clock(cfg.max_minutes, ckpt["seconds"] if ckpt else 0.0)
    log = MetricsLog(out_dir, COLUMNS, resume=ckpt is not None, project=FOLDER,
                     wandb_config=config_dict(cfg) if cfg.wandb else None)
    train_model = torch.compile(model) if cfg.compile else model
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters; {len(train_data):,} train "
          f"bytes, {len(val_data):,} held-out bytes; device {device}")

    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="train")
    while step < cfg.steps and not clock.done():
        tick = time.perf_counter()
        x, y = get_batch(train_data, cfg.batch_size, cfg.block_size, generator)
        x, y = x.to(device), y.to(device)
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(device):
            logits, _ = train_model(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())  # nats/byte
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        train_seconds += time.perf_counter() - tick
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg.eval_interval == 0 or step == cfg.steps:
            log_evaluation(log, model, val_data, cfg, device, step, train_seconds, lr, loss.item())
        if cfg.keep_every and step % cfg.keep_every == 0:
            save(out_dir / f"ckpt_step{step}.pt", cfg, model, optimizer, step, generator,
                 train_seconds, clock)
    bar.close()
    clock.close()
    save(out_dir / "ckpt.pt", cfg, model, optimizer, step, generator, train_seconds, clock)
    log.close()
    print(f"saved {out_dir / 'ckpt.pt'} at step {step} ({train_seconds:.0f} s of training)")


if __name__ == "__main__":
    main()
