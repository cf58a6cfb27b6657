"""Train a class-conditional DDPM (eps-prediction, L_simple, classifier-free label dropout) on
MNIST, FashionMNIST or CIFAR-10.

    python ddpm/train.py                                    # the defaults: a small U-Net on MNIST
    python ddpm/train.py --preset gpu --dataset cifar10     # the DDPM paper's CIFAR-10 U-Net
    torchrun --standalone --nproc_per_node=4 ddpm/train.py --preset gpu --dataset cifar10
"""
import math
import os
import sys
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from model import Diffusion, build_model, ema_copy, ema_update
from plumbing import (
    IMAGE_DATASETS,
    Clock,
    MetricsLog,
    autocast,
    config_dict,
    config_from_checkpoint,
    flag,
    load_checkpoint,
    load_image_dataset,
    make_out_dir,
    parse_config,
    require,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    setup,
    teardown,
)

NUM_CLASSES = 10  # every dataset here has ten classes; index 10 is the null class of guidance


@dataclass
class Config:
    """Train a class-conditional DDPM (L_simple, classifier-free label dropout) on MNIST,
    FashionMNIST or CIFAR-10. The defaults are the CPU preset: a 1.1M-parameter U-Net, about 2 h on
    one CPU thread."""
    # data
    dataset: Literal["mnist", "fashion_mnist", "cifar10"] = "mnist"  # training images
    data_dir: str = os.environ.get("DATA_DIR", "data")  # datasets ($DATA_DIR, else ./data)
    out_dir: str = "runs/ddpm"  # ckpt.pt, metrics.csv and the samples/ grids go here
    # diffusion
    T: int = 1000  # number of diffusion steps
    schedule: Literal["linear", "cosine"] = "linear"  # beta schedule (linear: 1e-4 -> 0.02)
    p_uncond: float = 0.1  # probability of dropping the label to the null class (guidance)
    # eps_theta
    backbone: Literal["unet", "uvit"] = "unet"  # the network for eps_theta
    channels: int = 32  # U-Net base width (a multiple of 8)
    channel_mult: tuple[int, ...] = (1, 2, 2)  # U-Net width multiplier per resolution level
    num_res_blocks: int = 1  # U-Net residual blocks per level
    attn_levels: tuple[int, ...] = (2,)  # U-Net levels (0: full resolution) with self-attention
    dropout: float = 0.1  # U-Net dropout in the residual blocks
    patch_size: int = 4  # U-ViT patch size (divides the image size)
    vit_dim: int = 128  # U-ViT token width
    vit_depth: int = 7  # U-ViT transformer blocks
    vit_heads: int = 4  # U-ViT attention heads
    # optimisation
    steps: int = 7000  # optimizer steps
    batch_size: int = 64  # images per step (per process under torchrun)
    lr: float = 5e-4  # peak AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 100  # linear learning-rate warmup, then cosine decay to 10% of --lr
    grad_clip: float = 1.0  # clip the gradient norm to this
    ema_decay: float = 0.995  # EMA decay of the weights sample.py uses
    # running
    max_minutes: float = 0.0  # stop with a checkpoint after this many minutes of this run (0: off)
    log_every: int = 25  # a metrics.csv row every N steps
    sample_every: int = 500  # a DDIM-20 grid in out_dir/samples every N steps (0: never)
    checkpoint_every: int = 250  # save ckpt.pt every N steps
    resume: str | None = None  # continue from this checkpoint exactly where it stopped
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: cuda, then mps, then cpu
    threads: int = 0  # CPU threads for torch (0: torch's default; 1 is fastest on a busy CPU)
    seed: int = 0  # seeds Python, NumPy and torch (plus the rank under torchrun)
    compile: bool = False  # torch.compile eps_theta
    wandb: bool = False  # also log to Weights & Biases (WANDB_MODE=offline works)

    def __post_init__(self):
        require(self.dataset in IMAGE_DATASETS, f"--dataset must be one of {list(IMAGE_DATASETS)}")
        image_size = IMAGE_DATASETS[self.dataset][1]
        for name in ("steps", "batch_size", "lr", "grad_clip", "log_every", "checkpoint_every"):
            require(getattr(self, name) > 0, f"{flag(name)} must be positive")
        require(self.T >= 2, "--T must be at least 2")
        require(self.p_uncond < 1, "--p-uncond must be below 1")
        require(self.ema_decay < 1, "--ema-decay must be below 1")
        require(self.dropout < 1, "--dropout must be below 1")
        require(self.channels >= 8 and self.channels % 8 == 0,
                "--channels must be a positive multiple of 8 (GroupNorm's groups)")
        require(len(self.channel_mult) > 0 and all(m >= 1 for m in self.channel_mult),
                "--channel-mult takes positive integers, e.g. --channel-mult 1 2 2")
        require(self.patch_size >= 1 and image_size % self.patch_size == 0,
                f"--patch-size must divide the image size ({image_size})")
        require(self.vit_heads >= 1 and self.vit_dim % self.vit_heads == 0,
                "--vit-dim must be a multiple of --vit-heads")


