"""Train RealNVP by maximum likelihood on MNIST, FashionMNIST or CIFAR-10 and report bits per dimension.

    python nf/train.py                                   # multi-scale RealNVP on MNIST
    python nf/train.py --arch flat                       # 30 affine couplings over the flattened image
    torchrun --standalone --nproc_per_node=2 nf/train.py --device cpu --steps 20   # data parallel (gloo)
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
import torch.distributed as dist
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from model import FlatRealNVP, RealNVP, bits_per_dim, log_likelihood

DATASETS = {  # name: (torchvision class, channels, size)
    "mnist": (torchvision.datasets.MNIST, 1, 28),
    "fashion_mnist": (torchvision.datasets.FashionMNIST, 1, 28),
    "cifar10": (torchvision.datasets.CIFAR10, 3, 32),
}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=sorted(DATASETS), help="torchvision dataset to model")
    p.add_argument("--arch", default="multiscale", choices=["multiscale", "flat"], help="RealNVP variant")
    p.add_argument("--num-scales", type=int, default=2, help="multiscale: number of scales (2 for 28x28 images)")
    p.add_argument("--hidden", type=int, default=32, help="channels of the s/t ResNets (flat: MLP width, try 128)")
    p.add_argument("--blocks", type=int, default=1, help="multiscale: residual blocks in each s/t ResNet")
    p.add_argument("--num-couplings", type=int, default=30, help="flat: number of affine coupling layers")
    p.add_argument("--steps", type=int, default=3000, help="optimisation steps")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size (per process)")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate (default 1e-3; with --resume the checkpoint's, unless given: lower it for a last phase)")
    p.add_argument("--scale-l2", type=float, default=5e-5, help="L2 penalty on the couplings' scale parameters (paper: 5e-5)")
    p.add_argument("--grad-clip", type=float, default=100.0, help="global gradient-norm clip")
    p.add_argument("--eval-every", type=int, default=1000, help="evaluate test bits/dim and save every N steps")
    p.add_argument("--eval-examples", type=int, default=10000, help="test images used by the periodic evaluation")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to train")
    p.add_argument("--seed", type=int, default=0, help="seed for Python, NumPy and torch")
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "data"), help="dataset root (default $DATA_DIR or ./data)")
    p.add_argument("--out-dir", default="runs/nf", help="where to write ckpt.pt and metrics.csv")
    p.add_argument("--resume", default=None, help="continue from this checkpoint")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases")
    return p


def get_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def load_split(name, data_dir, train):
    """uint8 images (N, C, H, W); downloads when the files are absent and we are online."""
    cls = DATASETS[name][0]
    created = not os.path.exists(data_dir)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ds = cls(data_dir, train=train, download=True)
    except Exception as e:  # offline and absent: torchvision raises from deep inside urllib
        if created:
            shutil.rmtree(data_dir, ignore_errors=True)
        sys.exit(f"error: {cls.__name__} is not in {os.path.abspath(data_dir)} and could not be downloaded "
                 f"({type(e).__name__}); put the files there in torchvision's layout or pass --data-dir / set DATA_DIR")
    x = torch.as_tensor(ds.data)
    return x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()  # (N, C, H, W) uint8


def build_model(config):
    _, channels, size = DATASETS[config["dataset"]]
    if config["arch"] == "flat":
        return FlatRealNVP(channels, size, config["num_couplings"], config["hidden"])
    return RealNVP(channels, size, config["num_scales"], config["hidden"], config["blocks"])


@torch.no_grad()
def evaluate(model, x, batch_size=500, seed=1234):
    """Test bits/dim with a fixed dequantisation noise, so the same checkpoint always gives the same number."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        noise = torch.rand(xb.shape, generator=generator).to(xb.device)
        total += bits_per_dim(log_likelihood(model, xb, noise), xb[0].numel()).sum().item()
    model.train()
    return total / len(x)


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
    if not isinstance(checkpoint, dict) or checkpoint.get("folder") != "nf":
        sys.exit(f"error: {path} was not written by nf/train.py")
    return checkpoint


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    for flag in ["num_scales", "hidden", "blocks", "num_couplings", "steps", "batch_size", "eval_every", "eval_examples"]:
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be positive (got {getattr(args, flag)})")
    if (args.lr is not None and args.lr <= 0) or args.scale_l2 < 0 or args.grad_clip <= 0:
        parser.error("need --lr > 0, --scale-l2 >= 0 and --grad-clip > 0")
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    config = dict(vars(args), lr=args.lr or 1e-3)
    if checkpoint:  # a resumed run keeps its model and data; where it runs, for how long and how fast may change
        config = dict(checkpoint["config"], steps=args.steps, device=args.device, data_dir=args.data_dir,
                      out_dir=args.out_dir, resume=args.resume, lr=args.lr or checkpoint["config"]["lr"])
    size = DATASETS[config["dataset"]][2]
    if config["arch"] == "multiscale" and size % 2 ** (config["num_scales"] - 1):
        parser.error(f"--num-scales {config['num_scales']} needs an image size divisible by {2 ** (config['num_scales'] - 1)}")

    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() and config["device"] != "cpu" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}") if dist.get_backend() == "nccl" else torch.device("cpu")
    else:
        rank, world, device = 0, 1, get_device(config["device"])
    master = rank == 0
    random.seed(config["seed"] + rank)
    np.random.seed(config["seed"] + rank)
    torch.manual_seed(config["seed"] + rank)  # each process draws its own batches and noise

    x_train = load_split(config["dataset"], config["data_dir"], train=True).to(device)
    x_test = load_split(config["dataset"], config["data_dir"], train=False)[: config["eval_examples"]].to(device)
    model = build_model(config).to(device)
    scales = [p for name, p in model.named_parameters() if name.endswith(".scale")]
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    step = 0
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = config["lr"]
        step = checkpoint["step"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
    else:  # ActNorm's data-dependent initialisation, before DDP broadcasts rank 0's parameters to all
        with torch.no_grad():
            first = x_train[torch.randint(len(x_train), (max(config["batch_size"], 256),), device=device)]
            log_likelihood(model, first, torch.rand(first.shape, device=device))
    net = DDP(model) if ddp else model
    net = torch.compile(net) if config["compile"] else net

    ckpt_path = os.path.join(config["out_dir"], "ckpt.pt")
    if master:
        os.makedirs(config["out_dir"], exist_ok=True)
        print(f"{config['arch']} RealNVP: {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{world} process(es) on {device}")
        if config["wandb"]:
            import wandb

            wandb.init(project="paper-implementations-nf", config=config)
    num_dims = x_train[0].numel()
    t0 = time.time() - (checkpoint["metrics"]["seconds"] if checkpoint else 0.0)  # seconds count across resumes
    bar = tqdm(total=config["steps"], initial=step, disable=not master, desc="train")
    while step < config["steps"]:
        xb = x_train[torch.randint(len(x_train), (config["batch_size"],), device=device)]
        noise = torch.rand(xb.shape, device=device)  # uniform dequantisation
        bpd = bits_per_dim(log_likelihood(net, xb, noise), num_dims).mean()
        loss = bpd + config["scale_l2"] * sum(s.pow(2).sum() for s in scales)
        if not torch.isfinite(loss):
            sys.exit(f"error: the loss became {loss.item()} at step {step}; stopped. The last good checkpoint is "
                     f"{ckpt_path if os.path.exists(ckpt_path) else '(none yet)'}; try a lower --lr or --grad-clip")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(train_bpd=f"{bpd.item():.3f}")
        if master and (step % config["eval_every"] == 0 or step == config["steps"]):
            test_bpd = evaluate(model, x_test)
            row = {"step": step, "seconds": round(time.time() - t0, 1), "train_bpd": round(bpd.item(), 4), "test_bpd": test_bpd}
            tqdm.write(f"step {step}: train {bpd.item():.4f} bits/dim, test {test_bpd:.4f} bits/dim")
            csv_path = os.path.join(config["out_dir"], "metrics.csv")
            with open(csv_path, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(row))
                if f.tell() == 0:
                    writer.writeheader()
                writer.writerow(row)
            if config["wandb"]:
                wandb.log(row)
            save_checkpoint(ckpt_path, {
                "folder": "nf", "config": config, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "rng": {"torch": torch.get_rng_state()}, "metrics": row})
    bar.close()
    if ddp:
        dist.barrier()  # no rank tears down its connections while another still reads from them
        dist.destroy_process_group()
    return model


if __name__ == "__main__":
    main()
