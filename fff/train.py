"""Train a Fast Feedforward Network (or its dense baseline) on MNIST, FashionMNIST or CIFAR-10.

    python fff/train.py                            # FFF, depth 3, leaf and node width 32, MNIST
    python fff/train.py --model ff                 # dense baseline of the training width (8 x 32)
    python fff/train.py --model ff --ff-width 32   # dense baseline of the inference width

Nothing is selected during training: the checkpoint is the last step's, and the test set is
evaluated once, when the last epoch ends.
"""
import math
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import FF, FFF, hardening_loss
from plumbing import (
    IMAGE_DATASETS,
    Clock,
    MetricsLog,
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
    set_rng_state,
    setup,
    teardown,
)


@dataclass
class Config:
    """Train a Fast Feedforward Network (or a dense baseline) on MNIST, FashionMNIST or CIFAR-10."""
    # data
    dataset: Literal["mnist", "fashion_mnist", "cifar10"] = "mnist"  # torchvision dataset
    data_dir: str = os.environ.get("DATA_DIR", "data")  # datasets are here ($DATA_DIR, else ./data)
    out_dir: str = "runs/fff"  # ckpt.pt and metrics.csv go here
    # model
    model: Literal["fff", "ff"] = "fff"  # fast feedforward network or dense baseline
    depth: int = 3  # FFF tree depth d: 2^d leaves, 2^d - 1 nodes
    leaf_width: int = 32  # hidden width of each FFF leaf
    node_width: int = 32  # hidden width of each FFF node network
    ff_width: int | None = None  # dense baseline's hidden width (None: 2^depth * leaf-width)
    # the paper's training tricks
    hardening: float = 1.0  # scale h of the hardening (node entropy) loss
    harden_from: float = 0.2  # fraction of the epochs after which the hardening loss is switched on
    transposition_prob: float = 0.0  # chance of swapping a node's children while training
    # optimisation
    epochs: int = 10  # passes over the training set
    batch_size: int = 256  # training batch size
    lr: float = 3e-3  # peak Adam learning rate, cosine-decayed to 0
    # run
    max_minutes: float = 0.0  # limit; counts evaluation and the time before a --resume (0: off)
    resume: str | None = None  # continue from this checkpoint exactly where it stopped
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: cuda, then mps, then cpu
    threads: int = 0  # CPU threads for torch (0: torch's default)
    seed: int = 0  # seeds Python, NumPy and torch
    compile: bool = False  # torch.compile the model
    wandb: bool = False  # also log to Weights & Biases (WANDB_MODE=offline works)

    def __post_init__(self):
        require(self.depth >= 1, f"--depth must be at least 1 (got {self.depth})")
        for name in ["leaf_width", "node_width", "ff_width", "epochs", "batch_size"]:
            value = getattr(self, name)
            require(value is None or value >= 1,
                    f"--{name.replace('_', '-')} must be positive (got {value})")
        require(self.lr > 0, "--lr must be positive")
        require(self.harden_from <= 1, "--harden-from is a fraction of training, at most 1")
        require(self.transposition_prob < 0.5, "--transposition-prob must be below 0.5")


RESUMABLE = ["epochs", "max_minutes", "device", "threads", "data_dir", "out_dir", "resume"]
COLUMNS = ["epoch", "step", "seconds", "train_loss", "hardening_loss", "h", "test_soft_acc",
           "test_hard_acc"]


def load_split(name, data_dir, train, device="cpu"):
    """(images flattened and normalised, labels): the FFF sees each image as one vector."""
    images, labels, _ = load_image_dataset(name, data_dir, train)
    return normalize(images, name).flatten(1).to(device), labels.to(device)  # (N, C*H*W), (N,)


def build_model(cfg):
    _, size, channels, _, _ = IMAGE_DATASETS[cfg.dataset]
    if cfg.model == "fff":
        return FFF(channels * size * size, 10, cfg.depth, cfg.leaf_width, cfg.node_width)
    return FF(channels * size * size, 10, cfg.ff_width or 2**cfg.depth * cfg.leaf_width)


def cosine(progress):
    """Learning-rate factor: 1 at the start, cosine-decayed to 0 at the end of training."""
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1)))


@torch.no_grad()
def evaluate(model, x, y, batch_size=1024):
    """(soft accuracy, hard accuracy): the training-time mixture vs the single-leaf path."""
    model.eval()
    soft = hard = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        soft += (model(xb)[0].argmax(-1) == yb).sum().item()
        hard += (model.forward_hard(xb).argmax(-1) == yb).sum().item()
    model.train()
    return soft / len(x), hard / len(x)


