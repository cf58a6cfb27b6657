"""Sample from a trained checkpoint (EMA weights) with DDPM or DDIM and classifier-free guidance; write a
grid, a GIF of the reverse process, or --evaluate the samples with a small classifier trained once and cached.

    python sample.py --checkpoint runs/ddpm/ckpt.pt                          # DDIM-50, w = 2, every digit
    python sample.py --sampler ddpm -d 5 --gif                               # DDPM-1000 fives, images/ddpm_ddpm.gif
    python sample.py --sampler ddim --steps 20 --evaluate --num-eval 500     # accuracy and classifier-FID
"""
import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from model import Classifier, Diffusion, build_model
from train import DATASETS, NUM_CLASSES, load_checkpoint, load_dataset, pick_device

IMAGES = Path(__file__).resolve().parent.parent / "images"


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/ddpm/ckpt.pt", help="checkpoint written by train.py")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddim", help="ddpm: all T ancestral steps; ddim: --steps of them")
    p.add_argument("--steps", type=int, default=None, help="DDIM sub-sequence length, 1..T (default 50; ddpm always uses T)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like noise")
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance weight w >= 0 (0: plain conditional)")
    p.add_argument("-d", "--digit", type=int, default=None, help="class index to generate (default: every class)")
    p.add_argument("--n", type=int, default=8, help="samples per class in the grid")
    p.add_argument("--out", default=None, help="where to write the sample grid (default images/ddpm_samples.png; with --evaluate only if given)")
    p.add_argument("--gif", default=None, nargs="?", const="auto",
                   help="also write the reverse process as a GIF (default path images/ddpm_<sampler>.gif)")
    p.add_argument("--evaluate", action="store_true", help="compute classifier accuracy and classifier-FID instead of a grid")
    p.add_argument("--num-eval", type=int, default=500, help="samples for --evaluate (spread evenly over the classes)")
    p.add_argument("--classifier", default=None, help="cached evaluation classifier (default runs/ddpm/classifier_<dataset>.pt; trained if absent)")
    p.add_argument("--classifier-epochs", type=int, default=3, help="epochs when the evaluation classifier has to be trained")
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "data"), help="dataset root, for --evaluate")
    p.add_argument("--batch-size", type=int, default=250, help="images sampled at once")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise and of every sampling step")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto: cuda, then mps, then cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    return p


def generate(ema, diffusion, y, shape, args, device, frames=0):
    """Sample in batches of --batch-size; returns images in [-1, 1] and the first batch's snapshots."""
    generator = torch.Generator(device).manual_seed(args.seed)
    images, snapshots = [], []
    for labels in y.split(args.batch_size):
        x, snaps = diffusion.sample(ema, labels, (len(labels), *shape), args.sampler, args.steps, args.eta,
                                    args.guidance, NUM_CLASSES, generator, frames)
        images.append(x)
        snapshots = snapshots or snaps
    return torch.cat(images), snapshots


def write_gif(snapshots, path, nrow):
    """One frame per snapshot x_t (a grid, 2x nearest upscaled if small), the final x_0 held for a second."""
    frames = []
    for x in snapshots:
        grid = torchvision.utils.make_grid(((x.clamp(-1, 1) + 1) / 2).cpu(), nrow=nrow, padding=1)
        grid = F.interpolate(grid[None], scale_factor=2 if len(x) <= 10 else 1, mode="nearest")[0]
        frames.append(Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy()).convert("P"))
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(str(path) + ".tmp.gif", save_all=True, append_images=frames[1:], loop=0,
                   duration=[60] * (len(frames) - 1) + [1000])
    os.replace(str(path) + ".tmp.gif", path)


# ---------------------------------------------------------------------------------------------------------
# Evaluation: a small classifier, trained once per dataset and cached, scores the samples.


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)): the Frechet distance of two Gaussians (Heusel et al. 2017)."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * covmean))


def feature_stats(features):
    features = features.double().numpy()
    return features.mean(0), np.cov(features, rowvar=False)


