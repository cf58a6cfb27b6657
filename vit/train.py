"""Train a Vision Transformer from scratch on MNIST, FashionMNIST or CIFAR-10.

    python train.py                                   # MNIST, the CPU preset (the 8-minute recipe)
    python train.py --dataset cifar10 --preset gpu    # CIFAR-10 on a GPU
    torchrun --standalone --nproc_per_node=4 train.py --dataset cifar10 --preset gpu

Configuration first (flags, presets), then data, then one training loop: batch -> augment -> forward ->
loss -> backward -> clip -> step -> schedule, with a test-set evaluation and a checkpoint after every epoch.
"""
import argparse
import csv
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch.distributed import barrier, destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.transforms import v2
from tqdm import tqdm

from model import ViT

# name -> (torchvision class, image size, channels, per-channel mean, per-channel std of the training set)
DATASETS = {
    "mnist": (torchvision.datasets.MNIST, 28, 1, (0.1307,), (0.3081,)),
    "fashion_mnist": (torchvision.datasets.FashionMNIST, 28, 1, (0.2860,), (0.3530,)),
    "cifar10": (torchvision.datasets.CIFAR10, 32, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

# Every flag that a preset may set, with the value used when neither the preset nor the command line does.
DEFAULTS = dict(patch_size=4, dim=128, depth=6, num_heads=4, mlp_dim=256, dropout=0.0, epochs=5,
                batch_size=128, lr=2e-3, weight_decay=0.05, warmup_epochs=0.3, label_smoothing=0.1,
                grad_clip=1.0, crop_padding=0, flip=False, randaugment=0, mixup=0.0)
# --preset cpu|gpu, per dataset: a few overrides of DEFAULTS, applied before explicit flags.
PRESETS = {
    "cpu": {  # 16 tokens of 7 x 7 pixels for the 28 x 28 datasets: the fastest to learn on a CPU
        "mnist": dict(patch_size=7, epochs=7, crop_padding=2),
        "fashion_mnist": dict(patch_size=7, epochs=12),
        "cifar10": dict(dim=96, mlp_dim=192, epochs=12, crop_padding=4, flip=True),
    },
    "gpu": {
        "mnist": dict(dim=192, num_heads=6, mlp_dim=384, epochs=20, batch_size=256, lr=1e-3, crop_padding=2),
        "fashion_mnist": dict(dim=192, num_heads=6, mlp_dim=384, epochs=40, batch_size=256, lr=1e-3,
                              crop_padding=2, flip=True),
        "cifar10": dict(dim=384, depth=7, num_heads=12, mlp_dim=768, dropout=0.1, epochs=200, batch_size=256,
                        lr=1e-3, warmup_epochs=5.0, crop_padding=4, flip=True, randaugment=2, mixup=0.2),
    },
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)" on the flags that a preset fills in
        return action.help if action.default is None else super()._get_help_string(action)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] + " Flags marked [preset] default to the "
                                "--preset's value for the dataset (PRESETS in train.py), else to DEFAULTS.",
                                formatter_class=HelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=sorted(DATASETS), help="which torchvision dataset")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                   help="per-dataset overrides (see PRESETS in train.py) applied before explicit flags")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto picks cuda, then mps, then cpu")
    p.add_argument("--seed", type=int, default=0, help="seeds Python, NumPy and torch")
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "data"),
                   help="where the dataset lives in torchvision's layout ($DATA_DIR if set, else ./data)")
    p.add_argument("--out-dir", default="runs/vit", help="checkpoints (last.pt, best.pt) and metrics.csv go here")
    p.add_argument("--resume", default=None, help="continue the run saved in this checkpoint (its config is used)")
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: PyTorch's default); 1 is fastest on a busy shared machine")
    p.add_argument("--time-budget", type=float, default=0,
                   help="minutes of training, evaluation included: the cosine runs on the clock instead of the "
                        "step count, and training stops when they are spent (0: off, --epochs decides)")
    p.add_argument("--train-limit", type=int, default=0, help="use only the first N training images (0: all)")
    p.add_argument("--test-limit", type=int, default=0, help="evaluate on the first N test images (0: all)")
    # model, optimisation, augmentation: None means "from the preset, else DEFAULTS"
    p.add_argument("--patch-size", type=int, help="P: patches are P x P pixels; must divide the image size [preset]")
    p.add_argument("--dim", type=int, help="D: token width [preset]")
    p.add_argument("--depth", type=int, help="L: number of encoder blocks [preset]")
    p.add_argument("--num-heads", type=int, help="h: attention heads; must divide --dim [preset]")
    p.add_argument("--mlp-dim", type=int, help="hidden width of the MLP in each block [preset]")
    p.add_argument("--dropout", type=float, help="dropout on embeddings, attention, residual branches [preset]")
    # optimisation
    p.add_argument("--epochs", type=int, help="passes over the training set [preset]")
    p.add_argument("--batch-size", type=int, help="images per optimiser step, summed over DDP processes [preset]")
    p.add_argument("--lr", type=float, help="peak AdamW learning rate, after warmup; cosine decay to 0 [preset]")
    p.add_argument("--weight-decay", type=float, help="AdamW decoupled weight decay (matrices only) [preset]")
    p.add_argument("--warmup-epochs", type=float, help="linear learning-rate warmup, in epochs [preset]")
    p.add_argument("--label-smoothing", type=float, help="label smoothing of the cross-entropy [preset]")
    p.add_argument("--grad-clip", type=float, help="clip the global gradient norm to this (0: off) [preset]")
    # augmentation
    p.add_argument("--crop-padding", type=int,
                   help="random crop after zero-padding by this many pixels (0: off) [preset]")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips [preset]")
    p.add_argument("--randaugment", type=int,
                   help="RandAugment with this many ops per image, magnitude 9 (0: off) [preset]")
    p.add_argument("--mixup", type=float, help="mixup with Beta(alpha, alpha) mixing weights (0: off) [preset]")
    args = p.parse_args(argv)

    for key, value in {**DEFAULTS, **PRESETS[args.preset][args.dataset]}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    image_size = DATASETS[args.dataset][1]
    if args.patch_size < 1 or image_size % args.patch_size:
        p.error(f"the {args.dataset} image size {image_size} is not divisible by --patch-size {args.patch_size}")
    if args.dim < 1 or args.num_heads < 1 or args.dim % args.num_heads:
        p.error(f"--dim {args.dim} must be a positive multiple of --num-heads {args.num_heads}")
    for name in ["depth", "mlp_dim", "epochs", "batch_size"]:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ["threads", "time_budget", "train_limit", "test_limit", "weight_decay", "warmup_epochs",
                 "grad_clip", "crop_padding", "randaugment", "mixup"]:
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} cannot be negative")
    if args.lr <= 0 or not 0 <= args.dropout < 1 or not 0 <= args.label_smoothing < 1:
        p.error("need --lr > 0, 0 <= --dropout < 1 and 0 <= --label-smoothing < 1")
    return args


