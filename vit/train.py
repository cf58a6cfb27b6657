"""Train a Vision Transformer from scratch on MNIST, FashionMNIST or CIFAR-10.

    python train.py                                   # MNIST, the CPU preset (the 8-minute recipe)
    python train.py --dataset cifar10 --preset gpu    # CIFAR-10 on a GPU
    torchrun --standalone --nproc_per_node=4 train.py --dataset cifar10 --preset gpu

Configuration first (Config, PRESETS), then data, then one training loop: batch -> augment ->
forward -> loss -> backward -> clip -> step -> schedule. Every epoch ends with a pass over the
validation images (held out of the training split), a row of metrics.csv, ckpt.pt and, when the
validation accuracy is the best so far, best.pt. The test split is evaluated once, at the very end,
for the final model and for best.pt.
"""
import math
import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.transforms import v2
from tqdm import tqdm

from model import ViT
from plumbing import (
    IMAGE_DATASETS,
    Clock,
    MetricsLog,
    autocast,
    config_dict,
    config_from_checkpoint,
    load_checkpoint,
    load_image_dataset,
    make_out_dir,
    normalize,
    parse_config,
    require,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    setup,
    split_validation,
    teardown,
)


@dataclass
class Config:
    """Train a Vision Transformer from scratch on MNIST, FashionMNIST or CIFAR-10. The defaults are
    the MNIST CPU recipe; --preset cpu (used unless --preset gpu is named) sets each dataset's own
    values (PRESETS in train.py), and explicit flags win over both."""
    # data
    dataset: Literal["mnist", "fashion_mnist", "cifar10"] = "mnist"  # which torchvision dataset
    data_dir: str = os.environ.get("DATA_DIR", "data")  # where datasets live ($DATA_DIR, else data)
    out_dir: str = "runs/vit"  # checkpoints (ckpt.pt, best.pt) and metrics.csv go here
    val_images: int = 5000  # training images held out to pick best.pt (0: none and no best.pt)
    train_limit: int = 0  # train on only the first N of the remaining training images (0: all)
    test_limit: int = 0  # evaluate on the first N test images (0: all)
    # model
    patch_size: int = 7  # P: patches are P x P pixels; must divide the image size
    dim: int = 128  # D: token width
    depth: int = 6  # L: number of encoder blocks
    num_heads: int = 4  # h: attention heads; must divide --dim
    mlp_dim: int = 256  # hidden width of the MLP in each block
    dropout: float = 0.0  # dropout on embeddings, attention, residual branches
    # optimisation
    epochs: int = 7  # passes over the training images
    batch_size: int = 128  # images per optimiser step, summed over DDP processes
    lr: float = 2e-3  # peak AdamW learning rate, after warmup; cosine decay to 0
    weight_decay: float = 0.05  # AdamW decoupled weight decay (weight matrices only)
    warmup_steps: int = 140  # linear learning-rate warmup, in optimiser steps
    label_smoothing: float = 0.1  # label smoothing of the cross-entropy
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: off)
    # augmentation
    crop_padding: int = 2  # random crop after zero-padding by this many pixels (0: off)
    flip: bool = False  # random horizontal flips
    randaugment: int = 0  # RandAugment with this many ops per image, magnitude 9 (0: off)
    mixup: float = 0.0  # mixup with Beta(alpha, alpha) mixing weights (0: off)
    # the run
    max_minutes: float = 0.0  # stop after this many minutes, validation included (0: off)
    resume: str | None = None  # continue from this checkpoint (ckpt.pt) exactly where it stopped
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: cuda, then mps, then cpu
    threads: int = 0  # CPU threads for torch (0: torch's default; 1 is best on a busy machine)
    seed: int = 0  # seeds Python, NumPy and torch
    compile: bool = False  # torch.compile the model
    wandb: bool = False  # also log to Weights & Biases (WANDB_MODE=offline works)

    def __post_init__(self):
        size = IMAGE_DATASETS[self.dataset][1]
        require(self.patch_size >= 1 and size % self.patch_size == 0,
                f"the {self.dataset} image size {size} is not divisible by --patch-size "
                f"{self.patch_size}")
        require(self.num_heads >= 1 and self.dim >= 1 and self.dim % self.num_heads == 0,
                f"--dim {self.dim} must be a positive multiple of --num-heads {self.num_heads}")
        require(min(self.depth, self.mlp_dim, self.epochs, self.batch_size) >= 1,
                "--depth, --mlp-dim, --epochs and --batch-size must be at least 1")
        require(self.lr > 0 and self.dropout < 1 and self.label_smoothing < 1,
                "need --lr > 0, --dropout < 1 and --label-smoothing < 1")


