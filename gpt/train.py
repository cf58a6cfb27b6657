"""Train a character-level GPT on Tiny Shakespeare or on any UTF-8 text file.

    python gpt/train.py --preset cpu                          # a few minutes on a laptop CPU
    python gpt/train.py --preset gpu                          # 6 layers, 6 heads, 384 wide, block 256
    python gpt/train.py --text-file 1984.txt --preset cpu     # your own book
    torchrun --standalone --nproc_per_node=4 gpt/train.py --preset gpu   # data parallel (DDP)
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
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from model import GPT, CharTokenizer, GPTConfig

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"

# Presets: overrides applied before the explicit flags (so `--preset cpu --steps 100` runs 100 steps).
PRESETS = {
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=16, dropout=0.0, lr=3e-3,
                min_lr=2e-4, warmup_steps=50, steps=10000, eval_interval=500, eval_batches=25),
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2, lr=1e-3,
                min_lr=1e-4, warmup_steps=100, steps=5000, eval_interval=250, eval_batches=200),
}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named set of defaults (see PRESETS); flags given explicitly still win")
    # data
    p.add_argument("--dataset", choices=["shakespeare"], default="shakespeare", help="built-in corpus: DATA_DIR/tinyshakespeare/input.txt, downloaded if absent")
    p.add_argument("--text-file", help="train on this UTF-8 text file instead of --dataset (any book)")
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "data"), help="where datasets live (default: $DATA_DIR, else ./data)")
    # model
    p.add_argument("--n-layer", type=int, default=4, help="number of Transformer blocks")
    p.add_argument("--n-head", type=int, default=4, help="attention heads per block")
    p.add_argument("--n-embd", type=int, default=128, help="width of the residual stream (a multiple of --n-head)")
    p.add_argument("--block-size", type=int, default=64, help="context length in characters")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout probability on embeddings and residual branches (0.2 helps larger models)")
    p.add_argument("--attn-dropout", type=float, default=None, help="dropout probability on the attention weights (default: --dropout)")
    p.add_argument("--bias", action="store_true", help="use biases in Linear and LayerNorm layers")
    # optimisation
    p.add_argument("--batch-size", type=int, default=12, help="sequences per step (per process under torchrun)")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop after this many minutes of wall-clock training and decay the learning rate over that time instead of over --steps (0: off)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--min-lr", type=float, default=1e-4, help="learning rate at the end of the cosine decay")
    p.add_argument("--warmup-steps", type=int, default=100, help="linear learning-rate warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay, on matrices only")
    p.add_argument("--beta2", type=float, default=0.99, help="AdamW beta2 (0.99: few tokens per step)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    # evaluation, logging, checkpoints
    p.add_argument("--eval-interval", type=int, default=250, help="evaluate, print a sample and checkpoint every this many steps")
    p.add_argument("--eval-batches", type=int, default=50, help="batches per split for the loss estimate")
    p.add_argument("--sample-chars", type=int, default=200, help="characters of the sample printed at each evaluation (0: none)")
    p.add_argument("--out-dir", default="runs/gpt", help="checkpoints (best.pt, last.pt) and metrics.csv go here")
    p.add_argument("--resume", help="continue from this checkpoint (e.g. runs/gpt/last.pt) exactly where it stopped")
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (WANDB_MODE=offline works)")
    # hardware
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto: cuda, then mps, then cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=1337, help="seeds Python, NumPy and torch")
    return p


def parse_args(argv=None):
    parser = get_parser()
    preset = parser.parse_known_args(argv)[0].preset
    if preset:
        parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    for name in ["n_layer", "n_head", "n_embd", "block_size", "batch_size", "steps", "eval_interval", "eval_batches"]:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.n_embd % args.n_head:
        parser.error(f"--n-embd {args.n_embd} is not a multiple of --n-head {args.n_head}")
    if args.attn_dropout is None:
        args.attn_dropout = args.dropout
    for name in ["dropout", "attn_dropout"]:
        if not 0 <= getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    if args.lr <= 0 or args.min_lr < 0 or args.max_minutes < 0:
        parser.error("--lr must be positive, --min-lr and --max-minutes non-negative")
    return args


# ----------------------------------------------------------------------------------------------------------- data
def load_text(args):
    """The training text: --text-file, or Tiny Shakespeare from --data-dir (downloaded there if absent)."""
    if args.text_file:
        path = Path(args.text_file)
        if not path.is_file():
            sys.exit(f"error: text file {path} not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            sys.exit(f"error: {path} is not UTF-8 text ({e.reason} at byte {e.start})")
        if not text:
            sys.exit(f"error: text file {path} is empty")
        return text
    folder = Path(args.data_dir) / "tinyshakespeare"
    path = folder / "input.txt"
    if not path.exists():
        created = [p for p in [folder, *folder.parents] if not p.exists()]  # removed again if the download fails
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
                data = response.read()
            path.with_suffix(".tmp").write_bytes(data)
            os.replace(path.with_suffix(".tmp"), path)
        except Exception as e:
            if created:
                shutil.rmtree(created[-1], ignore_errors=True)
            sys.exit(f"error: Tiny Shakespeare not found at {path} and the download failed ({type(e).__name__}); "
                     f"put char-rnn's input.txt there, or point --data-dir / DATA_DIR at a folder holding tinyshakespeare/input.txt")
    return path.read_text(encoding="utf-8")


def split_data(text, tokenizer, block_size, name):
    """90/10 train/val split of the encoded text, as int64 tensors; both must hold a block and its target."""
    data = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    n = int(0.9 * len(data))
    train, val = data[:n], data[n:]
    if len(val) < block_size + 1:
        sys.exit(f"error: --block-size {block_size} is too large for {name}: its {len(data)} characters leave "
                 f"{len(val)} for validation, fewer than block_size + 1; use a smaller --block-size or a longer text")
    return train, val


def get_batch(data, block_size, batch_size, generator):
    """batch_size random windows of the text: inputs x (B, T) and targets y = x shifted left by one."""
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    chunks = data[starts[:, None] + torch.arange(block_size + 1)]   # (B, T + 1)
    return chunks[:, :-1], chunks[:, 1:]


def lr_at(progress, args, step):
    """Linear warmup over warmup_steps, then cosine decay from lr to min_lr as progress goes from 0 to 1."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def estimate_loss(model, splits, args, device, autocast):
    """Mean loss over eval_batches batches per split, always the same batches (a fixed generator)."""
    model.eval()
    losses = {}
    for name, data in splits.items():
        generator = torch.Generator().manual_seed(args.seed)
        total = 0.0
        for _ in range(args.eval_batches):
            x, y = get_batch(data, args.block_size, args.batch_size, generator)
            with autocast:
                total += model(x.to(device), y.to(device))[1].item()
        losses[name] = total / args.eval_batches
    model.train()
    return losses


