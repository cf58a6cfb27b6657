"""Train a masked autoencoder, then measure what it learned: `pretrain`, `linprobe` or `finetune`.

    python train.py pretrain                                   # MAE on MNIST, a tiny ViT for a CPU
    python train.py linprobe --init runs/mae/pretrain/ckpt.pt  # frozen encoder, BN + linear head
    python train.py linprobe                                   # the same probe, random encoder
    python train.py finetune --init runs/mae/pretrain/ckpt.pt  # the whole encoder, end to end
    python train.py finetune                                   # the same encoder from scratch
    torchrun --standalone --nproc_per_node=4 train.py pretrain --preset gpu

Configuration first (Config, MODE_DEFAULTS, PRESETS), then data and evaluation, then one function
per mode that builds its model and hands it to `fit`, the one training loop: batch -> forward ->
loss -> backward -> clip -> step -> schedule, an evaluation, a row of metrics.csv and ckpt.pt after
every epoch. linprobe and finetune evaluate each epoch on validation images held out of the
training split and on the test split once, at the end; pretrain selects nothing, and its loss on
the test images is a learning curve.
"""
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from model import MaskedAutoencoder, ViTClassifier, param_groups_lrd
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
    set_rng_state,
    setup,
    split_validation,
    teardown,
)


@dataclass
class Config:
    """Pretrain a masked autoencoder (MODE pretrain), then train a linear probe on its frozen
    encoder (linprobe) or fine-tune the encoder (finetune); without --init the last two start from
    a random encoder, the baseline. epochs, lr and weight decay default per mode (MODE_DEFAULTS)."""
    # data
    dataset: Literal["mnist", "fashion_mnist", "cifar10"] = "mnist"  # which torchvision dataset
    data_dir: str = os.environ.get("DATA_DIR", "data")  # dataset root ($DATA_DIR, else ./data)
    out_dir: str | None = None  # checkpoint (ckpt.pt) and metrics.csv (default: runs/mae/MODE)
    train_examples: int = 0  # use only the first N training images (0: all)
    val_images: int = 5000  # linprobe/finetune: training images held out to validate (0: none)
    test_examples: int = 0  # test on only the first N test images (0: all)
    # the ViT encoder and the lightweight decoder
    patch_size: int = 7  # patch side p; the image side must be a multiple of it
    embed_dim: int = 64  # encoder width (a multiple of 4 and of --num-heads)
    depth: int = 4  # encoder Transformer blocks
    num_heads: int = 4  # encoder attention heads
    decoder_embed_dim: int = 32  # decoder width (narrower than the encoder)
    decoder_depth: int = 2  # decoder Transformer blocks (fewer than the encoder)
    decoder_num_heads: int = 4  # decoder attention heads
    mlp_ratio: float = 4.0  # MLP hidden width / width
    # MAE pretraining
    mask_ratio: float = 0.75  # fraction of patches masked, in (0, 1)
    norm_pix_loss: bool = True  # reconstruct each patch's pixels normalised by its mean and std
    # linear probing and fine-tuning
    init: str | None = None  # linprobe/finetune: a pretrain checkpoint (omit: a random encoder)
    pool: Literal["mean", "cls"] = "mean"  # features: the mean of the patch tokens, or [CLS]
    layer_decay: float = 1.0  # layer-wise lr decay in (0, 1] (1: off; the paper fine-tunes at 0.75)
    # optimisation: AdamW, linear warm-up, then cosine decay to zero, as in the paper
    epochs: int | None = None  # passes over the training images (default per mode: 10/10/2)
    batch_size: int = 256  # images per step, per process
    lr: float | None = None  # peak learning rate (default per mode: 1e-3/1e-2/1e-3)
    weight_decay: float | None = None  # AdamW weight decay (default per mode: 0.05/0/0.05)
    warmup_steps: int = 100  # linear learning-rate warm-up
    grad_clip: float = 1.0  # clip the gradient norm to this (0: off)
    # the run
    max_minutes: float = 0.0  # wall-clock limit, evaluation included; saves ckpt.pt (0: off)
    resume: str | None = None  # continue from this checkpoint exactly where it stopped
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: cuda, then mps, then the cpu
    threads: int = 0  # CPU threads for torch (0: its default; 1 is fastest on a busy CPU)
    seed: int = 0  # seeds Python, NumPy and torch: the same seed, the same run on a CPU
    compile: bool = False  # torch.compile the trained module
    wandb: bool = False  # also log to Weights & Biases (WANDB_MODE=offline works)

    def __post_init__(self):
        for name in ["batch_size", "patch_size", "embed_dim", "depth", "num_heads",
                     "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "mlp_ratio"]:
            require(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive")
        require(self.epochs is None or self.epochs > 0, "--epochs must be positive")
        require(self.lr is None or self.lr > 0, "--lr must be positive")
        require(0 < self.mask_ratio < 1, f"--mask-ratio must be in (0, 1), got {self.mask_ratio}")
        require(0 < self.layer_decay <= 1,
                f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        side = IMAGE_DATASETS[self.dataset][1]
        require(side % self.patch_size == 0, f"--patch-size {self.patch_size} does not divide the "
                f"{self.dataset} image side {side}")
        for width, heads in [("embed_dim", "num_heads"),
                             ("decoder_embed_dim", "decoder_num_heads")]:
            d, h = getattr(self, width), getattr(self, heads)
            require(d % 4 == 0 and d % h == 0, f"--{width.replace('_', '-')} {d} must be a "
                    f"multiple of 4 and of --{heads.replace('_', '-')} {h}")


MODES = ["pretrain", "linprobe", "finetune"]
MODE_DEFAULTS = {  # the paper's recipes, shrunk to a few epochs; explicit flags win
    "pretrain": dict(epochs=10, lr=1e-3, weight_decay=0.05),
    "linprobe": dict(epochs=10, lr=1e-2, weight_decay=0.0),
    "finetune": dict(epochs=2, lr=1e-3, weight_decay=0.05),
}
PRESETS = {
    "cpu": {},  # the defaults: patch 7 on 28x28, width 64, 4 blocks; decoder width 32, 2 blocks
    "gpu": dict(patch_size=4, embed_dim=192, depth=8, num_heads=3, decoder_embed_dim=128,
                decoder_depth=4, batch_size=512),
}
ARCH_KEYS = ["dataset", "patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim",
             "decoder_depth", "decoder_num_heads", "mlp_ratio", "norm_pix_loss"]  # the model shape
COLUMNS = {"pretrain": ["epoch", "step", "train_loss", "test_loss", "lr", "train_seconds",
                        "images_per_s"],
           "linprobe": ["epoch", "step", "train_loss", "val_acc", "test_acc", "lr", "train_seconds",
                        "images_per_s"]}
COLUMNS["finetune"] = COLUMNS["linprobe"]
RESUME_KEYS = ["config", "mode", "model", "optimizer", "step", "epoch", "partial", "rng", "seconds"]
PARTIAL = ("order", "next", "loss_sum", "seen", "seconds")  # an epoch stopped in its middle


def parse(argv=None):
    """-> (cfg, mode): the flags, and the mode's own defaults for what the command line left out."""
    cfg, extras = parse_config(Config, argv, PRESETS, extra=lambda parser: parser.add_argument(
        "mode", nargs="?", default="pretrain", choices=MODES,
        help="pretrain the MAE, or train a linear probe on / fine-tune its encoder"))
    mode = extras["mode"]
    defaults = {k: v for k, v in MODE_DEFAULTS[mode].items() if getattr(cfg, k) is None}
    cfg = dataclasses.replace(cfg, out_dir=cfg.out_dir or f"runs/mae/{mode}", **defaults)
    if cfg.init and mode == "pretrain":
        sys.exit("error: --init is for linprobe and finetune (pretrain starts from scratch; "
                 "--resume continues a run)")
    return cfg, mode


def with_architecture(cfg, ckpt, path):
    """cfg with the model's shape taken from a checkpoint: --resume continues that model, --init
    probes or fine-tunes that encoder."""
    ours = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ARCH_KEYS}
    return config_from_checkpoint(Config, ckpt, path, **ours)


# ------------------------------------------------------------------------------------------------
# Data, models, evaluation

def load_data(cfg, mode):
    """-> (train, val, test), each (uint8 images (N, C, H, W), labels); val is None for pretrain
    and where --val-images is 0, and otherwise held out of the training images."""
    train_x, train_y, _ = load_image_dataset(cfg.dataset, cfg.data_dir, train=True)
    test_x, test_y, _ = load_image_dataset(cfg.dataset, cfg.data_dir, train=False)
    if cfg.train_examples:
        train_x, train_y = train_x[:cfg.train_examples], train_y[:cfg.train_examples]
    if cfg.test_examples:
        test_x, test_y = test_x[:cfg.test_examples], test_y[:cfg.test_examples]
    if mode == "pretrain" or not cfg.val_images:
        return (train_x, train_y), None, (test_x, test_y)
    if cfg.val_images >= len(train_x):
        sys.exit(f"error: --val-images {cfg.val_images} leaves nothing to train on "
                 f"({len(train_x)} training images)")
    keep, held_out = (i.sort().values for i in split_validation(len(train_x),
                                                                 cfg.val_images / len(train_x)))
    return (train_x[keep], train_y[keep]), (train_x[held_out], train_y[held_out]), (test_x, test_y)


def build_model(cfg, mode):
    """The MAE for pretraining, else the encoder with a probe or fine-tuning head."""
    _, side, channels, _, _ = IMAGE_DATASETS[cfg.dataset]
    encoder = dict(img_size=side, patch_size=cfg.patch_size, in_chans=channels,
                   embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                   mlp_ratio=cfg.mlp_ratio)
    if mode == "pretrain":
        return MaskedAutoencoder(**encoder, decoder_embed_dim=cfg.decoder_embed_dim,
                                 decoder_depth=cfg.decoder_depth,
                                 decoder_num_heads=cfg.decoder_num_heads,
                                 norm_pix_loss=cfg.norm_pix_loss)
    return ViTClassifier(10, head=mode, pool=cfg.pool, **encoder)  # all three datasets: 10 classes


def load_weights(module, state, path):
    try:
        module.load_state_dict(state)
    except RuntimeError:
        sys.exit(f"error: checkpoint {path} holds weights that do not fit the model its config "
                 f"describes")


def build(cfg, mode, device, init, ckpt):
    """The mode's model on the device: --init's encoder, or --resume's whole model, loaded."""
    model = build_model(cfg, mode).to(device)
    if init is not None:
        load_weights(model.encoder, {k[len("encoder."):]: v for k, v in init["model"].items()
                                     if k.startswith("encoder.")}, cfg.init)
    if ckpt is not None:
        load_weights(model, ckpt["model"], cfg.resume)
    return model


def lr_at(step, total_steps, cfg):
    """Linear warm-up to cfg.lr, then half a cosine down to zero."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def encode(classifier, x, cfg, device, desc="features"):
    """The frozen encoder's pooled features for every image: (N, D) on the device."""
    classifier.eval()
    batch_size = 2 * cfg.batch_size
    return torch.cat([classifier.features(normalize(x[i:i + batch_size].to(device),
                                                    cfg.dataset)).float()
                      for i in tqdm(range(0, len(x), batch_size), desc=desc, leave=False)])


@torch.no_grad()
def masked_patch_loss(mae, x, cfg, device, batch_size, mask_ratio=None):
    """The mean loss on the masked patches of x, with masks drawn from a fixed seed."""
    mae.eval()
    total = 0.0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(1234)
        for i in range(0, len(x), batch_size):
            xb = normalize(x[i:i + batch_size].to(device), cfg.dataset)
            with autocast(device):
                total += mae(xb, mask_ratio or cfg.mask_ratio)[0].item() * len(xb)
    return total / len(x)


@torch.no_grad()
def accuracy(classify, x, y, device, batch_size, dataset=None):
    """Top-1 accuracy in % of `classify` on (x, y): images of `dataset`, or features already
    (dataset=None)."""
    classify.eval()
    total = 0.0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        with autocast(device):
            logits = classify(normalize(xb, dataset) if dataset else xb)
        total += (logits.argmax(-1) == yb).sum().item() * 100.0
    return total / len(x)


# ------------------------------------------------------------------------------------------------
# The training loop, shared by the three modes

def save(cfg, mode, env, model, optimizer, epoch, step, data_gen, partial=None, metrics=None):
    """ckpt.pt (rank 0): after an epoch, or in its middle (`partial`) when the clock stops."""
    if env.rank == 0:
        save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), {
            "folder": "mae", "mode": mode, "config": config_dict(cfg), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch, "partial": partial,
            "rng": rng_state(data_gen), "seconds": env.clock.seconds, "metrics": metrics})