# Per dataset, overrides of the defaults above. The warmups are the former 0.3 epochs (5 for
# CIFAR-10 on a GPU) of the whole training split at the preset's batch size, rounded: 468 steps per
# epoch of MNIST or FashionMNIST at batch 128, 234 at 256; 390 of CIFAR-10 at 128, 195 at 256.
PRESETS = {
    "cpu": {  # 16 tokens of 7 x 7 pixels for the 28 x 28 datasets: the fastest to learn on a CPU
        "mnist": dict(),
        "fashion_mnist": dict(epochs=12, crop_padding=0),
        "cifar10": dict(patch_size=4, dim=96, mlp_dim=192, epochs=12, warmup_steps=117,
                        crop_padding=4, flip=True),
    },
    "gpu": {
        "mnist": dict(patch_size=4, dim=192, num_heads=6, mlp_dim=384, epochs=20, batch_size=256,
                      lr=1e-3, warmup_steps=70),
        "fashion_mnist": dict(patch_size=4, dim=192, num_heads=6, mlp_dim=384, epochs=40,
                              batch_size=256, lr=1e-3, warmup_steps=70, flip=True),
        "cifar10": dict(patch_size=4, dim=384, depth=7, num_heads=12, mlp_dim=768, dropout=0.1,
                        epochs=200, batch_size=256, lr=1e-3, warmup_steps=975, crop_padding=4,
                        flip=True, randaugment=2, mixup=0.2),
    },
}
# What a --resume takes from the command line; everything else comes from the checkpoint's config.
RESUME_FLAGS = ["resume", "device", "out_dir", "threads", "compile", "wandb"]
RESUME_KEYS = ["config", "model", "optimizer", "step", "rng", "best_val_accuracy", "seconds",
               "cpu_seconds"]
COLUMNS = ["epoch", "step", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
           "train_images_per_s", "elapsed_s", "cpu_s"]


def get_config(argv=None):
    """The Config from the flags (--preset cpu unless another is named) or, with --resume, the one
    the run was started with; and the checkpoint to resume from (or None)."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(Config, ["--preset", "cpu", *argv], PRESETS)  # a later --preset wins
    ckpt = load_checkpoint(cfg.resume, "vit", keys=RESUME_KEYS) if cfg.resume else None
    if ckpt:  # the run goes on with the configuration it was started with
        own = {k: getattr(cfg, k) for k in RESUME_FLAGS}
        cfg = config_from_checkpoint(Config, ckpt, cfg.resume, **own)
    world = int(os.environ.get("WORLD_SIZE", 1))  # processes started by torchrun
    if world > 1 and cfg.max_minutes:
        sys.exit("error: --max-minutes is for one process (each rank's clock gives another cosine)")
    if cfg.batch_size % world:
        sys.exit(f"error: --batch-size {cfg.batch_size} is not divisible by the {world} processes")
    return cfg, ckpt


def model_config(cfg):
    _, image_size, channels, _, _ = IMAGE_DATASETS[cfg.dataset]
    return dict(image_size=image_size, channels=channels, patch_size=cfg.patch_size,
                num_classes=10, dim=cfg.dim, depth=cfg.depth, num_heads=cfg.num_heads,
                mlp_dim=cfg.mlp_dim, dropout=cfg.dropout)


# ------------------------------------------------------------------------------------------ data
def load_splits(cfg):
    """(images, labels) of the training, validation and test splits, uint8 tensors held in memory.

    The validation images are --val-images training images set aside by split_validation, the
    same ones for every --seed and never trained on; best.pt is picked on them. Both splits keep the
    order of the dataset's files: with --val-images 0 training sees the whole training split."""
    images, labels, classes = load_image_dataset(cfg.dataset, cfg.data_dir, train=True)
    if cfg.val_images >= len(images):
        sys.exit(f"error: --val-images {cfg.val_images} leaves none of the {len(images)} "
                 f"training images to train on")
    split = split_validation(len(images), cfg.val_images / len(images))
    train, val = (indices.sort().values for indices in split)
    train = train[:cfg.train_limit or None]
    if len(train) < cfg.batch_size:
        sys.exit(f"error: {len(train)} training images are fewer than one batch ({cfg.batch_size})")
    test_images, test_labels, _ = load_image_dataset(cfg.dataset, cfg.data_dir, train=False)
    test = slice(cfg.test_limit or None)
    return ((images[train], labels[train]), (images[val], labels[val]),
            (test_images[test], test_labels[test]), classes)


