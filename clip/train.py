"""Train CLIP (Radford et al., 2021) on MNIST / FashionMNIST images paired with generated captions.

Every training image gets a caption drawn at random from its class's training templates ("a
handwritten 7", "the number seven written by hand", "a photo of an ankle boot", ...). Other
templates are held out: zero-shot accuracy is measured with those only, on phrasings the model
never saw.

    python train.py                                   # MNIST, 1 epoch (a few CPU minutes)
    python train.py --dataset both --epochs 4         # MNIST and FashionMNIST in one model
    torchrun --standalone --nproc_per_node=4 train.py --device cuda --batch-size 1024
"""
import functools
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.distributed.nn.functional as dist_fn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from model import (
    CLIP,
    CharTokenizer,
    class_text_embeddings,
    clip_loss,
    encode_images,
    precision_at_k,
    unique_captions,
    zero_shot_predict,
)
from plumbing import (
    Clock,
    MetricsLog,
    autocast,
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
    teardown,
)


@dataclass
class Config:
    """Train CLIP on MNIST / FashionMNIST with template captions."""
    # data
    dataset: Literal["mnist", "fashion_mnist", "both"] = "mnist"  # both: one model for the two
    data_dir: str = os.environ.get("DATA_DIR", "data")  # where datasets live ($DATA_DIR or ./data)
    out_dir: str = "runs/clip"  # the checkpoint (ckpt.pt) and metrics.csv go here
    # model
    embed_dim: int = 64  # dimension of the joint image-text space
    image_width: int = 16  # channels of the CNN's first stage (x2, x4 after)
    text_width: int = 32  # width of the text Transformer
    text_layers: int = 2  # blocks of the text Transformer
    text_heads: int = 4  # attention heads of the text Transformer
    context_length: int = 48  # characters per caption, with [SOS] and [EOS]
    # optimisation
    epochs: int = 1  # passes over the training images
    batch_size: int = 128  # N of the N x N similarity matrix (global, all ranks together)
    lr: float = 5e-3  # peak AdamW learning rate
    weight_decay: float = 0.1  # AdamW weight decay, on weight matrices only
    warmup_steps: int = 50  # linear warm-up steps, then cosine decay to 0
    grad_clip: float = 1.0  # clip the gradient norm to this (0: off)
    # the run
    max_minutes: float = 0.0  # stop after this many minutes, evaluation included (0: off)
    resume: str | None = None  # continue from this checkpoint exactly where it stopped
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: cuda, then mps, then cpu
    threads: int = 0  # CPU threads for torch (0: torch's default; 1 is fastest on a busy CPU)
    seed: int = 0  # seeds Python, NumPy and torch; same seed, same CPU run
    compile: bool = False  # torch.compile the model
    wandb: bool = False  # also log to Weights & Biases (WANDB_MODE=offline works)

    def __post_init__(self):
        for name in ["epochs", "batch_size", "embed_dim", "image_width", "text_width",
                     "text_layers", "text_heads"]:
            require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1")
        require(self.lr > 0, "--lr must be > 0")
        require(self.text_width % self.text_heads == 0,
                "--text-width must be divisible by --text-heads")
        require(self.context_length >= 8, "--context-length must be >= 8")


# On --resume the architecture comes from the checkpoint; the schedule and the run from the flags.
ARCHITECTURE = ["dataset", "embed_dim", "image_width", "text_width", "text_layers", "text_heads",
                "context_length"]