def stopped(cfg, env, step):
    if env.rank == 0:
        print(f"stopped at step {step} after {env.clock.seconds / 60:.1f} min; --resume "
              f"{os.path.join(cfg.out_dir, 'ckpt.pt')} continues the run", file=sys.stderr)


def fit(cfg, mode, env, model, trained, optimizer, train, loss_fn, evaluate, ckpt):
    """Train `trained` (the whole model, or the probe's head) on train = (x, y); `evaluate(last)`
    gives the metrics after each epoch; model is what ckpt.pt saves."""
    train_x, train_y = train
    data_gen = torch.Generator().manual_seed(cfg.seed)  # the same shuffle on every rank
    epoch, step, partial = 0, 0, None
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        epoch, step, partial = ckpt["epoch"], ckpt["step"], ckpt["partial"]
        set_rng_state(ckpt["rng"], data_gen)  # rank 0's generators
    if ckpt is None or env.rank > 0:
        torch.manual_seed(cfg.seed + env.rank + 1000 * step)  # each rank draws its own masks
    run = torch.compile(trained) if cfg.compile else trained
    if env.ddp:
        run = DDP(run, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    total_steps = cfg.epochs * math.ceil(len(train_x) // env.world / cfg.batch_size)
    for epoch in range(epoch, cfg.epochs):
        trained.train()
        t0 = time.perf_counter()
        if partial:  # resume where a --max-minutes stop (or Ctrl-C) left this epoch
            order, first, loss_sum, seen, seconds = (partial[k] for k in PARTIAL)
            partial = None
        else:
            order = torch.randperm(len(train_x), generator=data_gen)
            first, loss_sum, seen, seconds = 0, 0.0, 0, 0.0
        perm = order[:len(order) // env.world * env.world][env.rank::env.world]  # equal shards
        bar = tqdm(range(first, len(perm), cfg.batch_size), disable=env.rank > 0,
                   desc=f"{mode} epoch {epoch + 1}/{cfg.epochs}")
        for i in bar:
            if env.clock.done():  # out of time, or Ctrl-C: save where we are and stop
                seconds += time.perf_counter() - t0
                save(cfg, mode, env, model, optimizer, epoch, step, data_gen,
                     partial=dict(zip(PARTIAL, (order, i, loss_sum, seen, seconds))))
                bar.close()
                return stopped(cfg, env, step)
            idx = perm[i:i + cfg.batch_size]
            xb, yb = train_x[idx].to(env.device), train_y[idx].to(env.device)  # get batch
            lr = lr_at(step, total_steps, cfg)
            for group in optimizer.param_groups:  # schedule (x layer-wise decay, if any)
                group["lr"] = lr * group["lr_scale"]
            with autocast(env.device):
                loss = loss_fn(run, xb, yb)  # forward
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # backward
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trained.parameters(), cfg.grad_clip)  # clip
            optimizer.step()  # step
            step += 1
            loss_sum, seen = loss_sum + loss.item() * len(idx), seen + len(idx)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
        seconds += time.perf_counter() - t0
        metrics = dict(train_loss=loss_sum / seen, **evaluate(last=epoch + 1 == cfg.epochs), lr=lr,
                       train_seconds=round(seconds, 2),
                       images_per_s=round(seen * env.world / seconds, 1))
        env.log.log(epoch=epoch + 1, step=step, **metrics)
        if env.rank == 0:
            print(f"{mode} epoch {epoch + 1}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith(("loss", "acc"))) +
                f", {metrics['images_per_s']:.0f} images/s", file=sys.stderr)
        save(cfg, mode, env, model, optimizer, epoch + 1, step, data_gen, metrics=metrics)
        if env.clock.done() and epoch + 1 < cfg.epochs:
            return stopped(cfg, env, step)


# ------------------------------------------------------------------------------------------------
# The three modes

def pretrain(cfg, env, ckpt, init):
    """Sec. 3: the MAE paints the masked patches back. Nothing is selected; the loss on the test
    images after each epoch is a learning curve."""
    train, _, (test_x, _) = load_data(cfg, "pretrain")
    mae = build(cfg, "pretrain", env.device, init, ckpt)
    optimizer = torch.optim.AdamW(param_groups_lrd(mae, cfg.weight_decay, cfg.layer_decay),
                                  lr=cfg.lr, betas=(0.9, 0.95))  # the paper's Table 8

    def loss_fn(run, xb, yb):
        return run(normalize(xb, cfg.dataset), cfg.mask_ratio)[0]  # MSE on the masked patches

    def evaluate(last):
        return {"test_loss": masked_patch_loss(mae, test_x, cfg, env.device, 2 * cfg.batch_size)}

    fit(cfg, "pretrain", env, mae, mae, optimizer, train, loss_fn, evaluate, ckpt)


def linprobe(cfg, env, ckpt, init):
    """Sec. 4 and Appendix A.2: BatchNorm without affine parameters and a linear layer on the
    frozen encoder's features. Nothing is augmented, so the features are computed once."""
    (train_x, train_y), val, (test_x, test_y) = load_data(cfg, "linprobe")
    model = build(cfg, "linprobe", env.device, init, ckpt)
    model.encoder.requires_grad_(False)
    train = encode(model, train_x, cfg, env.device, "train features"), train_y
    if val is not None:
        val = encode(model, val[0], cfg, env.device, "validation features"), val[1]
    optimizer = torch.optim.AdamW(param_groups_lrd(model, cfg.weight_decay, cfg.layer_decay),
                                  lr=cfg.lr, betas=(0.9, 0.999))

    def loss_fn(head, features, yb):
        return F.cross_entropy(head(features), yb)

    def evaluate(last):
        size, metrics = 2 * cfg.batch_size, {}
        if val is not None:
            metrics["val_acc"] = accuracy(model.head, *val, env.device, size)
        if last:  # the test split, once
            features = encode(model, test_x, cfg, env.device, "test features")
            metrics["test_acc"] = accuracy(model.head, features, test_y, env.device, size)
        return metrics

    fit(cfg, "linprobe", env, model, model.head, optimizer, train, loss_fn, evaluate, ckpt)


def finetune(cfg, env, ckpt, init):
    """Sec. 4: the whole encoder and a linear head on the mean-pooled (or [CLS]) features, end to
    end, with optional layer-wise lr decay."""
    train, val, (test_x, test_y) = load_data(cfg, "finetune")
    model = build(cfg, "finetune", env.device, init, ckpt)
    optimizer = torch.optim.AdamW(param_groups_lrd(model, cfg.weight_decay, cfg.layer_decay),
                                  lr=cfg.lr, betas=(0.9, 0.999))  # the paper's Table 9

    def loss_fn(run, xb, yb):
        return F.cross_entropy(run(normalize(xb, cfg.dataset)), yb)

    def evaluate(last):
        size, metrics = 2 * cfg.batch_size, {}
        if val is not None:
            metrics["val_acc"] = accuracy(model, *val, env.device, size, cfg.dataset)
        if last:  # the test split, once
            metrics["test_acc"] = accuracy(model, test_x, test_y, env.device, size, cfg.dataset)
        return metrics

    fit(cfg, "finetune", env, model, model, optimizer, train, loss_fn, evaluate, ckpt)


def main(argv=None):
    cfg, mode = parse(argv)
    ckpt = load_checkpoint(cfg.resume, "mae", keys=RESUME_KEYS) if cfg.resume else None
    init = load_checkpoint(cfg.init, "mae", keys=["config", "mode", "model"]) if cfg.init else None
    if ckpt is not None and ckpt["mode"] != mode:
        sys.exit(f"error: {cfg.resume} is a {ckpt['mode']} checkpoint, not {mode}")
    if init is not None and init["mode"] != "pretrain":
        sys.exit(f"error: --init needs a pretrain checkpoint, {cfg.init} is {init['mode']}")
    if ckpt is not None:  # the model is the checkpoint's
        cfg = with_architecture(cfg, ckpt, cfg.resume)
    elif init is not None:  # the encoder is the pretrained one
        cfg = with_architecture(cfg, init, cfg.init)
    ddp, rank, world, device = setup(cfg)
    make_out_dir(cfg.out_dir)
    clock = Clock(cfg.max_minutes, seconds=ckpt["seconds"] if ckpt is not None else 0.0)
    log = MetricsLog(cfg.out_dir, COLUMNS[mode], resume=ckpt is not None, project="mae",
                     wandb_config=dict(config_dict(cfg), mode=mode) if cfg.wandb else None,
                     run_name=f"{mode}-{cfg.dataset}", enabled=rank == 0)
    env = SimpleNamespace(ddp=ddp, rank=rank, world=world, device=device, clock=clock, log=log)
    {"pretrain": pretrain, "linprobe": linprobe, "finetune": finetune}[mode](cfg, env, ckpt, init)
    clock.close()
    log.close()
    teardown(ddp)


if __name__ == "__main__":
    main()
