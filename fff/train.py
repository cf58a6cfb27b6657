"""Train a Fast Feedforward Network (or its dense baseline) on MNIST, FashionMNIST or CIFAR-10.

    python fff/train.py                                  # FFF, depth 3, leaf and node width 32, MNIST
    python fff/train.py --model ff                       # dense baseline of the same training width (8 x 32)
    python fff/train.py --model ff --ff-width 32         # dense baseline of the same inference width
"""
import argparse
import contextlib
import csv
import io
import math
import os
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

from model import FF, FFF, hardening_loss

DATASETS = {  # name: (torchvision class, input width, mean, std)
    "mnist": (torchvision.datasets.MNIST, 28 * 28, 0.1307, 0.3081),
    "fashion_mnist": (torchvision.datasets.FashionMNIST, 28 * 28, 0.2860, 0.3530),
    "cifar10": (torchvision.datasets.CIFAR10, 32 * 32 * 3, 0.4734, 0.2516),
}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=sorted(DATASETS), help="torchvision dataset to classify")
    p.add_argument("--model", default="fff", choices=["fff", "ff"], help="fast feedforward network or dense baseline")
    p.add_argument("--depth", type=int, default=3, help="FFF tree depth d: 2^d leaves, 2^d - 1 nodes")
    p.add_argument("--leaf-width", type=int, default=32, help="hidden width of each FFF leaf")
    p.add_argument("--node-width", type=int, default=32, help="hidden width of each FFF node network")
    p.add_argument("--ff-width", type=int, default=None,
                   help="hidden width of the dense baseline (default: the FFF's training width 2^depth * leaf-width)")
    p.add_argument("--hardening", type=float, default=1.0, help="scale h of the hardening (node entropy) loss")
    p.add_argument("--harden-from", type=float, default=0.2,
                   help="fraction of training after which the hardening loss is switched on (its schedule)")
    p.add_argument("--transposition-prob", type=float, default=0.0,
                   help="probability of swapping a node's children while training (against overfragmentation)")
    p.add_argument("--epochs", type=int, default=10, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=256, help="training batch size")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (cosine-decayed to 0)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to train")
    p.add_argument("--seed", type=int, default=0, help="seed for Python, NumPy and torch")
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "data"), help="dataset root (default $DATA_DIR or ./data)")
    p.add_argument("--out-dir", default="runs/fff", help="where to write the checkpoint and metrics.csv")
    p.add_argument("--resume", default=None, help="continue from this checkpoint")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases")
    return p


def check_args(parser, args):
    if args.depth < 1:
        parser.error(f"--depth must be at least 1 (got {args.depth})")
    for flag in ["leaf_width", "node_width", "epochs", "batch_size"]:
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be positive (got {getattr(args, flag)})")
    if args.ff_width is not None and args.ff_width < 1:
        parser.error(f"--ff-width must be positive (got {args.ff_width})")
    if args.lr <= 0 or args.hardening < 0 or not 0 <= args.harden_from <= 1 or not 0 <= args.transposition_prob < 0.5:
        parser.error("need --lr > 0, --hardening >= 0, 0 <= --harden-from <= 1, 0 <= --transposition-prob < 0.5")


def get_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def load_split(name, data_dir, train):
    """(images flattened and normalised, labels) as tensors; downloads when the files are absent and we are online."""
    cls, _, mean, std = DATASETS[name]
    created = not os.path.exists(data_dir)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ds = cls(data_dir, train=train, download=True)
    except Exception as e:  # offline and absent: torchvision raises from deep inside urllib
        if created:
            shutil.rmtree(data_dir, ignore_errors=True)
        sys.exit(f"error: {cls.__name__} is not in {os.path.abspath(data_dir)} and could not be downloaded "
                 f"({type(e).__name__}); put the files there in torchvision's layout or pass --data-dir / set DATA_DIR")
    x = torch.as_tensor(ds.data).float().div(255).flatten(1)  # (N, input width)
    return (x - mean) / std, torch.as_tensor(ds.targets)


def build_model(config):
    _, input_width, _, _ = DATASETS[config["dataset"]]
    if config["model"] == "fff":
        return FFF(input_width, 10, config["depth"], config["leaf_width"], config["node_width"])
    return FF(input_width, 10, config["ff_width"] or 2 ** config["depth"] * config["leaf_width"])


