"""Train a class-conditional DDPM (eps-prediction, L_simple, classifier-free label dropout) on MNIST,
FashionMNIST or CIFAR-10.

    python train.py                                   # the CPU preset: a small U-Net on MNIST
    python train.py --preset gpu --dataset cifar10    # the DDPM-sized U-Net
    torchrun --standalone --nproc_per_node=4 train.py --preset gpu
"""
import argparse
import csv
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torchvision
from torch.distributed import all_reduce, barrier, destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from model import Diffusion, build_model, ema_copy, ema_update

DATASETS = {  # name: (torchvision class, directory it creates under --data-dir, channels, image size)
    "mnist": (torchvision.datasets.MNIST, "MNIST", 1, 28),
    "fashion": (torchvision.datasets.FashionMNIST, "FashionMNIST", 1, 28),
    "cifar10": (torchvision.datasets.CIFAR10, "cifar-10-batches-py", 3, 32),
}
NUM_CLASSES = 10

# Presets are overrides applied before explicit flags. "cpu" is what a shared 2-core CPU trains in minutes;
# "gpu" is the DDPM paper's CIFAR-10 U-Net (35.7M parameters: 128 channels, mult 1,2,2,2, 2 blocks,
# attention at 16x16, dropout 0.1, lr 2e-4, EMA 0.9999), at batch 128 per GPU.
PRESETS = {
    "cpu": dict(backbone="unet", batch_size=64, lr=5e-4, warmup=100, steps=7000, ema_decay=0.995),  # ~2 h, 1 thread
    "gpu": dict(backbone="unet", channels=128, channel_mult="1,2,2,2", num_res_blocks=2, attn_levels="1",
                dropout=0.1, batch_size=128, lr=2e-4, warmup=5000, steps=800_000, ema_decay=0.9999,
                sample_every=10_000, checkpoint_every=5_000),
}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="a set of overrides applied before explicit flags")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="mnist", help="training images")
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "data"), help="dataset root (default $DATA_DIR or ./data)")
    p.add_argument("--out-dir", default="runs/ddpm", help="checkpoint, metrics.csv and sample grids go here")
    # diffusion
    p.add_argument("--T", type=int, default=1000, help="number of diffusion steps")
    p.add_argument("--schedule", choices=["linear", "cosine"], default="linear", help="beta schedule (linear: 1e-4 -> 0.02)")
    p.add_argument("--p-uncond", type=float, default=0.1, help="probability of dropping the label to the null class (CFG)")
    # eps_theta
    p.add_argument("--backbone", choices=["unet", "uvit"], default="unet", help="network for eps_theta")
    p.add_argument("--channels", type=int, default=32, help="U-Net base width (a multiple of 8)")
    p.add_argument("--channel-mult", default="1,2,2", help="U-Net width multiplier per resolution level")
    p.add_argument("--num-res-blocks", type=int, default=1, help="U-Net residual blocks per level")
    p.add_argument("--attn-levels", default="2", help="U-Net levels (0 = full resolution) with self-attention")
    p.add_argument("--dropout", type=float, default=0.1, help="U-Net dropout in the residual blocks")
    p.add_argument("--patch-size", type=int, default=4, help="U-ViT patch size (divides the image size)")
    p.add_argument("--vit-dim", type=int, default=128, help="U-ViT token width")
    p.add_argument("--vit-depth", type=int, default=7, help="U-ViT number of transformer blocks")
    p.add_argument("--vit-heads", type=int, default=4, help="U-ViT attention heads")
    # optimisation
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (per process under torchrun)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--warmup", type=int, default=100, help="linear learning-rate warmup steps, then cosine decay to 10%%")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    p.add_argument("--ema-decay", type=float, default=0.995, help="EMA decay of the sampled weights")
    # running
    p.add_argument("--max-minutes", type=float, default=0, help="stop (and checkpoint) after this many minutes; 0 = no limit; --resume goes on")
    p.add_argument("--log-every", type=int, default=25, help="write a metrics.csv row every N steps")
    p.add_argument("--sample-every", type=int, default=500, help="write a DDIM-20 sample grid every N steps (0 = never)")
    p.add_argument("--checkpoint-every", type=int, default=250, help="save the checkpoint every N steps")
    p.add_argument("--resume", default=None, help="continue from this checkpoint exactly where it stopped")
    p.add_argument("--seed", type=int, default=0, help="seeds Python, NumPy and torch")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto: cuda, then mps, then cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default); 1 is fastest on a busy machine")
    p.add_argument("--compile", action="store_true", help="torch.compile eps_theta")
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases")
    return p