# ----------------------------------------------------------------------------- data

def load_split(name, data_dir, train):
    """One split of a torchvision dataset as tensors: images uint8 (N, C, H, W), labels int64 (N,), class names.
    Downloads when the files are absent; when that fails, removes what it created and exits in one line."""
    dataset_class = DATASETS[name][0]
    # what a download writes: MNIST/, FashionMNIST/, or cifar-10-batches-py/ and cifar-10-python.tar.gz
    written = [os.path.join(data_dir, entry) for entry in (dataset_class.__name__,
               getattr(dataset_class, "base_folder", ""), getattr(dataset_class, "filename", "")) if entry]
    new = [data_dir] if not os.path.isdir(data_dir) else [path for path in written if not os.path.exists(path)]
    try:
        dataset = dataset_class(data_dir, train=train, download=True)
    except (RuntimeError, OSError) as e:
        for path in new:  # leave nothing behind but what was there before
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        sys.exit(f"error: {dataset_class.__name__} is not in {os.path.abspath(data_dir)} and could not be "
                 f"downloaded ({type(e).__name__}); put torchvision's files there or point --data-dir / DATA_DIR "
                 f"at them")
    images = torch.as_tensor(np.asarray(dataset.data))
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # (N, C, H, W)
    return images.contiguous(), torch.as_tensor(dataset.targets, dtype=torch.long), list(dataset.classes)


def normalize(images, name):
    """uint8 (B, C, H, W) on any device -> float, zero mean and unit variance per channel."""
    _, _, _, mean, std = DATASETS[name]
    mean = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std


def augment(images, args, randaugment):
    """The augmentation a small ViT needs, on a uint8 batch (B, C, H, W), drawn from torch's global RNG."""
    B, C, H, W = images.shape
    if args.randaugment:  # RandAugment (Cubuk et al., 2020): ops drawn per image
        images = torch.stack([randaugment(image) for image in images])
    if args.crop_padding:  # pad with zeros, then cut a random H x W window out of each image
        pad = args.crop_padding
        padded = F.pad(images, (pad, pad, pad, pad))
        top = torch.randint(0, 2 * pad + 1, (B, 1, 1, 1))
        left = torch.randint(0, 2 * pad + 1, (B, 1, 1, 1))
        rows = top + torch.arange(H).view(1, 1, H, 1)  # (B, 1, H, 1)
        cols = left + torch.arange(W).view(1, 1, 1, W)  # (B, 1, 1, W)
        images = padded[torch.arange(B).view(B, 1, 1, 1), torch.arange(C).view(1, C, 1, 1), rows, cols]
    if args.flip:
        flip = torch.rand(B) < 0.5
        images = torch.where(flip.view(B, 1, 1, 1), images.flip(3), images)
    return images