def epoch_order(n, epoch, cfg, world, rank):
    """This rank's image indices for each step of an epoch, (steps, local batch): every rank draws
    the same permutation (seeded by the epoch) and takes its own slice of each batch."""
    steps = n // cfg.batch_size
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch))
    return order[:steps * cfg.batch_size].view(steps, world, cfg.batch_size // world)[:, rank]


def augment(images, cfg):
    """The augmentation a small ViT needs, on a uint8 batch (B, C, H, W), from torch's RNG."""
    B, C, H, W = images.shape
    if cfg.randaugment:  # RandAugment (Cubuk et al., 2020): ops drawn per image
        randaugment = v2.RandAugment(num_ops=cfg.randaugment)
        images = torch.stack([randaugment(image) for image in images])
    if cfg.crop_padding:  # pad with zeros, then cut a random H x W window out of each image
        pad = cfg.crop_padding
        padded = F.pad(images, (pad, pad, pad, pad))
        top = torch.randint(0, 2 * pad + 1, (B, 1, 1, 1))
        left = torch.randint(0, 2 * pad + 1, (B, 1, 1, 1))
        rows = top + torch.arange(H).view(1, 1, H, 1)  # (B, 1, H, 1)
        cols = left + torch.arange(W).view(1, 1, 1, W)  # (B, 1, 1, W)
        batch, channel = torch.arange(B).view(B, 1, 1, 1), torch.arange(C).view(1, C, 1, 1)
        images = padded[batch, channel, rows, cols]
    if cfg.flip:
        flip = torch.rand(B) < 0.5
        images = torch.where(flip.view(B, 1, 1, 1), images.flip(3), images)
    return images


def get_batch(split, indices, cfg, device):
    """Images and labels of one batch: cut from the uint8 split, augmented, normalised."""
    images, labels = split
    x = normalize(augment(images[indices], cfg).to(device), cfg.dataset)
    return x, labels[indices].to(device)


def mixup(x, y, alpha):
    """mixup (Zhang et al., 2018): x~ = lam x_i + (1 - lam) x_j with lam ~ Beta(alpha, alpha), and
    the loss mixed with the same weight. Returns (x~, the partners' labels or None, lam)."""
    if not alpha:
        return x, None, 1.0
    lam = float(np.random.beta(alpha, alpha))
    partner = torch.randperm(len(x), device=x.device)
    return lam * x + (1 - lam) * x[partner], y[partner], lam


def classification_loss(logits, y, y_partner, lam, label_smoothing):
    """Cross-entropy with label smoothing; under mixup, lam CE(y) + (1 - lam) CE(y_partner)."""
    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    if y_partner is None:
        return loss
    partner_loss = F.cross_entropy(logits.float(), y_partner, label_smoothing=label_smoothing)
    return lam * loss + (1 - lam) * partner_loss


# ------------------------------------------------------------------------------------ optimisation
def make_optimizer(model, cfg):
    """AdamW; weight decay on the weight matrices, not on biases, LayerNorms, x_class, E_pos."""
    decay = [p for p in model.parameters() if p.ndim == 2]
    no_decay = [p for p in model.parameters() if p.ndim != 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))