def parse_args(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.preset:
        parser.set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    try:
        args.channel_mult = [int(m) for m in args.channel_mult.split(",")]
        args.attn_levels = [int(m) for m in args.attn_levels.split(",") if m]
    except ValueError:
        parser.error("--channel-mult and --attn-levels take comma-separated integers, e.g. 1,2,2")
    image_size = DATASETS[args.dataset][3]
    for name, ok in [("--steps", args.steps >= 1), ("--batch-size", args.batch_size >= 1), ("--lr", args.lr > 0),
                     ("--T", args.T >= 2), ("--p-uncond", 0 <= args.p_uncond < 1), ("--ema-decay", 0 <= args.ema_decay < 1),
                     ("--channels", args.channels >= 8 and args.channels % 8 == 0),
                     ("--patch-size", args.patch_size >= 1 and image_size % args.patch_size == 0),
                     ("--vit-dim", args.vit_dim % args.vit_heads == 0 if args.vit_heads > 0 else False),
                     ("--log-every", args.log_every >= 1), ("--checkpoint-every", args.checkpoint_every >= 1)]:
        if not ok:
            parser.error(f"{name} has an invalid value for --dataset {args.dataset} (see --help)")
    return args


def load_dataset(name, data_dir, train):
    """All images of a split as uint8 (N, C, H, W) and labels (N,), via torchvision (downloads if absent).
    Offline with no files: one line naming the dataset, the path and the fix; nothing is left behind."""
    dataset_class, folder, _, _ = DATASETS[name]
    root = Path(data_dir)
    before = set(root.iterdir()) if root.is_dir() else None
    try:
        dataset = dataset_class(str(root), train=train, download=True)
    except Exception as error:  # no network, a partial download, ...
        for path in [root] if before is None else set(root.iterdir()) - before:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        sys.exit(f"error: {name} not found under {root / folder} and could not be downloaded ({type(error).__name__}); "
                 f"put torchvision's {folder} files there, or point --data-dir / DATA_DIR at them")
    images = torch.as_tensor(np.asarray(dataset.data))
    images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)  # (N, C, H, W)
    return images.contiguous(), torch.as_tensor(np.asarray(dataset.targets), dtype=torch.long)


