"""Train RealNVP by maximum likelihood on MNIST, FashionMNIST or CIFAR-10, in bits per dimension.

    python nf/train.py                          # multi-scale RealNVP on MNIST
    python nf/train.py --arch flat              # 30 affine couplings over the flattened image
    torchrun --standalone --nproc_per_node=2 nf/train.py --device cpu --steps 20   # DDP (gloo)

Every --eval-every steps the model is scored on a validation split carved from the training images
(--val-fraction) and saved; the test images are scored once, when the last step is done.
"""
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from model import FlatRealNVP, RealNVP, bits_per_dim, log_likelihood
from plumbing import (
    IMAGE_DATASETS,
    Clock,
    MetricsLog,
    config_dict,
    config_from_checkpoint,
    load_checkpoint,
    load_image_dataset,
    make_out_dir,
    parse_config,
    require,
    rng_state,
    save_checkpoint,
    set_rng_state,
    setup,
    split_validation,
    teardown,
)


@dataclass
class Config:
    """Train RealNVP by maximum likelihood on MNIST, FashionMNIST or CIFAR-10 (bits/dim)."""
    # data
    dataset: Literal["mnist", "fashion_mnist", "cifar10"] = "mnist"  # torchvision dataset to model
    data_dir: str = os.environ.get("DATA_DIR", "data")  # datasets are here ($DATA_DIR, else ./data)
    out_dir: str = "runs/nf"  # ckpt.pt and metrics.csv go here
    val_fraction: float = 0.1  # share of the training images held out for validation (0: none)
    # model
    arch: Literal["multiscale", "flat"] = "multiscale"  # RealNVP variant
    num_scales: int = 2  # multiscale: number of scales (2 for 28x28 images)
    hidden: int = 32  # channels of the s/t ResNets (flat: MLP width, try 128)
    blocks: int = 1  # multiscale: residual blocks in each s/t ResNet
    num_couplings: int = 30  # flat: number of affine coupling layers
    # optimisation
    steps: int = 3000  # optimisation steps
    batch_size: int = 64  # training batch size (per process)
    lr: float | None = None  # Adam learning rate (None: 1e-3, or with --resume the checkpoint's)
    scale_l2: float = 5e-5  # L2 penalty on the couplings' scale parameters (paper: 5e-5)
    grad_clip: float = 100.0  # global gradient-norm clip
    eval_every: int = 1000  # score the validation images and save a checkpoint every N steps
    eval_examples: int = 10000  # at most this many validation (at the end: test) images are scored
    # run
    max_minutes: float = 0.0  # limit; counts evaluation and the time before a --resume (0: off)
    resume: str | None = None  # continue from this checkpoint exactly where it stopped
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: cuda, then mps, then cpu
    threads: int = 0  # CPU threads for torch (0: torch's default)
    seed: int = 0  # seeds Python, NumPy and torch (rank r of a DDP run draws data with seed + r)
    compile: bool = False  # torch.compile the model
    wandb: bool = False  # also log to Weights & Biases (WANDB_MODE=offline works)

    def __post_init__(self):
        for name in ["num_scales", "hidden", "blocks", "num_couplings", "steps", "batch_size",
                     "eval_every", "eval_examples"]:
            value = getattr(self, name)
            require(value >= 1, f"--{name.replace('_', '-')} must be positive (got {value})")
        require(self.lr is None or self.lr > 0, "--lr must be positive")
        require(self.grad_clip > 0, "--grad-clip must be positive")
        require(self.val_fraction < 1, "--val-fraction must be below 1")
        size, scales = IMAGE_DATASETS[self.dataset][1], self.num_scales
        require(self.arch != "multiscale" or size % 2 ** (scales - 1) == 0,
                f"--num-scales {scales} needs an image size divisible by {2 ** (scales - 1)}")


# what a resumed run may change: where it runs, for how long (and --lr, when given)
RESUMABLE = ["steps", "max_minutes", "device", "threads", "data_dir", "out_dir", "resume"]
COLUMNS = ["step", "seconds", "train_bpd", "val_bpd", "test_bpd"]


def resolve(cfg):
    """(config, checkpoint): a resumed run keeps its model, data and schedule, and its lr unless
    --lr is given (a last phase at a lower learning rate)."""
    ckpt = None
    if cfg.resume:
        keys = ["config", "model", "optimizer", "step", "rng", "seconds"]
        ckpt = load_checkpoint(cfg.resume, "nf", keys=keys)
        given = {k: getattr(cfg, k) for k in RESUMABLE} | ({"lr": cfg.lr} if cfg.lr else {})
        cfg = config_from_checkpoint(Config, ckpt, cfg.resume, **given)
    return replace(cfg, lr=cfg.lr or 1e-3), ckpt


def load_data(cfg, device):
    """uint8 images (N, C, H, W): training, validation (a fixed split of the training set), test."""
    images = load_image_dataset(cfg.dataset, cfg.data_dir, train=True)[0]
    train_idx, val_idx = split_validation(len(images), cfg.val_fraction)
    test = load_image_dataset(cfg.dataset, cfg.data_dir, train=False)[0][: cfg.eval_examples]
    val = images[val_idx][: cfg.eval_examples]
    return images[train_idx.sort().values].to(device), val.to(device), test.to(device)


