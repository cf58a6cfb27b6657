"""Train a masked autoencoder, then measure what it learned: `pretrain`, `linprobe` or `finetune`.

    python train.py pretrain                                   # MAE on MNIST (the default), ~tiny ViT for a CPU
    python train.py linprobe --init runs/mae/pretrain/ckpt.pt  # frozen encoder, BatchNorm + linear head
    python train.py linprobe                                   # the same probe on a randomly initialised encoder
    python train.py finetune --init runs/mae/pretrain/ckpt.pt  # the whole encoder, end to end
    python train.py finetune                                   # the same encoder trained from scratch
    torchrun --standalone --nproc_per_node=4 train.py pretrain --preset gpu
"""
import argparse
import contextlib
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
import torch.nn.functional as F
from torch.distributed import barrier, destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision import datasets
from tqdm import tqdm

from model import MaskedAutoencoder, ViTClassifier, param_groups_lrd

# ----------------------------------------------------------------------------------------------------------------------
# Configuration: every knob, its default (small enough for a laptop CPU) and its meaning

MODES = ["pretrain", "linprobe", "finetune"]
ARCH_KEYS = ["dataset", "patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth",
             "decoder_num_heads", "mlp_ratio", "norm_pix_loss"]  # what a checkpoint's model is built from
MODE_DEFAULTS = {  # per mode, unless given on the command line (the paper's recipes, shrunk to a few epochs)
    "pretrain": dict(epochs=10, lr=1e-3, weight_decay=0.05),
    "linprobe": dict(epochs=10, lr=1e-2, weight_decay=0.0),
    "finetune": dict(epochs=2, lr=1e-3, weight_decay=0.05),
}
PRESETS = {
    "cpu": {},  # the defaults below: patch 7 on 28x28, width 64, 4 blocks; decoder width 32, 2 blocks
    "gpu": dict(patch_size=4, embed_dim=192, depth=8, num_heads=3, decoder_embed_dim=128, decoder_depth=4,
                batch_size=512),
}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="pretrain", choices=MODES,
                   help="pretrain the MAE, or train a linear probe / fine-tune its encoder (default: pretrain)")
    p.add_argument("--preset", choices=list(PRESETS), default=None, help="a set of overrides; explicit flags win")
    p.add_argument("--dataset", default="mnist", choices=list(DATASETS), help="torchvision dataset")
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "data"), help="dataset root (default: $DATA_DIR or ./data)")
    p.add_argument("--out-dir", default=None, help="where checkpoints and metrics.csv go (default: runs/mae/<mode>)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, then mps, then cpu")
    p.add_argument("--seed", type=int, default=0, help="seeds Python, NumPy and torch; same seed, same run on CPU")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: its default; 1 is much faster on a CPU shared with other jobs)")
    p.add_argument("--train-examples", type=int, default=0, help="use only the first N training images (0: all)")
    p.add_argument("--test-examples", type=int, default=0, help="evaluate on the first N test images (0: all)")
    # optimisation (AdamW, linear warm-up then cosine decay to zero, as in the paper)
    p.add_argument("--epochs", type=int, default=None, help="passes over the training set (default per mode: 10/10/2)")
    p.add_argument("--batch-size", type=int, default=256, help="images per step, per process")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default per mode: 1e-3/1e-2/1e-3)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default per mode: 0.05/0/0.05)")
    p.add_argument("--warmup-steps", type=int, default=100, help="linear learning-rate warm-up steps")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    # the ViT encoder and the lightweight decoder
    p.add_argument("--patch-size", type=int, default=7, help="patch side p; the image side must be a multiple of it")
    p.add_argument("--embed-dim", type=int, default=64, help="encoder width (a multiple of 4 and of --num-heads)")
    p.add_argument("--depth", type=int, default=4, help="encoder Transformer blocks")
    p.add_argument("--num-heads", type=int, default=4, help="encoder attention heads")
    p.add_argument("--decoder-embed-dim", type=int, default=32, help="decoder width (narrower than the encoder)")
    p.add_argument("--decoder-depth", type=int, default=2, help="decoder Transformer blocks (fewer than the encoder)")
    p.add_argument("--decoder-num-heads", type=int, default=4, help="decoder attention heads")
    p.add_argument("--mlp-ratio", type=float, default=4.0, help="MLP hidden width / model width")
    # MAE pre-training
    p.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches masked, in (0, 1)")
    p.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="reconstruct each patch's pixels normalised by its own mean and std")
    # linear probing and fine-tuning
    p.add_argument("--init", default=None, help="linprobe/finetune: a pretrain checkpoint (omit: random encoder)")
    p.add_argument("--pool", default="mean", choices=["mean", "cls"], help="features: mean of patch tokens, or [CLS]")
    p.add_argument("--layer-decay", type=float, default=1.0, help="finetune: layer-wise lr decay (1: off; paper 0.75)")
    # bookkeeping
    p.add_argument("--resume", default=None, help="continue from this checkpoint, exactly where it stopped")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases")
    return p