def save_checkpoint(path, obj):
    torch.save(obj, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint written by this folder's train.py, or a one-line exit saying what is wrong with it."""
    if not os.path.isfile(path):
        sys.exit(f"error: checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        sys.exit(f"error: checkpoint {path} is truncated or corrupt ({type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("folder") != "gpt":
        folder = ckpt.get("folder") if isinstance(ckpt, dict) else None
        sys.exit(f"error: checkpoint {path} was not written by gpt/train.py (folder: {folder!r})")
    return ckpt


def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available() or name == "mps" and not torch.backends.mps.is_available():
        sys.exit(f"error: --device {name} is not available on this machine")
    return name


# ------------------------------------------------------------------------------------------------------ training
def main(argv=None):
    args = parse_args(argv)
    resume = load_checkpoint(args.resume) if args.resume else None
    if resume is not None:  # the model's shape comes from the checkpoint; training flags from this command line
        for name in ["n_layer", "n_head", "n_embd", "block_size", "bias", "text_file", "dataset"]:
            setattr(args, name, resume["config"][name])

    # DDP set-up (nanoGPT style): torchrun sets RANK; one process per device, rank 0 logs and saves.
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group(backend="nccl" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if dist.get_backend() == "nccl" else "cpu"
        if device != "cpu":
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, pick_device(args.device)
    master = rank == 0
    device_type = device.split(":")[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()

    text = load_text(args)
    tokenizer = CharTokenizer(resume["vocab"]) if resume else CharTokenizer.from_text(text)
    if resume and tokenizer.unknown(text):
        sys.exit(f"error: the text has characters the checkpoint's vocabulary lacks: {tokenizer.unknown(text)!r}")
    name = args.text_file or "Tiny Shakespeare"
    train_data, val_data = split_data(text, tokenizer, args.block_size, name)
    batch_generator = torch.Generator().manual_seed(args.seed + rank)  # each rank draws its own windows

    config = GPTConfig(vocab_size=len(tokenizer), block_size=args.block_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout, attn_dropout=args.attn_dropout, bias=args.bias)
    model = GPT(config).to(device)
    optimizer = model.configure_optimizer(args.weight_decay, args.lr, (0.9, args.beta2), device_type)
    step, best_val, train_seconds = 0, float("inf"), 0.0
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        step, best_val, train_seconds = resume["step"], resume["best_val"], resume["train_seconds"]
        torch.set_rng_state(resume["rng"]["torch"])
        batch_generator.set_state(resume["rng"]["batches"][rank % len(resume["rng"]["batches"])])
        random.setstate((resume["rng"]["python"][0], tuple(resume["rng"]["python"][1]), resume["rng"]["python"][2]))
        np.random.set_state(("MT19937", np.array(resume["rng"]["numpy"][0], dtype=np.uint32), *resume["rng"]["numpy"][1:]))
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[torch.cuda.current_device()] if device_type == "cuda" else None)

    out_dir = Path(args.out_dir)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"{name}: {len(text):,} characters, vocabulary {len(tokenizer)}; "
              f"model {raw_model.num_params() / 1e6:.2f}M parameters on {device} x {world}")
        log_file = open(out_dir / "metrics.csv", "a" if resume else "w", newline="")
        log = csv.writer(log_file)
        if not resume:
            log.writerow(["step", "train_loss", "val_loss", "lr", "train_seconds", "tokens_per_second"])
        if args.wandb:
            import wandb
            wandb.init(project="gpt", config=vars(args))

    def checkpoint(path):
        python_state = random.getstate()
        numpy_state = np.random.get_state()
        batch_states = [torch.empty(0, dtype=torch.uint8) for _ in range(world)]
        if ddp:  # every rank's batch generator, so that a resumed run draws the same windows
            dist.all_gather_object(batch_states, batch_generator.get_state())
        else:
            batch_states = [batch_generator.get_state()]
        if master:
            save_checkpoint(path, {
                "folder": "gpt", "config": vars(args), "model_config": vars(config), "vocab": tokenizer.chars,
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "best_val": best_val, "train_seconds": train_seconds,
                "rng": {"torch": torch.get_rng_state(), "batches": batch_states,
                        "python": [python_state[0], list(python_state[1]), python_state[2]],
                        "numpy": [numpy_state[1].tolist(), *numpy_state[2:]]}})

    tokens_per_step = args.batch_size * args.block_size * world
    budget = args.max_minutes * 60
    bar = tqdm(total=args.steps, initial=step, disable=not master, desc="train", dynamic_ncols=True)
    window_start, window_steps = time.perf_counter(), 0  # throughput is measured between evaluations
    while True:
        train_time = train_seconds + time.perf_counter() - window_start  # seconds of training, evaluations excluded
        progress = train_time / budget if budget else step / args.steps
        if ddp and budget:  # every rank follows rank 0's clock, or they would differ in lr and stop at other steps
            progress_t = torch.tensor([progress], device=device)
            dist.broadcast(progress_t, 0)
            progress = progress_t.item()
        done = step >= args.steps or progress >= 1.0
        # evaluate, print a sample, checkpoint: every eval_interval steps and at the end
        if (step % args.eval_interval == 0 or done) and not (resume and step == resume["step"] and not done):
            train_seconds = train_time
            tokens_per_second = window_steps * tokens_per_step / (time.perf_counter() - window_start)
            is_best = False
            if master:
                losses = estimate_loss(raw_model, {"train": train_data, "val": val_data}, args, device, autocast)
                lr = optimizer.param_groups[0]["lr"]
                bar.write(f"step {step}: train {losses['train']:.4f}, val {losses['val']:.4f}, "
                          f"{train_seconds:.0f} s, {tokens_per_second:,.0f} tokens/s")
                log.writerow([step, f"{losses['train']:.4f}", f"{losses['val']:.4f}", f"{lr:.3e}",
                              f"{train_seconds:.1f}", f"{tokens_per_second:.0f}"])
                log_file.flush()
                if args.wandb:
                    wandb.log({"train/loss": losses["train"], "val/loss": losses["val"], "lr": lr,
                               "tokens_per_second": tokens_per_second}, step=step)
                if args.sample_chars:
                    raw_model.eval()
                    prompt = torch.tensor([tokenizer.encode(text[0])], device=device)
                    out = raw_model.generate(prompt, args.sample_chars, temperature=0.8, top_k=40,
                                             generator=torch.Generator(device).manual_seed(args.seed))
                    bar.write(tokenizer.decode(out[0].tolist()) + "\n" + "-" * 40)
                    raw_model.train()
                is_best = losses["val"] < best_val
                best_val = min(best_val, losses["val"])
            checkpoint(out_dir / "last.pt")
            if is_best:  # best-val checkpoint: what sample.py uses by default
                shutil.copyfile(out_dir / "last.pt", out_dir / "best.pt.tmp")
                os.replace(out_dir / "best.pt.tmp", out_dir / "best.pt")
            window_start, window_steps = time.perf_counter(), 0
        if done:
            break

        # one optimisation step: schedule -> batch -> forward -> loss -> backward -> clip -> step
        lr = lr_at(progress, args, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(train_data, args.block_size, args.batch_size, batch_generator)
        with autocast:
            _, loss = model(x.to(device), y.to(device))
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_steps += 1
        if master:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
    bar.close()
    if master:
        log_file.close()
        print(f"best val loss {best_val:.4f}; checkpoints in {out_dir}")
        if args.wandb:
            wandb.finish()
    if ddp:
        dist.barrier()  # no rank tears down its connections while another still reads from them
        dist.destroy_process_group()
    return best_val


if __name__ == "__main__":
    main()