def save_checkpoint(path, checkpoint):
    torch.save(checkpoint, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash never leaves a half-written checkpoint


def load_checkpoint(path, device="cpu"):
    if not os.path.isfile(path):
        sys.exit(f"error: checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        sys.exit(f"error: {path} is not a readable checkpoint (truncated or corrupt?): {type(e).__name__}")
    if not isinstance(checkpoint, dict) or checkpoint.get("folder") != "fff":
        sys.exit(f"error: {path} was not written by fff/train.py")
    return checkpoint


@torch.no_grad()
def evaluate(model, x, y, batch_size=1024):
    """(soft accuracy, hard accuracy): the training-mode mixture vs the single-leaf inference path."""
    model.eval()
    soft = hard = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        soft += (model(xb)[0].argmax(-1) == yb).sum().item()
        hard += (model.forward_hard(xb).argmax(-1) == yb).sum().item()
    model.train()
    return soft / len(x), hard / len(x)


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    config = checkpoint["config"] if checkpoint else vars(args)
    if checkpoint:  # a resumed run keeps its own configuration; only where it runs and for how long may change
        config = dict(config, epochs=args.epochs, device=args.device, data_dir=args.data_dir, out_dir=args.out_dir)
    device = get_device(config["device"])
    random.seed(config["seed"])
    np.random.seed(config["seed"])
    torch.manual_seed(config["seed"])

    x_train, y_train = load_split(config["dataset"], config["data_dir"], train=True)
    x_test, y_test = load_split(config["dataset"], config["data_dir"], train=False)
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))

    model = build_model(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    steps_per_epoch = -(-len(x_train) // config["batch_size"])
    total_steps = config["epochs"] * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total_steps, 1))))
    start_epoch = 0
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start_epoch = checkpoint["epoch"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
    forward = torch.compile(model) if config["compile"] else model

    os.makedirs(config["out_dir"], exist_ok=True)
    ckpt_path = os.path.join(config["out_dir"], "ckpt.pt")
    csv_path = os.path.join(config["out_dir"], "metrics.csv")
    if config["wandb"]:
        import wandb

        wandb.init(project="paper-implementations-fff", config=config)
    print(f"{config['model']}: {sum(p.numel() for p in model.parameters()):,} parameters on {device}")

    t0 = time.time()
    for epoch in range(start_epoch, config["epochs"]):
        h = config["hardening"] if config["model"] == "fff" and epoch >= config["harden_from"] * config["epochs"] else 0.0
        perm = torch.randperm(len(x_train), device=device)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config['epochs']}", leave=False)
        for i in bar:
            idx = perm[i * config["batch_size"] : (i + 1) * config["batch_size"]]
            logits, node_logits = forward(x_train[idx], transposition_prob=config["transposition_prob"])
            loss = F.cross_entropy(logits, y_train[idx])  # L_pred
            harden = hardening_loss(node_logits) if node_logits is not None else torch.zeros((), device=device)
            optimizer.zero_grad(set_to_none=True)
            (loss + h * harden).backward()  # L = L_pred + h * L_harden
            optimizer.step()
            scheduler.step()
            if i % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", harden=f"{harden.item():.3f}")
        soft_acc, hard_acc = evaluate(model, x_test, y_test)
        row = {"epoch": epoch + 1, "seconds": round(time.time() - t0, 1), "train_loss": round(loss.item(), 4),
               "hardening_loss": round(harden.item(), 4), "h": h, "test_soft_acc": soft_acc, "test_hard_acc": hard_acc}
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, hardening {harden.item():.3f} (h={h}), "
              f"test soft {100 * soft_acc:.2f}%, hard {100 * hard_acc:.2f}%")
        with open(csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if f.tell() == 0:
                writer.writeheader()
            writer.writerow(row)
        if config["wandb"]:
            wandb.log(row)
        save_checkpoint(ckpt_path, {
            "folder": "fff", "config": config, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch,
            "rng": {"torch": torch.get_rng_state()}, "metrics": row,
        })
    print(f"saved {ckpt_path}")
    return model


if __name__ == "__main__":
    main()