# --------------------------------------------------------------------------------------------------
# Captions: a few names per class and templates per dataset; some templates never used in training.

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CLASS_NAMES = {
    "mnist": [[word, str(i)] for i, word in enumerate(DIGITS)],
    "fashion_mnist": [["t-shirt", "top"], ["trouser", "pair of trousers"], ["pullover", "sweater"],
                      ["dress"], ["coat"], ["sandal"], ["shirt"], ["sneaker"], ["bag", "handbag"],
                      ["ankle boot", "boot"]],
}
TEMPLATES = {
    "mnist": {
        "train": ["a photo of the digit {name}", "a handwritten {name}",
                  "the number {name} written by hand", "an image of the number {name}",
                  "{a} {name}", "the digit {name}", "a scan of a handwritten {name}",
                  "a black and white photo of the number {name}"],
        "heldout": ["a picture of the number {name}", "a drawing of {a} {name}",
                    "an example of the number {name}", "this is {a} {name}"],
    },
    "fashion_mnist": {
        "train": ["a photo of {a} {name}", "a picture of {a} {name}", "{a} {name}",
                  "a product photo of {a} {name}", "a black and white photo of {a} {name}",
                  "a low resolution photo of {a} {name}", "a fashion item: {a} {name}",
                  "the {name}"],
        "heldout": ["a close-up photo of {a} {name}", "a small image of {a} {name}",
                    "this is {a} {name}", "a grayscale picture of the {name}"],
    },
}
SEARCH_TEMPLATE = {"mnist": "a handwritten {name}", "fashion_mnist": "a photo of {a} {name}"}


def article(name):
    return "an" if name[0] in "aeiou8" else "a"  # "an ankle boot", "an 8", "an eight"


def fill(template, name):
    return template.format(name=name, a=article(name))


def templates(part, split):
    """The templates of one dataset: "train", "heldout" or "all"."""
    return TEMPLATES[part]["train"] + TEMPLATES[part]["heldout"] if split == "all" \
        else TEMPLATES[part][split]


def class_captions(parts, split):
    """For each class of the datasets in `parts`: every caption of the split."""
    return [[fill(t, name) for t in templates(part, split) for name in names]
            for part in parts for names in CLASS_NAMES[part]]


class CaptionSampler:
    """Draws a random training caption for each label, from captions tokenized once up front."""

    def __init__(self, tokenizer, parts):
        captions = class_captions(parts, "train")
        self.tokens = tokenizer([c for per_class in captions for c in per_class])  # (K, T)
        self.count = torch.tensor([len(c) for c in captions])
        self.offset = torch.cumsum(self.count, 0) - self.count

    def __call__(self, labels, generator):
        r = torch.rand(len(labels), generator=generator)
        return self.tokens[self.offset[labels] + (r * self.count[labels]).long()]  # (B, T)


# --------------------------------------------------------------------------------------------------
# Data: torchvision's files read once into uint8 tensors; batches are indexed straight from them.

PARTS = {"mnist": ["mnist"], "fashion_mnist": ["fashion_mnist"], "both": ["mnist", "fashion_mnist"]}


def load_split(dataset, data_dir, train):
    """Images (N, 1, 28, 28) uint8 and labels (N,): 0-9 MNIST, 0-9 FashionMNIST, 0-19 for 'both'."""
    images, labels = [], []
    for i, part in enumerate(PARTS[dataset]):
        x, y, _ = load_image_dataset(part, data_dir, train)
        images.append(x)
        labels.append(y + 10 * i)
    return torch.cat(images), torch.cat(labels)


def to_input(images):
    return (images.float() / 255 - 0.5) / 0.5  # (B, 1, 28, 28) in [-1, 1]