def build_model(cfg):
    _, size, channels, _, _ = IMAGE_DATASETS[cfg.dataset]
    if cfg.arch == "flat":
        return FlatRealNVP(channels, size, cfg.num_couplings, cfg.hidden)
    return RealNVP(channels, size, cfg.num_scales, cfg.hidden, cfg.blocks)


@torch.no_grad()
def initialize_actnorm(model, x_train, batch_size, device):
    """ActNorm's data-dependent initialisation: one forward pass on a batch of at least 256."""
    first = x_train[torch.randint(len(x_train), (max(batch_size, 256),), device=device)]
    log_likelihood(model, first, torch.rand(first.shape, device=device))


def restore(ckpt, model, optimizer, cfg, rank, world):
    """Weights, optimiser state, the run's lr and every rank's random numbers: (step, metrics)."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr
    set_rng_state(ckpt["rng"][rank % len(ckpt["rng"])])
    if len(ckpt["rng"]) != world:  # another number of processes: fresh, distinct streams
        torch.manual_seed(cfg.seed + rank + ckpt["step"])
    return ckpt["step"], ckpt.get("metrics", {})


@torch.no_grad()
def evaluate(model, x, batch_size=500, seed=1234):
    """Bits/dim with a fixed dequantisation noise: a checkpoint always gives the same number."""
    if len(x) == 0:
        return None
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        noise = torch.rand(xb.shape, generator=generator).to(xb.device)
        total += bits_per_dim(log_likelihood(model, xb, noise), xb[0].numel()).sum().item()
    model.train()
    return total / len(x)


def log_evaluation(log, clock, model, step, bpd, val, test, final):
    """One metrics row: validation bits/dim; the test set only once, after the last step."""
    row = dict(step=step, train_bpd=bpd.item(), val_bpd=evaluate(model, val))
    row["test_bpd"] = evaluate(model, test) if final else None
    row["seconds"] = round(clock.seconds, 1)
    text = f"step {step}: train {row['train_bpd']:.4f} bits/dim"
    for split in ["val", "test"]:
        text += f", {split} {row[split + '_bpd']:.4f}" if row[split + "_bpd"] is not None else ""
    tqdm.write(text)
    log.log(**row)
    return row


def save(path, master, cfg, model, optimizer, step, clock, metrics):
    """All ranks hand in their RNG state (each draws its own batches); rank 0 writes."""
    rng = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(rng, rng_state())
    else:
        rng[0] = rng_state()
    if master:
        save_checkpoint(path, {
            "folder": "nf", "config": config_dict(cfg), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "step": step, "rng": rng,
            "seconds": clock.seconds, "metrics": metrics})


def stop_if_not_finite(loss, step, ckpt_path):
    if not torch.isfinite(loss):
        last = ckpt_path if ckpt_path.exists() else "(none yet)"
        sys.exit(f"error: the loss became {loss.item()} at step {step}; stopped. The last good "
                 f"checkpoint is {last}; try a lower --lr or --grad-clip")


def main(argv=None):
    cfg, ckpt = resolve(parse_config(Config, argv))
    ddp, rank, world, device = setup(cfg)
    master = rank == 0
    torch.manual_seed(cfg.seed + rank)  # each process draws its own batches and noise
    x_train, x_val, x_test = load_data(cfg, device)
    model = build_model(cfg).to(device)
    scales = [p for name, p in model.named_parameters() if name.endswith(".scale")]
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if ckpt:
        step, row = restore(ckpt, model, optimizer, cfg, rank, world)
    else:  # before DDP broadcasts rank 0's parameters to all
        step, row = 0, {}
        initialize_actnorm(model, x_train, cfg.batch_size, device)
    net = DDP(model) if ddp else model
    net = torch.compile(net) if cfg.compile else net
    ckpt_path = (make_out_dir(cfg.out_dir) if master else Path(cfg.out_dir)) / "ckpt.pt"
    log = MetricsLog(cfg.out_dir, COLUMNS, resume=bool(ckpt), enabled=master,
                     wandb_config=config_dict(cfg) if cfg.wandb else None,
                     project="paper-implementations-nf")
    if master:
        print(f"{cfg.arch} RealNVP: {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{world} process(es) on {device}")
    num_dims = x_train[0].numel()
    clock = Clock(cfg.max_minutes, ckpt["seconds"] if ckpt else 0.0)
    bar = tqdm(total=cfg.steps, initial=step, disable=not master, desc="train")
    while step < cfg.steps and not clock.done():
        xb = x_train[torch.randint(len(x_train), (cfg.batch_size,), device=device)]
        noise = torch.rand(xb.shape, device=device)  # uniform dequantisation
        bpd = bits_per_dim(log_likelihood(net, xb, noise), num_dims).mean()
        loss = bpd + cfg.scale_l2 * sum(s.pow(2).sum() for s in scales)
        stop_if_not_finite(loss, step, ckpt_path)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(train_bpd=f"{bpd.item():.3f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            if master:
                row = log_evaluation(log, clock, model, step, bpd, x_val, x_test, step == cfg.steps)
            save(ckpt_path, master, cfg, model, optimizer, step, clock, row)
    bar.close()
    if step < cfg.steps:  # out of time, or Ctrl-C: a checkpoint that --resume continues exactly
        save(ckpt_path, master, cfg, model, optimizer, step, clock, row)
        if master:
            print(f"stopped at step {step} of {cfg.steps}; go on with --resume {ckpt_path}")
    clock.close()
    log.close()
    teardown(ddp)
    return model


if __name__ == "__main__":
    main()