@torch.no_grad()
def classify(classifier, images, batch_size=500):
    """Penultimate features and predicted classes of images in [-1, 1]."""
    features = torch.cat([classifier.features(x) for x in images.split(batch_size)])
    return features.cpu(), classifier.head(features).argmax(1).cpu()


def get_classifier(path, dataset, data_dir, device, epochs, seed=0):
    """Load the cached classifier, or train it on the training set (Adam, `epochs` epochs) and cache it with
    its test accuracy and the feature statistics of the test set (the reference of the classifier-FID)."""
    in_channels = DATASETS[dataset][2]
    classifier = Classifier(in_channels, NUM_CLASSES).to(device)
    if os.path.isfile(path):
        cached = load_checkpoint(path)
        if cached.get("kind") != "classifier" or cached.get("dataset") != dataset:
            sys.exit(f"error: {path} is not an evaluation classifier for {dataset}")
        classifier.load_state_dict(cached["model"])
        return classifier.eval(), cached
    torch.manual_seed(seed)
    images, labels = load_dataset(dataset, data_dir, train=True)
    test_images, test_labels = load_dataset(dataset, data_dir, train=False)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    for epoch in range(epochs):
        for index in torch.randperm(len(images)).split(128):
            x = images[index].to(device).float() / 127.5 - 1
            loss = F.cross_entropy(classifier(x), labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    classifier.eval()
    features, predictions = classify(classifier, test_images.to(device).float() / 127.5 - 1)
    mu, sigma = feature_stats(features)
    cached = {"folder": "ddpm", "kind": "classifier", "dataset": dataset, "model": classifier.state_dict(),
              "test_accuracy": (predictions == test_labels).float().mean().item(),
              "test_mu": torch.from_numpy(mu), "test_sigma": torch.from_numpy(sigma)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(cached, path + ".tmp")
    os.replace(path + ".tmp", path)
    print(f"trained the evaluation classifier: test accuracy {cached['test_accuracy']:.4f}, cached at {path}")
    return classifier, cached


def inception_weights_path():
    """The standard FID needs torchvision's Inception-v3 weights; offline they are only usable if cached."""
    weights = torchvision.models.Inception_V3_Weights.IMAGENET1K_V1
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


@torch.no_grad()
def inception_fid(images, reference, device, batch_size=50):
    """FID with torchvision's Inception-v3 (2048-d pool features, 299x299 bilinear, ImageNet normalisation).
    torchvision's weights are not the TF ones of Heusel et al., so the numbers are close to, not equal to, the
    published FIDs; `reference` are as many real test images as there are samples."""
    net = torchvision.models.inception_v3(weights=torchvision.models.Inception_V3_Weights.IMAGENET1K_V1)
    net.fc = torch.nn.Identity()
    net = net.to(device).eval()
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

    def features(x):  # x in [-1, 1], (B, C, H, W) -> (B, 2048)
        x = F.interpolate((x.expand(-1, 3, -1, -1) + 1) / 2, size=(299, 299), mode="bilinear", align_corners=False)
        return net((x - mean) / std).cpu()
    fake = torch.cat([features(x) for x in images.split(batch_size)])
    real = torch.cat([features(x.to(device).float() / 127.5 - 1) for x in reference.split(batch_size)])
    return frechet_distance(*feature_stats(fake), *feature_stats(real))


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (np.isfinite(args.guidance) and args.guidance >= 0):
        parser.error(f"--guidance must be a finite number >= 0, got {args.guidance}")
    if not (np.isfinite(args.eta) and args.eta >= 0):
        parser.error(f"--eta must be >= 0, got {args.eta}")
    if args.digit is not None and not 0 <= args.digit < NUM_CLASSES:
        parser.error(f"-d/--digit must be a class index in 0..{NUM_CLASSES - 1}, got {args.digit}")
    if args.n < 1 or args.num_eval < 1 or args.batch_size < 1:
        parser.error("--n, --num-eval and --batch-size must be >= 1")
    device = pick_device(args.device)
    checkpoint = load_checkpoint(args.checkpoint, map_location=device)
    config = checkpoint["config"]
    T = config["T"]
    if args.sampler == "ddpm" and args.steps not in (None, T):
        parser.error(f"--sampler ddpm walks all T={T} steps; use --sampler ddim for --steps {args.steps}")
    args.steps = T if args.sampler == "ddpm" else 50 if args.steps is None else args.steps
    if not 1 <= args.steps <= T:
        parser.error(f"--steps must be in 1..{T} (the checkpoint's T), got {args.steps}")

    # ---- rebuild eps_theta and the schedule from the checkpoint alone; sample with the EMA weights
    _, _, in_channels, image_size = DATASETS[config["dataset"]]
    ema = build_model(config, in_channels, image_size, NUM_CLASSES).to(device)
    ema.load_state_dict(checkpoint["ema"])
    ema.eval()
    diffusion = Diffusion(T, config["schedule"]).to(device)
    shape = (in_channels, image_size, image_size)
    name = f"{args.sampler.upper()}-{args.steps}" + (f" eta={args.eta:g}" if args.sampler == "ddim" else "") + f" w={args.guidance:g}"

    classes = list(range(NUM_CLASSES)) if args.digit is None else [args.digit]
    if args.evaluate:  # evenly over the requested classes: 0, 1, ..., 9, 0, 1, ...
        y = torch.tensor(classes, device=device).repeat(-(-args.num_eval // len(classes)))[:args.num_eval]
        classifier_path = args.classifier or f"runs/ddpm/classifier_{config['dataset']}.pt"
        classifier, cached = get_classifier(classifier_path, config["dataset"], args.data_dir, device,
                                            args.classifier_epochs, args.seed)
    else:  # row i holds sample i of every requested class
        y = torch.tensor(classes, device=device).repeat(args.n)
    start = time.time()
    images, snapshots = generate(ema, diffusion, y, shape, args, device, frames=40 if args.gif else 0)
    seconds = time.time() - start
    print(f"{name}: {len(y)} images in {seconds:.1f} s, {len(y) / seconds:.2f} images/s")

    if args.evaluate:
        features, predictions = classify(classifier, images)
        accuracy = (predictions == y.cpu()).float().mean().item()
        cfid = frechet_distance(*feature_stats(features), cached["test_mu"].numpy(), cached["test_sigma"].numpy())
        print(f"{name}: {args.num_eval} samples, recognised as the requested class {accuracy:.2%}, "
              f"classifier-FID {cfid:.3f} (evaluation classifier test accuracy {cached['test_accuracy']:.2%})")
        fid = ""
        if inception_weights_path().exists():
            test_images, _ = load_dataset(config["dataset"], args.data_dir, train=False)
            fid = inception_fid(images, test_images[:len(images)], device)
            print(f"{name}: FID (torchvision Inception-v3, {len(images)} samples vs as many test images) {fid:.2f}")
        else:
            print(f"standard FID: not computed, torchvision's Inception-v3 weights are not at {inception_weights_path()}")
        results = Path(args.checkpoint).parent / "eval.csv"
        new = not results.exists()
        with open(results, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["sampler", "steps", "eta", "guidance", "num_samples", "accuracy", "classifier_fid",
                                 "inception_fid", "images_per_s", "seconds", "seed"])
            writer.writerow([args.sampler, args.steps, args.eta, args.guidance, args.num_eval, f"{accuracy:.4f}",
                             f"{cfid:.4f}", fid and f"{fid:.3f}", f"{args.num_eval / seconds:.3f}", f"{seconds:.1f}", args.seed])

    nrow = len(classes) if len(classes) > 1 else 8
    out = args.out or (None if args.evaluate else str(IMAGES / "ddpm_samples.png"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        torchvision.utils.save_image((images + 1) / 2, out + ".tmp.png", nrow=nrow)
        os.replace(out + ".tmp.png", out)
        print(f"wrote {out}")
    if args.gif:
        gif = IMAGES / f"ddpm_{args.sampler}.gif" if args.gif == "auto" else Path(args.gif)
        write_gif([x[:nrow] for x in snapshots], gif, nrow)  # the first row only: keeps the GIF small
        print(f"wrote {gif}")


if __name__ == "__main__":
    main()