@functools.lru_cache(maxsize=1)
def epoch_permutation(n, seed, epoch):
    """The order of the training images in one epoch: the same on every rank."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))


def get_batch(train, step, steps_per_epoch, cfg, rank, world, captioner):
    """This rank's slice of batch `step` in its epoch's order, a random caption for each."""
    train_images, train_labels = train
    epoch, i = divmod(step, steps_per_epoch)
    local_batch = cfg.batch_size // world
    start = i * cfg.batch_size + rank * local_batch
    idx = epoch_permutation(len(train_images), cfg.seed, epoch)[start:start + local_batch]
    captions_rng = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 64 + rank)
    return to_input(train_images[idx]), captioner(train_labels[idx], captions_rng), epoch


def get_lr(step, total_steps, cfg):
    if step < cfg.warmup_steps:  # linear warm-up
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))  # cosine decay to 0


# --------------------------------------------------------------------------------------------------
# Evaluation: zero-shot accuracy and text -> image precision@10, per dataset, among its 10 classes.


def evaluate(model, tokenizer, images, labels, dataset, device, split="heldout", k=10):
    model.eval()
    features = encode_images(model, to_input(images), device)  # (N, D)
    metrics, predictions = {}, {}
    for i, part in enumerate(PARTS[dataset]):
        mask = (labels >= 10 * i) & (labels < 10 * (i + 1))
        part_features, part_labels = features[mask.to(device)], (labels[mask] - 10 * i).to(device)
        captions = class_captions([part], split)
        weights = class_text_embeddings(model, tokenizer, captions, device)  # (10, D)
        pred = zero_shot_predict(part_features, weights)
        metrics[f"{part}_zero_shot_acc"] = (pred == part_labels).float().mean().item()
        queries = [fill(SEARCH_TEMPLATE[part], name)
                   for names in CLASS_NAMES[part] for name in names]
        query_labels = torch.tensor([c for c, names in enumerate(CLASS_NAMES[part]) for _ in names],
                                    device=device)
        query_features = model.encode_text(tokenizer(queries).to(device)).float()
        metrics[f"{part}_precision_at_{k}"] = precision_at_k(
            part_features, part_labels, query_features, query_labels, min(k, len(part_labels)))
        predictions[part] = (pred.cpu(), part_labels.cpu())
    model.train()
    return metrics, predictions


# --------------------------------------------------------------------------------------------------
# The run's plumbing: configuration, model and optimizer, checkpoints.


def load_config(argv):
    """The flags; on --resume the checkpoint's ARCHITECTURE, every other field from the flags."""
    cfg = parse_config(Config, argv)
    if not cfg.resume:
        return cfg, None
    ckpt = load_checkpoint(cfg.resume, "clip", keys=["config", "model", "optimizer", "step", "rng",
                                                      "train_time_s", "seconds", "metrics"])
    flags = {k: v for k, v in asdict(cfg).items() if k not in ARCHITECTURE}
    return config_from_checkpoint(Config, ckpt, cfg.resume, **flags), ckpt


def build_model(config, vocab_size):
    return CLIP(vocab_size, config["context_length"], config["embed_dim"], config["image_width"],
                config["text_width"], config["text_layers"], config["text_heads"])


