"""Train CLIP (Radford et al., 2021) on MNIST / FashionMNIST images paired with generated captions.

Every training image gets a caption drawn at random from its class's training templates ("a handwritten
7", "the number seven written by hand", "a photo of an ankle boot", ...). Other templates are held out:
zero-shot accuracy is measured with those only, on phrasings the model never saw.

    python train.py                                   # MNIST, 1 epoch (a few CPU minutes)
    python train.py --dataset both --epochs 4         # MNIST and FashionMNIST in one model
    torchrun --standalone --nproc_per_node=4 train.py --device cuda --batch-size 1024
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
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from model import CLIP, CharTokenizer, class_text_embeddings, clip_loss, encode_images, precision_at_k, zero_shot_predict

# ---------------------------------------------------------------------------------------------------------
# Configuration: every knob, with a default that works on a laptop CPU.


def get_parser():
    p = argparse.ArgumentParser(description="Train CLIP on MNIST / FashionMNIST with template captions.")
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist", "both"],
                   help="image data; 'both' trains one model on MNIST and FashionMNIST together")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training images")
    p.add_argument("--batch-size", type=int, default=128, help="N of the N x N similarity matrix (global, all ranks)")
    p.add_argument("--lr", type=float, default=5e-3, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on weight matrices only")
    p.add_argument("--warmup-steps", type=int, default=50, help="linear warm-up steps, then cosine decay to 0")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    p.add_argument("--embed-dim", type=int, default=64, help="dimension of the joint image-text space")
    p.add_argument("--image-width", type=int, default=16, help="channels of the CNN's first stage (x2, x4 after)")
    p.add_argument("--text-width", type=int, default=32, help="width of the text Transformer")
    p.add_argument("--text-layers", type=int, default=2, help="blocks of the text Transformer")
    p.add_argument("--text-heads", type=int, default=4, help="attention heads of the text Transformer")
    p.add_argument("--context-length", type=int, default=48, help="characters per caption, with [SOS] and [EOS]")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where to train; auto picks cuda, then mps, then cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default); 1 is fastest on a busy shared CPU")
    p.add_argument("--seed", type=int, default=0, help="seeds Python, NumPy and torch; same seed, same CPU run")
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "data"),
                   help="folder holding MNIST/raw and FashionMNIST/raw (default: $DATA_DIR, else ./data)")
    p.add_argument("--out-dir", default="runs/clip", help="where checkpoints (ckpt.pt) and metrics.csv go")
    p.add_argument("--resume", default=None, help="checkpoint to continue from, exactly where it stopped")
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    return p


def check_args(parser, args):
    for name in ["epochs", "batch_size", "embed_dim", "image_width", "text_width", "text_layers", "text_heads"]:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    if args.lr <= 0:
        parser.error("--lr must be > 0")
    if args.warmup_steps < 0 or args.weight_decay < 0 or args.grad_clip < 0:
        parser.error("--warmup-steps, --weight-decay and --grad-clip must be >= 0")
    if args.text_width % args.text_heads:
        parser.error("--text-width must be divisible by --text-heads")
    if args.context_length < 8:
        parser.error("--context-length must be >= 8")


# ---------------------------------------------------------------------------------------------------------
# Captions: a few names per class and templates per dataset; some templates never used in training.

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CLASS_NAMES = {
    "mnist": [[word, str(i)] for i, word in enumerate(DIGITS)],
    "fashion_mnist": [["t-shirt", "top"], ["trouser", "pair of trousers"], ["pullover", "sweater"], ["dress"],
                      ["coat"], ["sandal"], ["shirt"], ["sneaker"], ["bag", "handbag"], ["ankle boot", "boot"]],
}
TEMPLATES = {
    "mnist": {
        "train": ["a photo of the digit {name}", "a handwritten {name}", "the number {name} written by hand",
                  "an image of the number {name}", "{a} {name}", "the digit {name}",
                  "a scan of a handwritten {name}", "a black and white photo of the number {name}"],
        "heldout": ["a picture of the number {name}", "a drawing of {a} {name}",
                    "an example of the number {name}", "this is {a} {name}"],
    },
    "fashion_mnist": {
        "train": ["a photo of {a} {name}", "a picture of {a} {name}", "{a} {name}", "a product photo of {a} {name}",
                  "a black and white photo of {a} {name}", "a low resolution photo of {a} {name}",
                  "a fashion item: {a} {name}", "the {name}"],
        "heldout": ["a close-up photo of {a} {name}", "a small image of {a} {name}", "this is {a} {name}",
                    "a grayscale picture of the {name}"],
    },
}
SEARCH_TEMPLATE = {"mnist": "a handwritten {name}", "fashion_mnist": "a photo of {a} {name}"}


def article(name):
    return "an" if name[0] in "aeiou8" else "a"  # "an ankle boot", "an 8", "an eight"


def fill(template, name):
    return template.format(name=name, a=article(name))


def class_captions(parts, split):
    """For each class of the datasets in `parts`: every caption of the split ("train", "heldout", "all")."""
    out = []
    for part in parts:
        templates = TEMPLATES[part]["train"] + TEMPLATES[part]["heldout"] if split == "all" else TEMPLATES[part][split]
        out += [[fill(t, name) for t in templates for name in names] for names in CLASS_NAMES[part]]
    return out


class CaptionSampler:
    """Draws a random training caption for each label, from captions tokenized once up front."""

    def __init__(self, tokenizer, parts):
        captions = class_captions(parts, "train")
        self.tokens = tokenizer([c for per_class in captions for c in per_class])  # (K, context_length)
        self.count = torch.tensor([len(c) for c in captions])
        self.offset = torch.cumsum(self.count, 0) - self.count

    def __call__(self, labels, generator):
        r = torch.rand(len(labels), generator=generator)
        return self.tokens[self.offset[labels] + (r * self.count[labels]).long()]  # (B, context_length)


# ---------------------------------------------------------------------------------------------------------
# Data: torchvision's files read once into uint8 tensors; batches are indexed straight from them.

PARTS = {"mnist": ["mnist"], "fashion_mnist": ["fashion_mnist"], "both": ["mnist", "fashion_mnist"]}


def load_part(part, data_dir, train):
    cls = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST}[part]
    folder = Path(data_dir) / cls.__name__
    created = [p for p in (Path(data_dir), folder) if not p.exists()]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds = cls(data_dir, train=train, download=True)
    except Exception as e:  # offline (URLError), or a truncated file
        for p in created:
            shutil.rmtree(p, ignore_errors=True)
        sys.exit(f"error: {cls.__name__} is not in {folder / 'raw'} and could not be downloaded "
                 f"({type(e).__name__}); put torchvision's raw files there or point --data-dir / DATA_DIR at them")
    return ds.data, ds.targets  # (N, 28, 28) uint8, (N,) int64


def load_split(dataset, data_dir, train):
    """Images (N, 28, 28) uint8 and labels (N,): 0-9 MNIST, 0-9 FashionMNIST, or 0-19 for 'both'."""
    images, labels = [], []
    for i, part in enumerate(PARTS[dataset]):
        x, y = load_part(part, data_dir, train)
        images.append(x)
        labels.append(y + 10 * i)
    return torch.cat(images), torch.cat(labels)


def to_input(images):
    return (images.float().unsqueeze(1) / 255 - 0.5) / 0.5  # (B, 1, 28, 28) in [-1, 1]


# ---------------------------------------------------------------------------------------------------------
# Evaluation: zero-shot accuracy and text -> image precision@10, per dataset, among its own 10 classes.


def evaluate(model, tokenizer, images, labels, dataset, device, split="heldout", k=10):
    model.eval()
    features = encode_images(model, to_input(images), device)  # (N, D)
    metrics, predictions = {}, {}
    for i, part in enumerate(PARTS[dataset]):
        mask = (labels >= 10 * i) & (labels < 10 * (i + 1))
        part_features, part_labels = features[mask.to(device)], (labels[mask] - 10 * i).to(device)
        weights = class_text_embeddings(model, tokenizer, class_captions([part], split), device)  # (10, D)
        pred = zero_shot_predict(part_features, weights)
        metrics[f"{part}_zero_shot_acc"] = (pred == part_labels).float().mean().item()
        queries = [fill(SEARCH_TEMPLATE[part], name) for names in CLASS_NAMES[part] for name in names]
        query_labels = torch.tensor([c for c, names in enumerate(CLASS_NAMES[part]) for _ in names], device=device)
        query_features = model.encode_text(tokenizer(queries).to(device)).float()
        metrics[f"{part}_precision_at_{k}"] = precision_at_k(part_features, part_labels, query_features,
                                                             query_labels, min(k, len(part_labels)))
        predictions[part] = (pred.cpu(), part_labels.cpu())
    model.train()
    return metrics, predictions


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path, obj):
    torch.save(obj, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)


def load_checkpoint(path, device="cpu"):
    """The checkpoint dict, or one line on stderr and exit for a missing, corrupt or foreign file."""
    if not os.path.isfile(path):
        sys.exit(f"error: checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        sys.exit(f"error: cannot read checkpoint {path} ({type(e).__name__}): truncated or not a torch file")
    if not isinstance(ckpt, dict) or ckpt.get("folder") != "clip":
        folder = ckpt.get("folder") if isinstance(ckpt, dict) else None
        sys.exit(f"error: {path} is not a clip/ checkpoint (folder={folder!r})")
    return ckpt


def build_model(config, vocab_size):
    return CLIP(vocab_size, config["context_length"], config["embed_dim"], config["image_width"],
                config["text_width"], config["text_layers"], config["text_heads"])


def get_lr(step, total_steps, args):
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available() or name == "mps" and not torch.backends.mps.is_available():
        sys.exit(f"error: --device {name} is not available on this machine; use --device cpu or auto")
    return name


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    ckpt = load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None:  # the architecture comes from the checkpoint; the schedule from these flags
        for key in ["dataset", "embed_dim", "image_width", "text_width", "text_layers", "text_heads", "context_length"]:
            setattr(args, key, ckpt["config"][key])

    # Device, precision and DDP, nanoGPT-style: one process per GPU when torchrun sets RANK.
    ddp = "RANK" in os.environ
    device = pick_device(args.device)
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        if device == "cuda":
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if args.batch_size % world:
            sys.exit(f"error: --batch-size {args.batch_size} is not divisible by {world} processes")
    else:
        rank, world = 0, 1
    master = rank == 0
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)  # same on every rank: identical initial weights
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda")
                else contextlib.nullcontext())

    # Data and captions
    parts = PARTS[args.dataset]
    train_images, train_labels = load_split(args.dataset, args.data_dir, train=True)
    test_images, test_labels = load_split(args.dataset, args.data_dir, train=False)
    local_batch = args.batch_size // world
    steps_per_epoch = len(train_images) // args.batch_size
    if steps_per_epoch == 0:
        sys.exit(f"error: {len(train_images)} training images are fewer than one batch of {args.batch_size}")
    total_steps = args.epochs * steps_per_epoch
    tokenizer = CharTokenizer(args.context_length)
    sample_captions = CaptionSampler(tokenizer, parts)

    # Model and optimizer: weight decay on weight matrices, not on biases, norm gains or the temperature.
    model = build_model(vars(args), tokenizer.vocab_size).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        rng = ckpt["rng"]
        random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
        np.random.set_state(("MT19937", np.array(rng["numpy"][0], dtype=np.uint32), rng["numpy"][1], 0, 0.0))
        torch.set_rng_state(rng["torch"])
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device.startswith("cuda") else None)

    out_dir = Path(args.out_dir)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"{args.dataset}: {len(train_images)} train / {len(test_images)} test images, {n_params / 1e3:.0f}k "
              f"parameters, {total_steps} steps of {args.batch_size} on {device} x {world}")
    if args.wandb and master:
        import wandb
        wandb.init(project="clip", config=vars(args))
    metric_names = [f"{p}_{m}" for p in parts for m in ["zero_shot_acc", "precision_at_10"]]
    csv_path = out_dir / "metrics.csv"
    if master and not (ckpt is not None and csv_path.exists()):
        with open(csv_path, "w", newline="") as f:
            csv.writer(f).writerow(["step", "epoch", "loss", "lr", "logit_scale", "train_time_s"] + metric_names)

    # The training loop: batch -> captions -> forward -> symmetric loss -> backward -> clip -> step.
    train_time = ckpt["train_time_s"] if ckpt is not None else 0.0
    metrics = ckpt.get("metrics", {}) if ckpt is not None else {}
    bar = tqdm(range(step, total_steps), initial=step, total=total_steps, disable=not master, desc="train")
    perm, t0 = None, time.time()
    for step in bar:
        epoch, i = divmod(step, steps_per_epoch)
        if i == 0 or perm is None:  # the same permutation on every rank, each takes its slice
            perm = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        idx = perm[i * args.batch_size + rank * local_batch: i * args.batch_size + (rank + 1) * local_batch]
        captions_rng = torch.Generator().manual_seed((args.seed * 1_000_003 + step) * 64 + rank)
        images = to_input(train_images[idx]).to(device)
        tokens = sample_captions(train_labels[idx], captions_rng).to(device)
        lr = get_lr(step, total_steps, args)
        for group in optimizer.param_groups:
            group["lr"] = lr

        with autocast:
            image_features, text_features, logit_scale = model(images, tokens)
        image_features, text_features = image_features.float(), text_features.float()
        if ddp:  # Sec. 2.5: the similarity matrix spans the global batch; gradients flow back to each rank
            image_features = torch.cat(dist_fn.all_gather(image_features))
            text_features = torch.cat(dist_fn.all_gather(text_features))
        loss = clip_loss(image_features, text_features, logit_scale.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()

        if master:
            bar.set_postfix(loss=f"{loss.item():.3f}", T=f"{1 / logit_scale.item():.4f}")
        last_of_epoch = (step + 1) % steps_per_epoch == 0
        if master and (step % 20 == 0 or last_of_epoch):
            row = {"step": step + 1, "epoch": epoch, "loss": loss.item(), "lr": lr,
                   "logit_scale": logit_scale.item(), "train_time_s": train_time + time.time() - t0}
            if last_of_epoch:
                train_time += time.time() - t0
                metrics = evaluate(raw_model, tokenizer, test_images, test_labels, args.dataset, device)[0]
                row.update(metrics)
                tqdm.write(f"epoch {epoch + 1}: loss {loss.item():.4f}, train time {train_time:.0f} s, "
                           + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                save_checkpoint(out_dir / "ckpt.pt", {
                    "folder": "clip", "config": vars(args), "model": raw_model.state_dict(),
                    "optimizer": optimizer.state_dict(), "step": step + 1, "train_time_s": train_time,
                    "metrics": metrics, "vocab": tokenizer.chars,
                    "rng": {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
                            "numpy": [np.random.get_state()[1].tolist(), int(np.random.get_state()[2])],
                            "torch": torch.get_rng_state()}})
                t0 = time.time()
            with open(csv_path, "a", newline="") as f:
                csv.writer(f).writerow([row.get(k, "") for k in ["step", "epoch", "loss", "lr", "logit_scale",
                                                                  "train_time_s"] + metric_names])
            if args.wandb:
                wandb.log(row, step=step + 1)
    if master:
        print(f"done: {train_time:.0f} s of training; checkpoint {out_dir / 'ckpt.pt'}; "
              + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if ddp:
        dist.barrier()  # no rank tears down its connections while another still reads from them
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()
