"""Use a trained RealNVP: samples sorted by likelihood, test bits/dim, latent interpolations.

    python nf/sample.py                                  # images/nf_samples.png, 64 samples at temperature 0.7
    python nf/sample.py --eval                           # test bits/dim of runs/nf/ckpt.pt
    python nf/sample.py --interpolate                    # images/nf_interpolation.png between test images
"""
import argparse
import os
from pathlib import Path

import torch
import torchvision

from model import bits_per_dim, log_likelihood, postprocess, preprocess
from train import build_model, evaluate, get_device, load_checkpoint, load_split

IMAGES = Path(__file__).resolve().parent.parent / "images"


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/nf/ckpt.pt", help="checkpoint written by train.py")
    p.add_argument("-n", "--num-samples", type=int, default=64, help="how many samples to draw")
    p.add_argument("--temperature", type=float, default=0.7, help="std of the latent prior; 0 gives the mode path")
    p.add_argument("--out", default=str(IMAGES / "nf_samples.png"), help="where to write the sample grid")
    p.add_argument("--eval", action="store_true", help="print test bits/dim instead of sampling")
    p.add_argument("--eval-examples", type=int, default=None,
                   help="test images --eval uses (default: the checkpoint's --eval-examples; 10000: all of MNIST's)")
    p.add_argument("--interpolate", action="store_true", help="walk the latent space between test images instead")
    p.add_argument("--interpolation-out", default=str(IMAGES / "nf_interpolation.png"), help="where --interpolate writes")
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "data"), help="dataset root (default $DATA_DIR or ./data)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to run")
    p.add_argument("--seed", type=int, default=0, help="seed for the latents")
    return p


@torch.no_grad()
def sample(model, num_samples, temperature, device):
    """x = f^-1(z), z ~ N(0, T^2 I). Returns pixel images in [0, 1] and each sample's log-density log p_Y(y)."""
    num_dims = torch.Size(model.image_shape).numel()
    z = temperature * torch.randn(num_samples, num_dims, device=device)
    images = postprocess(model.inverse(z))  # (N, C, H, W) in [0, 1]
    pixels = (images * 255).round()  # score the 8-bit image we show, at the centre of its dequantisation bin
    return images, log_likelihood(model, pixels, torch.full_like(pixels, 0.5))


@torch.no_grad()
def interpolate(model, x_a, x_b, steps=9):
    """Encode two images, walk the straight line between their latents, decode every point."""
    noise = torch.full((2, *x_a.shape), 0.5, device=x_a.device)
    z, _ = model(preprocess(torch.stack([x_a, x_b]), noise)[0])
    weights = torch.linspace(0, 1, steps, device=z.device).view(-1, 1)
    return postprocess(model.inverse((1 - weights) * z[0] + weights * z[1]))


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.temperature < 0 or (args.eval_examples is not None and args.eval_examples < 1):
        parser.error("need --num-samples >= 1, --temperature >= 0 and --eval-examples >= 1")
    device = get_device(args.device)
    checkpoint = load_checkpoint(args.checkpoint, device)
    config = checkpoint["config"]
    model = build_model(config).to(device)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    torch.manual_seed(args.seed)
    if args.eval:
        x_test = load_split(config["dataset"], args.data_dir, train=False)[: args.eval_examples or config["eval_examples"]]
        x_test = x_test.to(device)
        print(f"{config['dataset']} test bits/dim: {evaluate(model, x_test):.4f} "
              f"({config['arch']}, step {checkpoint['step']}, {len(x_test)} test images)")
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.interpolate:
        x_test = load_split(config["dataset"], args.data_dir, train=False).to(device)
        rows = [interpolate(model, x_test[2 * i], x_test[2 * i + 1]) for i in range(4)]
        path = args.interpolation_out
        torchvision.utils.save_image(torch.cat(rows), path, nrow=rows[0].shape[0], padding=1)
        print(f"wrote {path}")
        return
    images, log_p = sample(model, args.num_samples, args.temperature, device)
    order = log_p.argsort(descending=True)  # most likely first
    bpd = bits_per_dim(log_p, images[0].numel())
    for rank, i in enumerate(order[:5].tolist()):
        print(f"sample {i}: log p = {log_p[i].item():.1f} nats ({bpd[i].item():.3f} bits/dim), rank {rank}")
    torchvision.utils.save_image(images[order], args.out, nrow=8, padding=1)
    print(f"wrote {args.out}: {args.num_samples} samples at temperature {args.temperature}, sorted by likelihood "
          f"({bpd.min().item():.3f} to {bpd.max().item():.3f} bits/dim)")


if __name__ == "__main__":
    main()
