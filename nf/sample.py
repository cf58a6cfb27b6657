"""Use a trained RealNVP: samples sorted by likelihood, test bits/dim, latent interpolations.

    python nf/sample.py                        # runs/nf/nf_samples.png from the shipped model
    python nf/sample.py --out-dir images       # the README's picture, images/nf_samples.png
    python nf/sample.py --eval                 # its test bits/dim (needs MNIST)
    python nf/sample.py --interpolate          # runs/nf/nf_interpolation.png between test images
    python nf/sample.py --checkpoint runs/nf/ckpt.pt -n 16   # your own run, 16 samples
"""
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torchvision

from model import bits_per_dim, log_likelihood, postprocess, preprocess
from plumbing import (
    config_from_checkpoint,
    load_checkpoint,
    load_image_dataset,
    make_out_dir,
    parse_config,
    pick_device,
    require,
)
from train import Config as TrainConfig
from train import build_model, evaluate


@dataclass
class Config:
    """Use a trained RealNVP: samples sorted by likelihood, test bits/dim, latent interpolations."""
    checkpoint: str = ""  # checkpoint written by train.py ("": the shipped MNIST model)
    num_samples: int = 64  # how many samples to draw
    temperature: float = 0.7  # std of the latent prior; 0 gives the mode path
    eval: bool = False  # print test bits/dim instead of sampling
    eval_examples: int | None = None  # test images --eval scores (None: the checkpoint's setting)
    interpolate: bool = False  # walk the latent space between test images instead
    out_dir: str = "runs/nf"  # nf_samples.png, nf_interpolation.png go here (images: the README's)
    data_dir: str = os.environ.get("DATA_DIR", "data")  # datasets are here ($DATA_DIR, else ./data)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # where to run
    seed: int = 0  # seed for the latents
    aliases = {"num_samples": "-n"}  # short flags

    def __post_init__(self):
        require(self.num_samples >= 1, "--num-samples must be at least 1")
        require(self.eval_examples is None or self.eval_examples >= 1,
                "--eval-examples must be at least 1")


@torch.no_grad()
def sample(model, num_samples, temperature, device):
    """x = f^-1(z), z ~ N(0, T^2 I). Returns pixel images in [0, 1] and each one's log p_Y(y)."""
    num_dims = torch.Size(model.image_shape).numel()
    z = temperature * torch.randn(num_samples, num_dims, device=device)
    images = postprocess(model.inverse(z))  # (N, C, H, W) in [0, 1]
    pixels = (images * 255).round()  # score the 8-bit image we show, at the centre of its bin
    return images, log_likelihood(model, pixels, torch.full_like(pixels, 0.5))


@torch.no_grad()
def interpolate(model, x_a, x_b, steps=9):
    """Encode two images, walk the straight line between their latents, decode every point."""
    noise = torch.full((2, *x_a.shape), 0.5, device=x_a.device)
    z, _ = model(preprocess(torch.stack([x_a, x_b]), noise)[0])
    weights = torch.linspace(0, 1, steps, device=z.device).view(-1, 1)
    return postprocess(model.inverse((1 - weights) * z[0] + weights * z[1]))


def main(argv=None):
    cfg = parse_config(Config, argv)
    device = pick_device(cfg.device)
    ckpt = load_checkpoint(cfg.checkpoint, "nf", keys=["config", "model", "step"],
                           shipped="nf_mnist.pt")  # "": pretrained/nf_mnist.pt, sha256 checked
    train_cfg = config_from_checkpoint(TrainConfig, ckpt, cfg.checkpoint or "nf_mnist.pt")
    model = build_model(train_cfg).to(device)
    model.load_state_dict(ckpt["model"])
    model.eval()
    torch.manual_seed(cfg.seed)
    if cfg.eval or cfg.interpolate:
        x_test = load_image_dataset(train_cfg.dataset, cfg.data_dir, train=False)[0].to(device)
    if cfg.eval:
        x_test = x_test[: cfg.eval_examples or train_cfg.eval_examples]
        print(f"{train_cfg.dataset} test bits/dim: {evaluate(model, x_test):.4f} "
              f"({train_cfg.arch}, step {ckpt['step']}, {len(x_test)} test images)")
        return
    out_dir = make_out_dir(cfg.out_dir)
    if cfg.interpolate:
        rows = [interpolate(model, x_test[2 * i], x_test[2 * i + 1]) for i in range(4)]
        path = out_dir / "nf_interpolation.png"
        torchvision.utils.save_image(torch.cat(rows), path, nrow=rows[0].shape[0], padding=1)
        print(f"wrote {path}")
        return
    images, log_p = sample(model, cfg.num_samples, cfg.temperature, device)
    order = log_p.argsort(descending=True)  # most likely first
    bpd = bits_per_dim(log_p, images[0].numel())
    for rank, i in enumerate(order[:5].tolist()):
        print(f"sample {i}: log p = {log_p[i].item():.1f} nats ({bpd[i].item():.3f} bits/dim), "
              f"rank {rank}")
    path = out_dir / "nf_samples.png"
    torchvision.utils.save_image(images[order], path, nrow=8, padding=1)
    print(f"wrote {path}: {cfg.num_samples} samples at temperature {cfg.temperature}, sorted by "
          f"likelihood ({bpd.min().item():.3f} to {bpd.max().item():.3f} bits/dim)")


if __name__ == "__main__":
    main()
