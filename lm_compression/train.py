"""Train the byte-level Transformer that sample.py uses to compress.

Trains on the first 90% of a text (Tiny Shakespeare by default) and keeps the last 10% unseen, so that
the compression rate on it measures generalisation, as in the paper's evaluation. Every training crop
starts with BOS, exactly as every coding context does (see model.Stepper).

    python train.py                        # Tiny Shakespeare from $DATA_DIR, laptop CPU defaults
    python train.py --max-minutes 6        # stop after 6 minutes of training, checkpoint, resume later
    python train.py --resume runs/lm_compression/ckpt.pt --max-minutes 6
"""
import argparse
import csv
import math
import os
import random
import shutil
import sys
import time
import urllib.request

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import ByteTransformer

FOLDER = "lm_compression"
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train the byte-level Transformer used as the compressor's model.")
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "data"),
                   help="folder holding tinyshakespeare/input.txt (default $DATA_DIR, else ./data)")
    p.add_argument("--text-file", default=None, help="train on this file instead of Tiny Shakespeare")
    p.add_argument("--out-dir", default=f"runs/{FOLDER}", help="where checkpoints and log.csv go")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to train")
    p.add_argument("--seed", type=int, default=1337, help="seeds Python, NumPy and torch")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--block-size", type=int, default=128, help="context length in bytes")
    p.add_argument("--n-layer", type=int, default=4, help="Transformer blocks")
    p.add_argument("--n-head", type=int, default=4, help="attention heads")
    p.add_argument("--n-embd", type=int, default=128, help="width of the residual stream")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout rate")
    p.add_argument("--batch-size", type=int, default=16, help="crops per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    p.add_argument("--min-lr", type=float, default=1e-4, help="learning rate at the end of the cosine decay")
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    p.add_argument("--steps", type=int, default=1200, help="total optimisation steps (the cosine schedule's length)")
    p.add_argument("--max-minutes", type=float, default=0, help="stop (and checkpoint) after this many minutes (0: no limit)")
    p.add_argument("--eval-interval", type=int, default=100, help="evaluate the held-out loss every N steps")
    p.add_argument("--eval-batches", type=int, default=4, help="batches of held-out text per evaluation")
    p.add_argument("--keep-every", type=int, default=0, help="also keep ckpt_stepN.pt every N steps (0: off)")
    p.add_argument("--resume", default=None, help="checkpoint to continue from, exactly where it stopped")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases")
    args = p.parse_args(argv)
    for name in ["block_size", "n_layer", "n_head", "n_embd", "batch_size", "steps", "eval_interval", "eval_batches"]:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.n_embd % args.n_head:
        p.error("--n-embd must be divisible by --n-head")
    if args.lr <= 0:
        p.error("--lr must be > 0")
    if not 0 <= args.dropout < 1:
        p.error("--dropout must be in [0, 1)")
    return args


# ----------------------------------------------------------------------------------------------------
# Data: bytes of the text, first 90% to train on, last 10% held out


def load_text(args):
    if args.text_file:
        if not os.path.isfile(args.text_file):
            sys.exit(f"error: --text-file {args.text_file} does not exist")
        return open(args.text_file, "rb").read()
    folder = os.path.join(args.data_dir, "tinyshakespeare")
    path = os.path.join(folder, "input.txt")
    if not os.path.isfile(path):
        created = not os.path.isdir(folder)
        try:
            os.makedirs(folder, exist_ok=True)
            with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response, open(path + ".tmp", "wb") as f:
                f.write(response.read())
            os.replace(path + ".tmp", path)
        except Exception:
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
            if created:
                shutil.rmtree(folder, ignore_errors=True)
            sys.exit(f"error: Tiny Shakespeare not found at {path} and the download failed; put input.txt "
                     f"there, or point --data-dir / DATA_DIR at a folder holding tinyshakespeare/input.txt")
    return open(path, "rb").read()


def split(data):
    """First 90% train, last 10% held out (for Tiny Shakespeare: the last 111,540 bytes)."""
    n = int(0.9 * len(data))
    return torch.tensor(list(data[:n]), dtype=torch.long), torch.tensor(list(data[n:]), dtype=torch.long)


def get_batch(data, batch_size, block_size, generator):
    """x = BOS + crop[:-1], y = crop: every crop is a fresh context, as in coding."""
    ix = torch.randint(len(data) - block_size + 1, (batch_size,), generator=generator)
    y = torch.stack([data[i:i + block_size] for i in ix.tolist()])
    x = torch.cat([torch.full((batch_size, 1), 256, dtype=torch.long), y[:, :-1]], dim=1)
    return x, y


@torch.no_grad()
def evaluate(model, data, args, device):
    """Mean held-out loss in nats/byte over fixed crops (the same crops at every evaluation)."""
    model.eval()
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(args.eval_batches):
        x, y = get_batch(data, args.batch_size, args.block_size, g)
        logits, _ = model(x.to(device))
        losses.append(F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def lr_at(step, args):
    """Linear warm-up, then cosine decay to min_lr at args.steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def load_checkpoint(path, map_location="cpu"):
    """The checkpoint dict, or a one-line exit for a missing, corrupt or foreign file."""
    if not os.path.isfile(path):
        sys.exit(f"error: checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        sys.exit(f"error: checkpoint {path} is truncated or corrupt ({type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("folder") != FOLDER:
        sys.exit(f"error: {path} is not an {FOLDER} checkpoint (folder={ckpt.get('folder') if isinstance(ckpt, dict) else None!r})")
    return ckpt


def model_from_checkpoint(ckpt):
    c = ckpt["config"]
    model = ByteTransformer(c["block_size"], c["n_layer"], c["n_head"], c["n_embd"], 0.0)
    model.load_state_dict(ckpt["model"])
    return model.eval()


def save(path, obj):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def rng_state(generator):
    return {"python": list(random.getstate()[1]),
            "numpy": np.random.get_state()[1].tolist(), "numpy_pos": int(np.random.get_state()[2]),
            "torch": torch.get_rng_state(), "batches": generator.get_state()}


def set_rng_state(state, generator):
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["batches"])


# ----------------------------------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)  # draws the training crops

    ckpt = load_checkpoint(args.resume) if args.resume else None
    train_data, val_data = split(load_text(args))
    if len(val_data) < args.block_size:
        sys.exit(f"error: the held-out 10% ({len(val_data)} bytes) is shorter than --block-size {args.block_size}")
    if ckpt:  # the architecture and the schedule come from the checkpoint
        for key in ["block_size", "n_layer", "n_head", "n_embd", "dropout", "batch_size", "lr", "min_lr",
                    "warmup", "weight_decay", "steps", "seed"]:
            setattr(args, key, ckpt["config"][key])

    model = ByteTransformer(args.block_size, args.n_layer, args.n_head, args.n_embd, args.dropout).to(args.device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.99))
    step, elapsed = 0, 0.0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, elapsed = ckpt["step"], ckpt["train_seconds"]
        set_rng_state(ckpt["rng"], generator)
    train_model = torch.compile(model) if args.compile else model
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters; {len(train_data):,} train bytes, "
          f"{len(val_data):,} held-out bytes; device {args.device}")

    os.makedirs(args.out_dir, exist_ok=True)
    log_path = os.path.join(args.out_dir, "log.csv")
    new_log = not (ckpt and os.path.exists(log_path))
    log_file = open(log_path, "w" if new_log else "a", newline="")
    log = csv.writer(log_file)
    if new_log:
        log.writerow(["step", "train_seconds", "lr", "train_loss", "val_loss", "val_bits_per_byte"])
    if args.wandb:
        import wandb
        wandb.init(project=FOLDER, config=vars(args))

    def checkpoint(name):
        save(os.path.join(args.out_dir, name), {
            "folder": FOLDER, "config": vars(args), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "step": step, "train_seconds": elapsed, "rng": rng_state(generator)})

    model.train()
    started, bar = time.time(), tqdm(total=args.steps, initial=step, desc="train")
    while step < args.steps:
        if args.max_minutes and time.time() - started > 60 * args.max_minutes:
            break
        tick = time.time()
        x, y = get_batch(train_data, args.batch_size, args.block_size, generator)
        x, y = x.to(args.device), y.to(args.device)
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device == "cuda"):
            logits, _ = train_model(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())  # nats/byte
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        step += 1
        elapsed += time.time() - tick
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % args.eval_interval == 0 or step == args.steps:
            val = evaluate(model, val_data, args, args.device)
            log.writerow([step, f"{elapsed:.1f}", f"{lr:.2e}", f"{loss.item():.4f}", f"{val:.4f}", f"{val / math.log(2):.4f}"])
            log_file.flush()
            tqdm.write(f"step {step}: train {loss.item():.3f}  held-out {val:.3f} nats/byte = "
                       f"{val / math.log(2):.3f} bits/byte  ({elapsed:.0f} s)")
            if args.wandb:
                wandb.log({"train_loss": loss.item(), "val_loss": val, "lr": lr}, step=step)
        if args.keep_every and step % args.keep_every == 0:
            checkpoint(f"ckpt_step{step}.pt")
    bar.close()
    checkpoint("ckpt.pt")
    log_file.close()
    print(f"saved {os.path.join(args.out_dir, 'ckpt.pt')} at step {step} ({elapsed:.0f} s of training)")


if __name__ == "__main__":
    main()