def parse_args(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.preset:  # presets fill in what the command line did not set
        parser.set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    for key, value in MODE_DEFAULTS[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out_dir = args.out_dir or os.path.join("runs", "mae", args.mode)
    if not 0 < args.mask_ratio < 1:
        parser.error(f"--mask-ratio must be in (0, 1), got {args.mask_ratio}")
    if args.init and args.mode == "pretrain":
        parser.error("--init is for linprobe and finetune (pretrain starts from scratch; use --resume to continue)")
    for name in ["epochs", "batch_size", "patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim",
                 "decoder_depth", "decoder_num_heads"]:
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.lr <= 0 or not 0 < args.layer_decay <= 1:
        parser.error("--lr must be positive and --layer-decay in (0, 1]")
    return parser, args


def check_architecture(parser, cfg):
    """Catch shapes the model cannot take, with the flag to change, before building anything."""
    if DATASETS[cfg["dataset"]]["size"] % cfg["patch_size"]:
        parser.error(f"--patch-size {cfg['patch_size']} does not divide the {cfg['dataset']} image side "
                     f"{DATASETS[cfg['dataset']]['size']}")
    for width, heads in [("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")]:
        if cfg[width] % 4 or cfg[width] % cfg[heads]:
            parser.error(f"--{width.replace('_', '-')} must be a multiple of 4 and of --{heads.replace('_', '-')}")


# ----------------------------------------------------------------------------------------------------------------------
# Data: the whole dataset as a uint8 tensor, normalised per batch on the device

DATASETS = {
    "mnist": dict(cls=datasets.MNIST, files=["MNIST"], size=28, mean=(0.1307,), std=(0.3081,)),
    "fashion-mnist": dict(cls=datasets.FashionMNIST, files=["FashionMNIST"], size=28, mean=(0.2860,), std=(0.3530,)),
    "cifar10": dict(cls=datasets.CIFAR10, files=["cifar-10-batches-py", "cifar-10-python.tar.gz"], size=32,
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
}


def load_dataset(name, data_dir):
    """-> (train_x, train_y, test_x, test_y): uint8 (N, C, H, W) images and int64 labels.

    Downloads when the files are absent; when that fails, removes what the attempt created and exits in one line.
    """
    spec = DATASETS[name]
    root = Path(data_dir)
    created = [p for p in [root] + [root / f for f in spec["files"]] if not p.exists()]
    try:
        with contextlib.redirect_stdout(sys.stderr):  # torchvision prints download progress
            train, test = (spec["cls"](str(root), train=flag, download=True) for flag in (True, False))
    except Exception as e:  # no network, a proxy error, a corrupt archive: all end the same way
        for p in reversed(created):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
        sys.exit(f"error: {name} is not in {root / spec['files'][0]} and downloading it failed ({reason}); "
                 f"put the torchvision files there or point --data-dir / DATA_DIR at a folder that has them")
    out = []
    for ds in (train, test):
        x = torch.as_tensor(np.asarray(ds.data))
        x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W)
        out += [x.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)]
    return tuple(out)


def normalize(x_uint8, dataset):
    """uint8 (B, C, H, W) -> float, standardised per channel."""
    spec = DATASETS[dataset]
    mean = torch.tensor(spec["mean"], device=x_uint8.device).view(1, -1, 1, 1)
    std = torch.tensor(spec["std"], device=x_uint8.device).view(1, -1, 1, 1)
    return (x_uint8.float() / 255 - mean) / std


# ----------------------------------------------------------------------------------------------------------------------
# Models and checkpoints


def build_model(cfg, mode):
    """The MAE for pretraining, else the encoder with a probe or fine-tuning head; all from a plain config dict."""
    encoder_kwargs = dict(img_size=DATASETS[cfg["dataset"]]["size"], patch_size=cfg["patch_size"],
                          in_chans=len(DATASETS[cfg["dataset"]]["mean"]), embed_dim=cfg["embed_dim"],
                          depth=cfg["depth"], num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"])
    if mode == "pretrain":
        return MaskedAutoencoder(**encoder_kwargs, decoder_embed_dim=cfg["decoder_embed_dim"],
                                 decoder_depth=cfg["decoder_depth"], decoder_num_heads=cfg["decoder_num_heads"],
                                 norm_pix_loss=cfg["norm_pix_loss"])
    num_classes = 10  # MNIST, FashionMNIST and CIFAR-10 all have ten
    return ViTClassifier(num_classes, head="linprobe" if mode == "linprobe" else "finetune", pool=cfg["pool"],
                         **encoder_kwargs)


def load_checkpoint(path, device="cpu"):
    """Load a checkpoint written by this folder, or exit with one line saying what is wrong."""
    if not os.path.isfile(path):
        sys.exit(f"error: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        sys.exit(f"error: {path} is not a readable checkpoint (truncated or corrupt: {type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("folder") != "mae":
        folder = ckpt.get("folder") if isinstance(ckpt, dict) else None
        sys.exit(f"error: {path} was not written by mae/ (its folder is {folder!r})")
    return ckpt


def save_checkpoint(path, obj):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash never leaves half a checkpoint


def rng_state(data_gen):
    np_state = np.random.get_state()
    return {"python": list(random.getstate()[1]), "numpy": np_state[1].tolist(), "numpy_pos": int(np_state[2]),
            "torch": torch.get_rng_state(), "data": data_gen.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state, data_gen):
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    data_gen.set_state(state["data"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step, total_steps, args):
    """Linear warm-up to args.lr, then half a cosine down to zero."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def encode(classifier, x_uint8, cfg, device, batch_size, desc="features"):
    """The frozen encoder's pooled features for every image: (N, D) on the device."""
    classifier.eval()
    feats = [classifier.features(normalize(x_uint8[i:i + batch_size].to(device), cfg["dataset"])).float()
             for i in tqdm(range(0, len(x_uint8), batch_size), desc=desc, leave=False)]
    return torch.cat(feats)


@torch.no_grad()
def evaluate(model, mode, x, y, cfg, device, batch_size, autocast):
    """pretrain: mean masked-patch loss (masks drawn from a fixed seed); otherwise: accuracy in %."""
    model.eval()
    total, n = 0.0, 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(1234)
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            with autocast:
                if mode == "pretrain":
                    total += model(normalize(xb, cfg["dataset"]), cfg["mask_ratio"])[0].item() * len(xb)
                elif mode == "linprobe":  # xb are features already
                    total += (model(xb).argmax(-1) == yb).sum().item() * 100.0
                else:
                    total += (model(normalize(xb, cfg["dataset"])).argmax(-1) == yb).sum().item() * 100.0
            n += len(xb)
    return total / n


# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    parser, args = parse_args(argv)
    cfg = vars(args)
    ckpt = load_checkpoint(args.resume) if args.resume else None
    init = load_checkpoint(args.init) if args.init else None
    if ckpt is not None:
        if ckpt["mode"] != args.mode:
            sys.exit(f"error: {args.resume} is a {ckpt['mode']} checkpoint, not {args.mode}")
        cfg.update({k: ckpt["config"][k] for k in ARCH_KEYS})  # the model is the checkpoint's
    elif init is not None:
        if init["mode"] != "pretrain":
            sys.exit(f"error: --init needs a pretrain checkpoint, {args.init} is {init['mode']}")
        cfg.update({k: init["config"][k] for k in ARCH_KEYS})  # the encoder is the pretrained one
    check_architecture(parser, cfg)

    # device, precision, DDP: a few lines, as in nanoGPT
    ddp = int(os.environ.get("RANK", -1)) != -1
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if ddp:
        init_process_group(backend="nccl" if args.device == "cuda" else "gloo")
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        device = torch.device(f"cuda:{local_rank}" if args.device == "cuda" else args.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, torch.device(args.device)
    master = rank == 0
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    seed_everything(args.seed)  # the same initial weights on every rank
    data_gen = torch.Generator().manual_seed(args.seed)  # the same shuffle on every rank; each takes its slice

    # data
    train_x, train_y, test_x, test_y = load_dataset(cfg["dataset"], args.data_dir)
    if args.train_examples:
        train_x, train_y = train_x[:args.train_examples], train_y[:args.train_examples]
    if args.test_examples:
        test_x, test_y = test_x[:args.test_examples], test_y[:args.test_examples]

    # model and optimizer
    model = build_model(cfg, args.mode).to(device)
    if init is not None:
        encoder_state = {k[len("encoder."):]: v for k, v in init["model"].items() if k.startswith("encoder.")}
        model.encoder.load_state_dict(encoder_state)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    if args.mode == "linprobe":  # frozen encoder: its features are computed once, the head trains on them
        model.encoder.requires_grad_(False)
        train_x = encode(model, train_x, cfg, device, 2 * args.batch_size, "train features")
        test_x = encode(model, test_x, cfg, device, 2 * args.batch_size, "test features")
        trained = model.head
    else:
        trained = model
    optimizer = torch.optim.AdamW(param_groups_lrd(model, args.weight_decay, args.layer_decay), lr=args.lr,
                                  betas=(0.9, 0.95) if args.mode == "pretrain" else (0.9, 0.999))
    start_epoch, step = 0, 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        set_rng_state(ckpt["rng"], data_gen)  # rank 0's generators, saved at the end of an epoch
    if ckpt is None or rank > 0:
        torch.manual_seed(args.seed + rank + 1000 * start_epoch)  # each rank draws its own masks
    run = trained
    if args.compile:
        run = torch.compile(run)
    if ddp:
        run = DDP(run, device_ids=[device.index] if device.type == "cuda" else None)

    def loss_fn(xb, yb):
        if args.mode == "pretrain":
            return run(normalize(xb, cfg["dataset"]), cfg["mask_ratio"])[0]  # Eq.: MSE on masked patches
        if args.mode == "linprobe":
            return F.cross_entropy(run(xb), yb)  # xb: frozen features
        return F.cross_entropy(run(normalize(xb, cfg["dataset"])), yb)

    os.makedirs(args.out_dir, exist_ok=True)
    metric = "test_loss" if args.mode == "pretrain" else "test_acc"
    log_path = os.path.join(args.out_dir, "metrics.csv")
    if master and ckpt is None:
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerow(["epoch", "step", "train_loss", metric, "lr", "train_seconds", "images_per_s"])
    if args.wandb and master:
        import wandb
        wandb.init(project="mae", name=f"{args.mode}-{cfg['dataset']}", config=cfg)

    steps_per_epoch = math.ceil(len(train_x) // world / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    for epoch in range(start_epoch, args.epochs):
        trained.train()
        perm = torch.randperm(len(train_x), generator=data_gen)
        perm = perm[:len(perm) // world * world][rank::world]  # equal shards, so every rank takes as many steps
        t0, loss_sum, seen = time.time(), 0.0, 0
        bar = tqdm(range(0, len(perm), args.batch_size), desc=f"{args.mode} epoch {epoch + 1}/{args.epochs}",
                   disable=not master)
        for i in bar:
            idx = perm[i:i + args.batch_size]
            xb, yb = train_x[idx].to(device), train_y[idx].to(device)  # get batch
            lr = lr_at(step, total_steps, args)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]  # schedule (x layer-wise decay when finetuning)
            with autocast:
                loss = loss_fn(xb, yb)  # forward
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # backward
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trained.parameters(), args.grad_clip)  # clip
            optimizer.step()  # step
            step += 1
            loss_sum, seen = loss_sum + loss.item() * len(idx), seen + len(idx)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
        seconds = time.time() - t0
        images_per_s = seen * world / seconds
        result = evaluate(trained if args.mode == "linprobe" else model, args.mode, test_x, test_y, cfg, device,
                          2 * args.batch_size, autocast)
        if master:  # log, then checkpoint
            row = [epoch + 1, step, loss_sum / seen, result, lr, round(seconds, 2), round(images_per_s, 1)]
            with open(log_path, "a", newline="") as f:
                csv.writer(f).writerow(row)
            print(f"{args.mode} epoch {epoch + 1}: train loss {loss_sum / seen:.4f}, {metric} {result:.4f}, "
                  f"{images_per_s:.0f} images/s", file=sys.stderr)
            if args.wandb:
                wandb.log({"train_loss": loss_sum / seen, metric: result, "lr": lr, "images_per_s": images_per_s},
                          step=step)
            save_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), {
                "folder": "mae", "mode": args.mode, "config": cfg, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch + 1, "rng": rng_state(data_gen),
                "metrics": {"train_loss": loss_sum / seen, metric: result, "images_per_s": images_per_s}})
    if ddp:
        barrier()  # no rank tears down its connections while another still reads from them
        destroy_process_group()


if __name__ == "__main__":
    main()