def save(path, cfg, model, optimizer, step, perm, clock, metrics):
    save_checkpoint(path, {
        "folder": "fff", "config": config_dict(cfg), "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "step": step, "perm": perm.cpu(), "rng": rng_state(),
        "seconds": clock.seconds, "metrics": metrics})


def end_of_epoch(log, clock, model, test, epoch, step, loss, harden, h, final):
    """One metrics row per epoch; the test set only after the last one."""
    row = dict(epoch=epoch, step=step, train_loss=loss.item(), hardening_loss=harden.item(), h=h)
    text = f"epoch {epoch}: loss {loss.item():.4f}, hardening {harden.item():.3f} (h={h})"
    if final:
        soft, hard = row["test_soft_acc"], row["test_hard_acc"] = evaluate(model, *test)
        text += f", test soft {100 * soft:.2f}%, hard {100 * hard:.2f}%"
    row["seconds"] = round(clock.seconds, 1)
    tqdm.write(text)
    log.log(**row)
    return row


def main(argv=None):
    cfg = parse_config(Config, argv)
    keys = ["config", "model", "optimizer", "step", "perm", "rng", "seconds"]
    ckpt = load_checkpoint(cfg.resume, "fff", keys=keys) if cfg.resume else None
    if ckpt:  # a resumed run keeps its configuration but for where it runs and for how long
        keep = {name: getattr(cfg, name) for name in RESUMABLE}
        cfg = config_from_checkpoint(Config, ckpt, cfg.resume, **keep)
    ddp, _, _, device = setup(cfg)
    x_train, y_train = load_split(cfg.dataset, cfg.data_dir, True, device)
    test = load_split(cfg.dataset, cfg.data_dir, False, device)
    model = build_model(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps_per_epoch = -(-len(x_train) // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    step, perm, row = 0, torch.randperm(0), {}
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, perm, row = ckpt["step"], ckpt["perm"].to(device), ckpt.get("metrics", {})
        set_rng_state(ckpt["rng"])
    forward = torch.compile(model) if cfg.compile else model
    out_dir = make_out_dir(cfg.out_dir)
    log = MetricsLog(out_dir, COLUMNS, resume=bool(ckpt), project="paper-implementations-fff",
                     wandb_config=config_dict(cfg) if cfg.wandb else None)
    print(f"{cfg.model}: {sum(p.numel() for p in model.parameters()):,} parameters on {device}")
    clock = Clock(cfg.max_minutes, ckpt["seconds"] if ckpt else 0.0)
    bar = tqdm(total=total_steps, initial=step, leave=False)
    while step < total_steps and not clock.done():
        epoch, i = divmod(step, steps_per_epoch)
        if i == 0:
            perm = torch.randperm(len(x_train), device=device)  # a fresh order every epoch
        h = cfg.hardening if cfg.model == "fff" and epoch >= cfg.harden_from * cfg.epochs else 0.0
        idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
        logits, node_logits = forward(x_train[idx], transposition_prob=cfg.transposition_prob)
        loss = F.cross_entropy(logits, y_train[idx])  # L_pred
        harden = hardening_loss(node_logits) if node_logits is not None else torch.zeros(())
        optimizer.zero_grad(set_to_none=True)
        (loss + h * harden).backward()  # L = L_pred + h * L_harden, Eq. 4
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * cosine(step / total_steps)
        optimizer.step()
        step += 1
        bar.update(1)
        if i % 20 == 0:
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", L_h=f"{harden.item():.3f}")
        if step % steps_per_epoch == 0:
            row = end_of_epoch(log, clock, model, test, epoch + 1, step, loss, harden, h,
                               final=step == total_steps)
            save(out_dir / "ckpt.pt", cfg, model, optimizer, step, perm, clock, row)
    bar.close()
    if step < total_steps:  # out of time, or Ctrl-C: a checkpoint that --resume continues exactly
        save(out_dir / "ckpt.pt", cfg, model, optimizer, step, perm, clock, row)
        print(f"stopped at step {step} of {total_steps}; go on with --resume {out_dir / 'ckpt.pt'}")
    print(f"saved {out_dir / 'ckpt.pt'}")
    clock.close()
    log.close()
    teardown(ddp)
    return model


if __name__ == "__main__":
    main()