def make_optimizer(model, cfg):
    """AdamW; weight decay on weight matrices, not on biases, norm gains or the temperature."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


def restore(ckpt, model, optimizer):
    """(step, train_time_s, metrics) where the checkpoint stopped; its weights and RNG states."""
    if ckpt is None:
        return 0, 0.0, {}
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    return ckpt["step"], ckpt["train_time_s"], ckpt["metrics"]


def save(path, cfg, model, optimizer, tokenizer, step, train_time, metrics, clock):
    save_checkpoint(path, {
        "folder": "clip", "config": config_dict(cfg), "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "step": step, "train_time_s": train_time,
        "seconds": clock.seconds, "metrics": metrics, "vocab": tokenizer.chars, "rng": rng_state()})


def load_data(cfg, world):
    """The training and test splits, and the number of steps per epoch."""
    if cfg.batch_size % world:
        sys.exit(f"error: --batch-size {cfg.batch_size} is not divisible by {world} processes")
    train = load_split(cfg.dataset, cfg.data_dir, train=True)  # (images, labels)
    if len(train[0]) < cfg.batch_size:
        sys.exit(f"error: {len(train[0])} training images are fewer than one batch")
    test = load_split(cfg.dataset, cfg.data_dir, train=False)
    return train, test, len(train[0]) // cfg.batch_size


def open_log(out_dir, cfg, ckpt, master):
    metrics = [f"{p}_{m}" for p in PARTS[cfg.dataset] for m in ["zero_shot_acc", "precision_at_10"]]
    return MetricsLog(out_dir, ["step", "epoch", "loss", "lr", "logit_scale", "train_time_s"]
                      + metrics, resume=ckpt is not None, project="clip", enabled=master,
                      wandb_config=config_dict(cfg) if cfg.wandb else None)


def results(metrics, before=""):
    return before + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) if metrics else ""


def end_of_epoch(path, cfg, model, optimizer, tokenizer, test, device, step, epoch, loss,
                 train_time, clock):
    """Zero-shot accuracy and precision@10 on the test set (reported, never used to select a model),
    then the checkpoint."""
    metrics = evaluate(model, tokenizer, *test, cfg.dataset, device)[0]
    tqdm.write(f"epoch {epoch + 1}: loss {loss:.4f}, train time {train_time:.0f} s, "
               + results(metrics))
    save(path, cfg, model, optimizer, tokenizer, step, train_time, metrics, clock)
    return metrics


def main(argv=None):
    cfg, ckpt = load_config(argv)
    ddp, rank, world, device = setup(cfg)  # threads, seeds, device; DDP when torchrun sets RANK
    master = rank == 0
    train, test, steps_per_epoch = load_data(cfg, world)  # (images, labels) each
    total_steps = cfg.epochs * steps_per_epoch
    tokenizer = CharTokenizer(cfg.context_length)
    captioner = CaptionSampler(tokenizer, PARTS[cfg.dataset])
    model = raw_model = build_model(config_dict(cfg), tokenizer.vocab_size).to(device)
    optimizer = make_optimizer(model, cfg)
    step, train_time, metrics = restore(ckpt, model, optimizer)
    model = torch.compile(model) if cfg.compile else model
    if ddp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    out_dir = make_out_dir(cfg.out_dir) if master else None
    log = open_log(out_dir, cfg, ckpt, master)
    if master:
        print(f"{cfg.dataset}: {len(train[0])} train / {len(test[0])} test images, "
              f"{sum(p.numel() for p in raw_model.parameters()) / 1e3:.0f}k parameters, "
              f"{total_steps} steps of {cfg.batch_size} on {device} x {world}")

    # The training loop: batch -> captions -> forward -> symmetric loss -> backward -> clip -> step.
    clock = Clock(cfg.max_minutes, ckpt["seconds"] if ckpt else 0.0)
    bar = tqdm(total=total_steps, initial=step, disable=not master, desc="train")
    while step < total_steps and not clock.done():
        t0 = time.time()
        images, tokens, epoch = get_batch(train, step, steps_per_epoch, cfg, rank, world, captioner)
        lr = get_lr(step, total_steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        captions, inverse = unique_captions(tokens.to(device))  # each distinct caption once (exact)
        with autocast(device):
            image_features, text_features, logit_scale = model(images.to(device), captions)
        image_features, text_features = image_features.float(), text_features[inverse].float()
        if ddp:  # Sec. 2.5: the similarity matrix spans the global batch; gradients flow back
            image_features = torch.cat(dist_fn.all_gather(image_features))
            text_features = torch.cat(dist_fn.all_gather(text_features))
        loss = clip_loss(image_features, text_features, logit_scale.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}", T=f"{1 / logit_scale.item():.4f}")
        train_time += time.time() - t0  # evaluation time is not training time
        end_of_an_epoch = step % steps_per_epoch == 0
        if master and end_of_an_epoch:  # evaluate on the test set, save a checkpoint
            metrics = end_of_epoch(out_dir / "ckpt.pt", cfg, raw_model, optimizer, tokenizer, test,
                                   device, step, epoch, loss.item(), train_time, clock)
        if master and (step % 20 == 1 or end_of_an_epoch):
            log.log(step=step, epoch=epoch, loss=loss.item(), lr=lr, logit_scale=logit_scale.item(),
                    train_time_s=train_time, **(metrics if end_of_an_epoch else {}))
    bar.close()
    if master and step % steps_per_epoch:  # stopped within an epoch (--max-minutes or Ctrl-C)
        save(out_dir / "ckpt.pt", cfg, raw_model, optimizer, tokenizer, step, train_time, metrics,
             clock)
    if master:
        print(f"{'done' if step == total_steps else 'stopped'} at step {step} of {total_steps}, "
              f"{train_time:.0f} s of training: {out_dir / 'ckpt.pt'}" + results(metrics, "; "))
    log.close()
    clock.close()
    teardown(ddp)
    return metrics


if __name__ == "__main__":
    main()