# Presets are overrides applied before explicit flags. "cpu" is the defaults above (7,000 steps,
# about 2 h on one CPU thread); "gpu" is the DDPM paper's CIFAR-10 U-Net (35.7M parameters: 128
# channels, mult 1,2,2,2, 2 blocks, attention at 16x16, dropout 0.1, lr 2e-4, EMA 0.9999), batch 128
# per GPU.
PRESETS = {
    "cpu": {},
    "gpu": dict(channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_levels=(1,),
                dropout=0.1, batch_size=128, lr=2e-4, warmup_steps=5000, steps=800_000,
                ema_decay=0.9999, sample_every=10_000, checkpoint_every=5_000),
}
# what --resume must not change: the flags that shape eps_theta and the diffusion
MODEL_FIELDS = ("dataset", "T", "schedule", "backbone", "channels", "channel_mult",
                "num_res_blocks", "attn_levels", "patch_size", "vit_dim", "vit_depth", "vit_heads")
RESUME_KEYS = ("config", "model", "ema", "optimizer", "step", "rng")


def load_resume(cfg):
    """The --resume checkpoint, checked before any work: it must hold the model the flags build."""
    ckpt = load_checkpoint(cfg.resume, "ddpm", keys=RESUME_KEYS)
    stored = config_dict(config_from_checkpoint(Config, ckpt, cfg.resume))
    changed = [f"{flag(k)} {stored[k]}" for k in MODEL_FIELDS if stored[k] != config_dict(cfg)[k]]
    if changed:
        sys.exit(f"error: checkpoint {cfg.resume} was trained with {', '.join(changed)}; "
                 f"pass the same values to --resume it")
    return ckpt


def build(cfg, device, ckpt, rank):
    """eps_theta, its EMA, the diffusion schedule and the optimizer, where --resume left them."""
    _, image_size, in_channels, _, _ = IMAGE_DATASETS[cfg.dataset]
    model = build_model(config_dict(cfg), in_channels, image_size, NUM_CLASSES).to(device)
    ema = ema_copy(model)
    diffusion = Diffusion(cfg.T, cfg.schedule).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if not ckpt:
        return model, ema, diffusion, optimizer, 0
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
    return model, ema, diffusion, optimizer, ckpt["step"]


def save(path, cfg, model, ema, optimizer, step, seconds, ddp, world_size):
    """ckpt.pt, with every rank's RNG state: --resume continues each process's stream exactly."""
    states = [rng_state()]
    if ddp:
        states = [None] * world_size
        dist.all_gather_object(states, rng_state())
    if not ddp or dist.get_rank() == 0:
        save_checkpoint(path, {"folder": "ddpm", "config": config_dict(cfg),
                               "model": model.state_dict(), "ema": ema.state_dict(),
                               "optimizer": optimizer.state_dict(), "step": step,
                               "seconds": seconds, "rng": states})