def learning_rate(step, cfg, total_steps, clock):
    """Linear warmup, then cosine decay to zero over the remaining steps, or over the clock when
    --max-minutes is set (so that a run of N minutes ends annealed)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    if cfg.max_minutes:
        progress = clock.fraction()
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))


def resume(ckpt, model, optimizer):
    """Weights, optimiser and random state from a checkpoint; returns (step, best val accuracy)."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    return ckpt["step"], ckpt["best_val_accuracy"]


def out_of_time(clock, reserve):
    """Ctrl-C, or the --max-minutes budget spent, keeping `reserve` seconds to validate."""
    return clock.done() or bool(clock.budget) and clock.seconds + reserve >= clock.budget


# -------------------------------------------------------------- evaluation, checkpoints, logging
@torch.no_grad()
def evaluate(model, images, labels, dataset, device, batch_size=1000):
    """Mean cross-entropy and accuracy of `model` over a whole split."""
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(images), batch_size):
        x = normalize(images[start:start + batch_size].to(device), dataset)
        y = labels[start:start + batch_size].to(device)
        with autocast(device):
            logits = model(x).float()
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
    model.train()
    return total_loss / len(images), correct / len(images)


class Tally:
    """Training loss and correct guesses since the last row of metrics.csv, summed on the device (no
    synchronisation per step)."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.loss = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device)
        self.steps, self.images, self.start = 0, 0, time.perf_counter()

    def add(self, loss, logits, y):
        self.loss += loss.detach()
        self.correct += (logits.argmax(-1) == y).sum()
        self.steps, self.images = self.steps + 1, self.images + len(y)


def end_of_epoch(cfg, model, optimizer, val, clock, log, classes, out_dir, steps_per_epoch,
                 cpu_start, step, tally, best):
    """Validate, write a row of metrics.csv and ckpt.pt, and best.pt when the validation accuracy is
    the best so far; also where a run stops inside an epoch. Returns (best, validation seconds)."""
    train_seconds, eval_start = time.perf_counter() - tally.start, time.perf_counter()
    val_loss, val_accuracy = math.nan, math.nan
    if cfg.val_images:
        val_loss, val_accuracy = evaluate(model, *val, cfg.dataset, next(model.parameters()).device)
    eval_seconds = time.perf_counter() - eval_start
    row = dict(epoch=step / steps_per_epoch, step=step, lr=optimizer.param_groups[0]["lr"],
               train_loss=tally.loss.item() / tally.steps,
               train_accuracy=tally.correct.item() / tally.images,
               val_loss=val_loss, val_accuracy=val_accuracy,
               train_images_per_s=tally.steps * cfg.batch_size / train_seconds,
               elapsed_s=clock.seconds, cpu_s=time.process_time() - cpu_start)
    log.log(**row)
    tqdm.write(f"epoch {row['epoch']:.3g}: train loss {row['train_loss']:.4f}, val loss "
               f"{val_loss:.4f}, val accuracy {100 * val_accuracy:.2f}%, "
               f"{row['train_images_per_s']:.0f} images/s, {row['elapsed_s']:.0f} s "
               f"({row['cpu_s']:.0f} s of CPU)")
    checkpoint = {"folder": "vit", "config": config_dict(cfg), "model": model.state_dict(),
                  "optimizer": optimizer.state_dict(), "step": step, "rng": rng_state(),
                  "classes": classes, "val_accuracy": val_accuracy,
                  "best_val_accuracy": max(best, val_accuracy), "seconds": clock.seconds,
                  "cpu_seconds": row["cpu_s"]}
    save_checkpoint(out_dir / "ckpt.pt", checkpoint)
    if val_accuracy > best:
        save_checkpoint(out_dir / "best.pt", checkpoint)
    tally.reset()
    return max(best, val_accuracy), eval_seconds


def test_once(model, test, cfg, device, out_dir):
    """The test split, evaluated once at the end: the final model, and best.pt."""
    models = {"final": model.state_dict()}
    if cfg.val_images and (out_dir / "best.pt").exists():
        models["best"] = load_checkpoint(out_dir / "best.pt", "vit", keys=["model"])["model"]
    results = {}
    for name, state in models.items():
        model.load_state_dict(state)
        results[f"test_accuracy_{name}"] = accuracy = evaluate(model, *test, cfg.dataset, device)[1]
        print(f"test accuracy of the {name} model{' (best.pt)' * (name == 'best')}: "
              f"{100 * accuracy:.2f}% ({len(test[0])} images)")
    return results


# --------------------------------------------------------------------------------------- training
def main(argv=None):
    cfg, ckpt = get_config(argv)
    out_dir = make_out_dir(cfg.out_dir)
    ddp, rank, world, device = setup(cfg)
    if ddp:
        seed_everything(cfg.seed + rank)  # each rank its own crops, flips and dropout
    train, val, test, classes = load_splits(cfg)
    steps_per_epoch = len(train[0]) // cfg.batch_size
    total_steps = cfg.epochs * steps_per_epoch
    model = ViT(**model_config(cfg)).to(device)
    optimizer = make_optimizer(model, cfg)
    step, best = resume(ckpt, model, optimizer) if ckpt else (0, -math.inf)
    train_model = torch.compile(model) if cfg.compile else model
    if ddp:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    clock = Clock(cfg.max_minutes, ckpt["seconds"] if ckpt else 0.0)
    log = MetricsLog(out_dir, COLUMNS, resume=bool(ckpt), project="vit", enabled=rank == 0,
                     wandb_config=config_dict(cfg) if cfg.wandb else None)
    end_epoch = partial(end_of_epoch, cfg, model, optimizer, val, clock, log, classes, out_dir,
                        steps_per_epoch, time.process_time() - (ckpt or {}).get("cpu_seconds", 0))
    if rank == 0:
        print(f"{cfg.dataset}: {len(train[0])} train / {len(val[0])} validation / {len(test[0])} "
              f"test images, ViT with {sum(p.numel() for p in model.parameters()) / 1e6:.3f}M "
              f"parameters, {steps_per_epoch} steps per epoch on {device} x {world}")

    tally, order, eval_seconds = Tally(device), None, 0.0
    progress = tqdm(total=total_steps, initial=step, disable=rank != 0, leave=False, mininterval=2)
    while step < total_steps and not out_of_time(clock, eval_seconds):
        epoch, i = divmod(step, steps_per_epoch)
        if order is None or i == 0:  # a new permutation every epoch
            order = epoch_order(len(train[0]), epoch, cfg, world, rank)
        x, y = get_batch(train, order[i], cfg, device)  # batch -> augment -> normalise
        x, y_partner, lam = mixup(x, y, cfg.mixup)
        with autocast(device):
            logits = train_model(x)
        loss = classification_loss(logits, y, y_partner, lam, cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(train_model.parameters(), cfg.grad_clip)
        lr = learning_rate(step, cfg, total_steps, clock)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        step += 1
        tally.add(loss, logits, y)
        progress.update()
        if step % steps_per_epoch == 0 and rank == 0:  # validate, log, checkpoint
            best, eval_seconds = end_epoch(step, tally, best)
    if tally.steps and rank == 0:  # stopped inside an epoch (clock, Ctrl-C): a resumable checkpoint
        best, _ = end_epoch(step, tally, best)
    progress.close()
    clock.close()  # Ctrl-C means again what it meant before

    results = test_once(model, test, cfg, device, out_dir) if rank == 0 else {}
    if log.wandb:
        log.wandb.summary.update(results)
    log.close()
    teardown(ddp)
    return results


if __name__ == "__main__":
    main()