def load_checkpoint(path, map_location="cpu"):
    """torch.load with one-line errors for a missing, corrupt, or foreign checkpoint."""
    if not os.path.isfile(path):
        sys.exit(f"error: checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        sys.exit(f"error: checkpoint {path} is truncated or corrupt ({type(error).__name__})")
    if not isinstance(checkpoint, dict) or checkpoint.get("folder") != "ddpm":
        sys.exit(f"error: {path} is not a ddpm checkpoint (folder={checkpoint.get('folder') if isinstance(checkpoint, dict) else None!r})")
    return checkpoint


def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available() or name == "mps" and not torch.backends.mps.is_available():
        sys.exit(f"error: --device {name} is not available on this machine")
    return name


def rng_state():
    """Python, NumPy and torch RNG states as plain lists/tensors (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    return {"python": list(random.getstate()[1]), "numpy": np_state[1].tolist(), "numpy_pos": int(np_state[2]),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def lr_at(step, args):
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv=None):
    args = parse_args(argv)
    checkpoint = load_checkpoint(args.resume) if args.resume else None  # a bad --resume fails before any work
    # ---- device, precision, DDP
    ddp = int(os.environ.get("RANK", -1)) != -1
    device = pick_device(args.device)
    if ddp:
        init_process_group(backend="nccl" if device == "cuda" else "gloo")
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if device == "cuda":
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    else:
        rank, world_size = 0, 1
    master = rank == 0
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    seed = args.seed + rank  # per-rank seeds: each process draws its own batches, t and noise
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)

    # ---- data: all of it in memory as uint8, scaled to [-1, 1] per batch
    images, labels = load_dataset(args.dataset, args.data_dir, train=True)
    _, _, in_channels, image_size = DATASETS[args.dataset]

    # ---- model, EMA, optimizer
    config = dict(vars(args))  # plain data: stored in the checkpoint, sample.py rebuilds the model from it
    model = build_model(config, in_channels, image_size, NUM_CLASSES).to(device)
    ema = ema_copy(model)
    diffusion = Diffusion(args.T, args.schedule).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step = 0
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step = checkpoint["step"]
        set_rng_state(checkpoint["rng"][rank] if rank < len(checkpoint["rng"]) else checkpoint["rng"][0])
    eps_theta = torch.compile(model) if args.compile else model
    eps_theta = DDP(eps_theta) if ddp else eps_theta
    if master:
        print(f"eps_theta: {args.backbone}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
              f"{args.dataset}: {len(images)} images on {device} x {world_size}")

    out_dir = Path(args.out_dir)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        if args.wandb:
            import wandb
            wandb.init(project="ddpm", config=config)

    def save_checkpoint():
        states = [rng_state()]
        if ddp:  # every rank's RNG, so that --resume continues each process's stream exactly
            states = [None] * world_size
            torch.distributed.all_gather_object(states, rng_state())
        if master:
            path = out_dir / "ckpt.pt"
            torch.save({"folder": "ddpm", "config": config, "model": model.state_dict(), "ema": ema.state_dict(),
                        "optimizer": optimizer.state_dict(), "step": step, "rng": states}, str(path) + ".tmp")
            os.replace(str(path) + ".tmp", path)

    def save_samples():
        y = torch.arange(NUM_CLASSES, device=device)
        x, _ = diffusion.sample(ema, y, (NUM_CLASSES, in_channels, image_size, image_size), "ddim", 20,
                                w=2.0, null_class=NUM_CLASSES, generator=torch.Generator(device).manual_seed(0))
        (out_dir / "samples").mkdir(exist_ok=True)
        torchvision.utils.save_image((x + 1) / 2, out_dir / "samples" / f"step{step:07d}.png", nrow=NUM_CLASSES)

    # ---- the training loop: batch -> forward -> loss -> backward -> clip -> step -> EMA -> log
    metrics_file = open(out_dir / "metrics.csv", "a", newline="") if master else None
    writer = csv.writer(metrics_file) if master else None
    if master and metrics_file.tell() == 0:
        writer.writerow(["step", "loss", "lr", "grad_norm", "seconds"])
    start, losses = time.time(), []
    progress = tqdm(total=args.steps, initial=step, disable=not master, desc="train")
    while step < args.steps:
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(len(images), (args.batch_size,))
        x0 = images[index].to(device).float() / 127.5 - 1                  # (B, C, H, W) in [-1, 1]
        y = labels[index].to(device)
        with autocast:
            loss = diffusion.loss(eps_theta, x0, y, args.p_uncond, NUM_CLASSES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        # EMA with a warm-up of the decay (as in many DDPM codebases) so short runs are not dominated by init
        ema_update(ema, model, min(args.ema_decay, (1 + step) / (10 + step)))
        step += 1
        losses.append(loss.item())
        progress.update(1)
        if master and (step % args.log_every == 0 or step == args.steps):
            mean_loss = sum(losses) / len(losses)
            losses = []
            writer.writerow([step, f"{mean_loss:.5f}", f"{lr:.6g}", f"{grad_norm.item():.4f}", f"{time.time() - start:.1f}"])
            metrics_file.flush()
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            if args.wandb:
                wandb.log({"loss": mean_loss, "lr": lr, "grad_norm": grad_norm.item()}, step=step)
        if master and args.sample_every and step % args.sample_every == 0:
            save_samples()
        out_of_time = torch.tensor(float(args.max_minutes > 0 and time.time() - start > 60 * args.max_minutes))
        if ddp:
            all_reduce(out_of_time)  # every rank stops at the same step
        if step % args.checkpoint_every == 0 or step == args.steps or out_of_time.item():
            save_checkpoint()
        if out_of_time.item():
            if master:
                print(f"stopped at step {step} after {args.max_minutes} minutes; continue with --resume {out_dir / 'ckpt.pt'}")
            break
    progress.close()
    if master:
        metrics_file.close()
        print(f"done: step {step}, {time.time() - start:.0f} s, checkpoint {out_dir / 'ckpt.pt'}")
    if ddp:
        barrier()  # no rank tears down its connections while another still reads from them
        destroy_process_group()


if __name__ == "__main__":
    main()