@torch.no_grad()
def save_samples(ema, diffusion, dataset, path):
    """A DDIM-20 grid of the EMA model, guidance 2, one column per class: training at a glance."""
    device = next(ema.parameters()).device
    _, image_size, in_channels, _, _ = IMAGE_DATASETS[dataset]
    shape = (NUM_CLASSES, in_channels, image_size, image_size)
    y = torch.arange(NUM_CLASSES, device=device)
    generator = torch.Generator(device).manual_seed(0)
    x, _ = diffusion.sample(ema, y, shape, "ddim", 20, w=2.0, null_class=NUM_CLASSES,
                            generator=generator)
    path.parent.mkdir(exist_ok=True)
    torchvision.utils.save_image((x + 1) / 2, path, nrow=NUM_CLASSES)


def lr_at(step, cfg):
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv=None):
    cfg = parse_config(Config, argv, PRESETS)
    ckpt = load_resume(cfg) if cfg.resume else None  # a bad --resume fails before any work
    out_dir = make_out_dir(cfg.out_dir)
    # the whole run's budget: time before a --resume counts, the sample grids included
    clock = Clock(cfg.max_minutes, ckpt.get("seconds", 0.0) if ckpt else 0.0)
    ddp, rank, world_size, device = setup(cfg)
    seed_everything(cfg.seed + rank)  # per-rank seeds: each process draws its own batches, t, eps
    # all the training images in memory as uint8 (N, C, H, W), scaled to [-1, 1] per batch
    images, labels, _ = load_image_dataset(cfg.dataset, cfg.data_dir, train=True)
    model, ema, diffusion, optimizer, step = build(cfg, device, ckpt, rank)
    eps_theta = torch.compile(model) if cfg.compile else model
    eps_theta = DDP(eps_theta) if ddp else eps_theta
    log = MetricsLog(out_dir, ["step", "loss", "lr", "grad_norm", "seconds"], resume=bool(ckpt),
                     wandb_config=config_dict(cfg) if cfg.wandb else None, project="ddpm",
                     enabled=rank == 0)
    if rank == 0:
        print(f"eps_theta: {cfg.backbone}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
              f"parameters; {cfg.dataset}: {len(images)} images on {device} x {world_size}")

    # ---- the training loop: batch -> forward -> loss -> backward -> clip -> step -> EMA -> log
    losses = []
    progress = tqdm(total=cfg.steps, initial=step, disable=rank != 0, desc="train")
    while step < cfg.steps:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(len(images), (cfg.batch_size,))
        x0 = images[index].to(device).float() / 127.5 - 1                  # (B, C, H, W) in [-1, 1]
        y = labels[index].to(device)
        with autocast(device):
            loss = diffusion.loss(eps_theta, x0, y, cfg.p_uncond, NUM_CLASSES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        # EMA with a warm-up of the decay (as in many DDPM codebases): short runs are not all init
        ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        step += 1
        losses.append(loss.item())
        progress.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            mean_loss, losses = sum(losses) / len(losses), []
            log.log(step=step, loss=mean_loss, lr=lr, grad_norm=grad_norm.item(),
                    seconds=clock.seconds)
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
        if rank == 0 and cfg.sample_every and step % cfg.sample_every == 0:
            save_samples(ema, diffusion, cfg.dataset, out_dir / "samples" / f"step{step:07d}.png")
        stop = clock.done()  # --max-minutes spent, or Ctrl-C: every rank stops at the same step
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop:
            save(out_dir / "ckpt.pt", cfg, model, ema, optimizer, step, clock.seconds, ddp,
                 world_size)
        if stop:
            break
    progress.close()
    log.close()
    clock.close()
    if rank == 0 and step < cfg.steps:
        print(f"stopped at step {step}; continue with --resume {out_dir / 'ckpt.pt'}")
    elif rank == 0:
        print(f"done: step {step}, {clock.seconds:.0f} s, checkpoint {out_dir / 'ckpt.pt'}")
    teardown(ddp)


if __name__ == "__main__":
    main()