@torch.no_grad()
def evaluate(model, images, labels, dataset, device, batch_size=1000):
    """Mean cross-entropy and accuracy of `model` over a whole split."""
    model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    total_loss, correct = 0.0, 0
    for start in range(0, len(images), batch_size):
        x = normalize(images[start:start + batch_size].to(device), dataset)
        y = labels[start:start + batch_size].to(device)
        with autocast:
            logits = model(x).float()
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
    model.train()
    return total_loss / len(images), correct / len(images)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(obj, path):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: never a half-written checkpoint


def load_checkpoint(path, device="cpu"):
    """A checkpoint written by this folder, or a one-line exit saying what is wrong with it."""
    if not os.path.isfile(path):
        sys.exit(f"error: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        sys.exit(f"error: {path} is not a readable checkpoint ({type(e).__name__}); it may be truncated or corrupt")
    if not isinstance(ckpt, dict) or ckpt.get("folder") != "vit":
        folder = ckpt.get("folder") if isinstance(ckpt, dict) else None
        sys.exit(f"error: {path} was not written by vit/train.py (its folder is {folder!r})")
    return ckpt


def model_config(args):
    _, image_size, channels, _, _ = DATASETS[args.dataset]
    return dict(image_size=image_size, channels=channels, patch_size=args.patch_size, num_classes=10,
                dim=args.dim, depth=args.depth, num_heads=args.num_heads, mlp_dim=args.mlp_dim,
                dropout=args.dropout)


def get_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available() or name == "mps" and not torch.backends.mps.is_available():
        sys.exit(f"error: --device {name} was asked for but is not available here")
    return torch.device(name)


# ----------------------------------------------------------------------------- training

def main(argv=None):
    args = get_args(argv)
    resume = None
    if args.resume:  # the run continues with the configuration it was started with
        resume = load_checkpoint(args.resume)
        keep = {k: getattr(args, k) for k in ["resume", "device", "out_dir", "wandb", "compile", "threads"]}
        args = argparse.Namespace(**{**resume["config"], **keep})

    # device, DDP, seeds
    ddp = "RANK" in os.environ
    device = get_device(args.device)
    rank, world_size = 0, 1
    if ddp:
        init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    master = rank == 0
    if ddp and args.time_budget:
        sys.exit("error: --time-budget is for one process: the processes of a DDP run would stop at different steps")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size % world_size:
        sys.exit(f"error: --batch-size {args.batch_size} is not divisible by the {world_size} processes")
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    # data: whole splits as uint8 tensors in memory; batches are cut, augmented and normalised below
    train_images, train_labels, classes = load_split(args.dataset, args.data_dir, train=True)
    test_images, test_labels, _ = load_split(args.dataset, args.data_dir, train=False)
    if args.train_limit:
        train_images, train_labels = train_images[:args.train_limit], train_labels[:args.train_limit]
    if args.test_limit:
        test_images, test_labels = test_images[:args.test_limit], test_labels[:args.test_limit]
    local_batch = args.batch_size // world_size
    steps_per_epoch = len(train_images) // args.batch_size
    if steps_per_epoch == 0:
        sys.exit(f"error: {len(train_images)} training images are fewer than one batch of {args.batch_size}")
    total_steps, warmup_steps = args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch)
    randaugment = v2.RandAugment(num_ops=args.randaugment) if args.randaugment else None

    # model and optimiser: weight decay on the weight matrices, not on biases, LayerNorms, x_class, E_pos
    model = ViT(**model_config(args)).to(device)
    decay = [p for p in model.parameters() if p.ndim == 2]
    no_decay = [p for p in model.parameters() if p.ndim != 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999))
    step, start_epoch, best_accuracy, history = 0, 0, 0.0, []
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        step, start_epoch, best_accuracy, history = (resume["step"], resume["epoch"], resume["best_accuracy"],
                                                     resume["history"])
        random.setstate((resume["rng"]["python"][0], tuple(resume["rng"]["python"][1]), resume["rng"]["python"][2]))
        np.random.set_state(tuple(resume["rng"]["numpy"]))
        torch.set_rng_state(resume["rng"]["torch"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(resume["rng"]["cuda"])
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    # the clock of the run, evaluation included, carried over a resume
    clock_start = time.time() - (history[-1]["elapsed_s"] if history else 0.0)
    cpu_start = time.process_time() - (history[-1]["cpu_s"] if history else 0.0)
    budget_s, eval_seconds = 60 * args.time_budget, 0.0

    def lr_at(step):  # linear warmup, then cosine decay to zero over the steps (or the time budget)
        if step < warmup_steps:
            return args.lr * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if budget_s:
            progress = min(1.0, (time.time() - clock_start) / budget_s)
        return 0.5 * args.lr * (1 + math.cos(math.pi * progress))

    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"{args.dataset}: {len(train_images)} train / {len(test_images)} test images, ViT with "
              f"{n_params / 1e6:.3f}M parameters, {steps_per_epoch} steps per epoch on {device} x {world_size}")
        if args.wandb:
            import wandb
            wandb.init(project="vit", config=vars(args))

    for epoch in range(start_epoch, args.epochs):
        # the same permutation on every rank (seeded by epoch), each rank takes its own slice
        order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(args.seed + epoch))
        order = order[:steps_per_epoch * args.batch_size].view(steps_per_epoch, world_size, local_batch)[:, rank]
        epoch_start, loss_sum, correct = time.time(), torch.zeros((), device=device), torch.zeros((), device=device)
        out_of_time, steps_done = False, 0
        for batch_indices in tqdm(order, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not master,
                                  leave=False, mininterval=2):
            if budget_s and time.time() - clock_start + eval_seconds >= budget_s:  # keep time for the last eval
                out_of_time = True
                break
            x = normalize(augment(train_images[batch_indices], args, randaugment).to(device), args.dataset)
            y = train_labels[batch_indices].to(device)
            lam, partner = 1.0, None
            if args.mixup:  # x~ = lam x_i + (1 - lam) x_j, loss mixed with the same weight
                lam = float(np.random.beta(args.mixup, args.mixup))
                partner = torch.randperm(len(x), device=device)
                x = lam * x + (1 - lam) * x[partner]
            with autocast:
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
            if partner is not None:
                loss = lam * loss + (1 - lam) * F.cross_entropy(logits.float(), y[partner],
                                                                label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            optimizer.step()
            step += 1
            steps_done += 1
            loss_sum += loss.detach()
            correct += (logits.argmax(-1) == y).sum()
        train_seconds = time.time() - epoch_start

        if master and steps_done:  # evaluate on the whole test split, log, checkpoint
            eval_start = time.time()
            test_loss, test_accuracy = evaluate(raw_model, test_images, test_labels, args.dataset, device)
            eval_seconds = time.time() - eval_start
            row = dict(epoch=epoch + 1, step=step, lr=lr_at(step - 1),
                       train_loss=loss_sum.item() / steps_done,
                       train_accuracy=correct.item() / (steps_done * local_batch),
                       test_loss=test_loss, test_accuracy=test_accuracy,
                       train_images_per_s=steps_done * args.batch_size / train_seconds,
                       elapsed_s=time.time() - clock_start, cpu_s=time.process_time() - cpu_start)
            history.append(row)
            print(f"epoch {epoch + 1}: train loss {row['train_loss']:.4f}, test loss {test_loss:.4f}, "
                  f"test accuracy {100 * test_accuracy:.2f}%, {row['train_images_per_s']:.0f} images/s, "
                  f"{row['elapsed_s']:.0f} s ({row['cpu_s']:.0f} s of CPU)", flush=True)
            with open(os.path.join(args.out_dir, "metrics.csv"), "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(row))
                writer.writeheader()
                writer.writerows(history)
            if args.wandb:
                wandb.log(row, step=step)
            is_best = test_accuracy > best_accuracy
            best_accuracy = max(best_accuracy, test_accuracy)
            py_state = random.getstate()
            checkpoint = {
                "folder": "vit", "config": vars(args), "model_config": model_config(args), "classes": classes,
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "epoch": epoch + 1, "test_accuracy": test_accuracy, "best_accuracy": best_accuracy,
                "history": history,
                "rng": {"python": [py_state[0], list(py_state[1]), py_state[2]],
                        "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
                        "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else torch.zeros(0)},
            }
            save_checkpoint(checkpoint, os.path.join(args.out_dir, "last.pt"))
            if is_best:
                save_checkpoint(checkpoint, os.path.join(args.out_dir, "best.pt"))
        if out_of_time:
            break

    if master:
        print(f"best test accuracy {100 * best_accuracy:.2f}%, checkpoints in {args.out_dir}")
    if ddp:
        barrier()  # no rank tears down its connections while another still reads from them
        destroy_process_group()
    return best_accuracy


if __name__ == "__main__":
    main()
