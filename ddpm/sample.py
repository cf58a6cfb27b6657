"""Sample from a trained checkpoint (EMA weights) with DDPM or DDIM and classifier-free guidance;
write a grid, a GIF of the reverse process, or --evaluate the samples with a small classifier.
With no --checkpoint: the shipped MNIST U-Net and its evaluation classifier (ddpm/pretrained/).
Pictures, eval.csv and a trained classifier go to --out-dir (default: the checkpoint's folder;
runs/ddpm for the shipped model).

    python ddpm/sample.py                                         # DDIM-50, w = 2, every digit
    python ddpm/sample.py --sampler ddpm --digit 5 --gif          # DDPM-1000 fives + ddpm_ddpm.gif
    python ddpm/sample.py --steps 20 --evaluate --num-eval 500    # accuracy, classifier-FID
    python ddpm/sample.py --checkpoint runs/ddpm/ckpt.pt          # your own run
"""
import csv
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from model import Classifier, Diffusion, build_model
from plumbing import (
    IMAGE_DATASETS,
    config_dict,
    config_from_checkpoint,
    load_checkpoint,
    load_image_dataset,
    make_out_dir,
    parse_config,
    require,
    save_checkpoint,
    setup,
    shipped_checkpoint,
)
from train import NUM_CLASSES
from train import Config as TrainConfig

SHIPPED_MODEL = "ddpm_mnist_unet.pt"  # the guided U-Net's EMA weights, in ddpm/pretrained/
SHIPPED_CLASSIFIER = "classifier_mnist.pt"  # the evaluation classifier it was scored with

@dataclass
class Config:
    """Sample from a train.py checkpoint (EMA weights) with DDPM or DDIM and classifier-free
    guidance; --evaluate scores the samples with a small classifier."""
    checkpoint: str = ""  # a checkpoint written by train.py ("": the shipped MNIST U-Net)
    out_dir: str | None = None  # outputs (None: the checkpoint's folder, or runs/ddpm if shipped)
    sampler: Literal["ddpm", "ddim"] = "ddim"  # ddpm: all T ancestral steps; ddim: --steps of them
    steps: int | None = None  # DDIM sub-sequence length, 1..T (None: 50; ddpm always walks all T)
    eta: float = 0.0  # DDIM eta: 0 deterministic, 1 DDPM-like noise
    guidance: float = 2.0  # classifier-free guidance weight w (0: plain conditional)
    digit: int | None = None  # the class index to generate (None: every class)
    n: int = 8  # samples per class in the grid
    grid: str = "ddpm_samples.png"  # file name of the sample grid in --out-dir ("": no grid)
    gif: bool = False  # also write the reverse process to --out-dir as ddpm_<sampler>.gif
    evaluate: bool = False  # score --num-eval samples (accuracy, classifier-FID), append eval.csv
    num_eval: int = 500  # samples for --evaluate, spread evenly over the classes
    classifier: str | None = None  # None: the shipped one, else trained once into --out-dir
    classifier_epochs: int = 3  # epochs when the evaluation classifier has to be trained
    data_dir: str = os.environ.get("DATA_DIR", "data")  # datasets, for --evaluate
    batch_size: int = 250  # images sampled at once
    seed: int = 0  # seed of the initial noise, of every sampling step and of the classifier
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: cuda, then mps, then cpu
    threads: int = 0  # CPU threads for torch (0: torch's default)
    aliases = {"digit": "-d"}  # short flags

    def __post_init__(self):
        require(self.steps is None or self.steps >= 1, "--steps must be at least 1")
        require(self.digit is None or self.digit < NUM_CLASSES,
                f"--digit must be a class index in 0..{NUM_CLASSES - 1}, got {self.digit}")
        require(min(self.n, self.num_eval, self.batch_size) >= 1,
                "--n, --num-eval and --batch-size must be at least 1")
        require(Path(self.grid).name == self.grid, "--grid is a file name in --out-dir, not a path")


def generate(ema, diffusion, y, shape, cfg, steps, frames=0):
    """Sample in batches of --batch-size: images in [-1, 1] and the first batch's snapshots."""
    generator = torch.Generator(y.device).manual_seed(cfg.seed)
    images, snapshots = [], []
    for labels in y.split(cfg.batch_size):
        x, snaps = diffusion.sample(ema, labels, (len(labels), *shape), cfg.sampler, steps, cfg.eta,
                                    cfg.guidance, NUM_CLASSES, generator, frames)
        images.append(x)
        snapshots = snapshots or snaps
    return torch.cat(images), snapshots


def write_grid(images, path, nrow):
    torchvision.utils.save_image((images + 1) / 2, f"{path}.tmp.png", nrow=nrow)
    os.replace(f"{path}.tmp.png", path)
    print(f"wrote {path}")


def write_gif(snapshots, path, nrow):
    """One frame per snapshot x_t (a grid, 2x nearest upscaled if small), the final x_0 held 1 s."""
    frames = []
    for x in snapshots:
        grid = torchvision.utils.make_grid(((x.clamp(-1, 1) + 1) / 2).cpu(), nrow=nrow, padding=1)
        grid = F.interpolate(grid[None], scale_factor=2 if len(x) <= 10 else 1, mode="nearest")[0]
        frames.append(Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy())
                      .convert("P"))
    frames[0].save(f"{path}.tmp.gif", save_all=True, append_images=frames[1:], loop=0,
                   duration=[60] * (len(frames) - 1) + [1000])
    os.replace(f"{path}.tmp.gif", path)
    print(f"wrote {path}")


# --------------------------------------------------------------------------------------------------
# Evaluation: a small classifier, trained once per dataset and cached, scores the samples.


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)): the Frechet distance of two Gaussians
    (Heusel et al. 2017)."""
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


CLASSIFIER_KEYS = ("kind", "dataset", "model", "test_accuracy", "test_mu", "test_sigma")


def get_classifier(path, dataset, data_dir, device, epochs, seed=0, expected_sha256=None):
    """Load the cached classifier, or train it on the training set (Adam, `epochs` epochs) and cache
    it with its test accuracy and the feature statistics of the test set (the classifier-FID's
    reference: with them, a cached classifier needs no dataset)."""
    in_channels = IMAGE_DATASETS[dataset][2]
    if Path(path).exists():
        cached = load_checkpoint(path, "ddpm", keys=CLASSIFIER_KEYS, map_location=device,
                                 expected_sha256=expected_sha256)
        if cached["kind"] != "classifier" or cached["dataset"] != dataset:
            sys.exit(f"error: {path} is not an evaluation classifier for {dataset}")
        classifier = Classifier(in_channels, NUM_CLASSES).to(device)
        classifier.load_state_dict(cached["model"])
        return classifier.eval(), cached
    torch.manual_seed(seed)
    classifier = Classifier(in_channels, NUM_CLASSES).to(device)
    images, labels, _ = load_image_dataset(dataset, data_dir, train=True)
    test_images, test_labels, _ = load_image_dataset(dataset, data_dir, train=False)
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
    cached = {"folder": "ddpm", "kind": "classifier", "dataset": dataset,
              "model": classifier.state_dict(),
              "test_accuracy": (predictions == test_labels).float().mean().item(),
              "test_mu": torch.from_numpy(mu), "test_sigma": torch.from_numpy(sigma)}
    save_checkpoint(path, cached)
    print(f"trained the evaluation classifier: test accuracy {cached['test_accuracy']:.4f}, "
          f"cached at {path}")
    return classifier, cached


def inception_weights_path():
    """The standard FID needs torchvision's Inception-v3 weights; offline only usable if cached."""
    weights = torchvision.models.Inception_V3_Weights.IMAGENET1K_V1
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


@torch.no_grad()
def inception_fid(images, reference, device, batch_size=50):
    """FID with torchvision's Inception-v3 (2048-d pool features, 299x299 bilinear, ImageNet
    normalisation). torchvision's weights are not the TF ones of Heusel et al., so the numbers are
    close to, not equal to, the published FIDs; `reference` are as many real test images as there
    are samples."""
    weights = torchvision.models.Inception_V3_Weights.IMAGENET1K_V1
    net = torchvision.models.inception_v3(weights=weights)
    net.fc = torch.nn.Identity()
    net = net.to(device).eval()
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

    def features(x):  # x in [-1, 1], (B, C, H, W) -> (B, 2048)
        x = F.interpolate((x.expand(-1, 3, -1, -1) + 1) / 2, size=(299, 299), mode="bilinear",
                          align_corners=False)
        return net((x - mean) / std).cpu()
    fake = torch.cat([features(x) for x in images.split(batch_size)])
    real = torch.cat([features(x.to(device).float() / 127.5 - 1)
                      for x in reference.split(batch_size)])
    return frechet_distance(*feature_stats(fake), *feature_stats(real))


def evaluate(images, y, classifier, cached, dataset, data_dir, name):
    """Recognised-as-requested accuracy, classifier-FID against the test set and, when torchvision's
    Inception weights are cached, the standard FID ("" when they are not)."""
    features, predictions = classify(classifier, images)
    accuracy = (predictions == y.cpu()).float().mean().item()
    cfid = frechet_distance(*feature_stats(features), cached["test_mu"].double().numpy(),
                            cached["test_sigma"].double().numpy())
    print(f"{name}: {len(images)} samples, recognised as the requested class {accuracy:.2%}, "
          f"classifier-FID {cfid:.3f} (evaluation classifier test accuracy "
          f"{cached['test_accuracy']:.2%})")
    if not inception_weights_path().exists():
        print(f"standard FID: not computed, torchvision's Inception-v3 weights are not at "
              f"{inception_weights_path()}")
        return accuracy, cfid, ""
    try:
        test_images, _, _ = load_image_dataset(dataset, data_dir, train=False)
    except SystemExit as e:  # the shipped model samples without data; this FID needs test images
        print(f"standard FID: not computed, it needs the {dataset} test images ({e})")
        return accuracy, cfid, ""
    fid = inception_fid(images, test_images[:len(images)], y.device)
    print(f"{name}: FID (torchvision Inception-v3, {len(images)} samples vs as many test images) "
          f"{fid:.2f}")
    return accuracy, cfid, f"{fid:.3f}"


def append_eval_row(path, cfg, steps, accuracy, cfid, fid, seconds):
    """One row per --evaluate run in eval.csv (a header first when the file is new)."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["sampler", "steps", "eta", "guidance", "num_samples", "accuracy",
                             "classifier_fid", "inception_fid", "images_per_s", "seconds", "seed"])
        writer.writerow([cfg.sampler, steps, cfg.eta, cfg.guidance, cfg.num_eval, f"{accuracy:.4f}",
                         f"{cfid:.4f}", fid, f"{cfg.num_eval / seconds:.3f}", f"{seconds:.1f}",
                         cfg.seed])


def load_model(path, device):
    """The EMA eps_theta (eval mode), the schedule and the training config, rebuilt from a
    checkpoint alone ("" : the shipped model, checked against pretrained/manifest.json)."""
    ckpt = load_checkpoint(path, "ddpm", keys=("config", "ema"), map_location=device,
                           shipped=SHIPPED_MODEL)
    trained = config_from_checkpoint(TrainConfig, ckpt, path or SHIPPED_MODEL)
    _, image_size, in_channels, _, _ = IMAGE_DATASETS[trained.dataset]
    ema = build_model(config_dict(trained), in_channels, image_size, NUM_CLASSES).to(device)
    ema.load_state_dict(ckpt["ema"])  # a bf16 file is cast back to float32 here
    return ema.eval(), Diffusion(trained.T, trained.schedule).to(device), trained


def classifier_file(cfg, dataset, out_dir):
    """--classifier; else the shipped one for the shipped model; else a cache in --out-dir.
    Returns the path and the sha256 it must have (None: not checked)."""
    if cfg.classifier:
        return cfg.classifier, None
    if not cfg.checkpoint:
        print(f"using the shipped evaluation classifier ddpm/pretrained/{SHIPPED_CLASSIFIER}",
              file=sys.stderr)
        return shipped_checkpoint(SHIPPED_CLASSIFIER)
    return out_dir / f"classifier_{dataset}.pt", None


def main(argv=None):
    cfg = parse_config(Config, argv)
    _, _, _, device = setup(cfg)
    ema, diffusion, trained = load_model(cfg.checkpoint, device)
    if cfg.sampler == "ddpm" and cfg.steps not in (None, trained.T):
        sys.exit(f"error: --sampler ddpm walks all T={trained.T} steps; "
                 f"use --sampler ddim for --steps {cfg.steps}")
    steps = trained.T if cfg.sampler == "ddpm" else cfg.steps or 50
    if steps > trained.T:
        sys.exit(f"error: --steps must be in 1..{trained.T} (the checkpoint's T), got {steps}")
    out_dir = make_out_dir(cfg.out_dir or (Path(cfg.checkpoint).parent if cfg.checkpoint
                                           else "runs/ddpm"))
    _, image_size, in_channels, _, _ = IMAGE_DATASETS[trained.dataset]
    eta = f" eta={cfg.eta:g}" if cfg.sampler == "ddim" else ""
    name = f"{cfg.sampler.upper()}-{steps}{eta} w={cfg.guidance:g}"

    classes = list(range(NUM_CLASSES)) if cfg.digit is None else [cfg.digit]
    if cfg.evaluate:  # evenly over the requested classes: 0, 1, ..., 9, 0, 1, ...
        y = torch.tensor(classes, device=device).repeat(-(-cfg.num_eval // len(classes)))
        y = y[:cfg.num_eval]
        path, sha = classifier_file(cfg, trained.dataset, out_dir)
        classifier, cached = get_classifier(path, trained.dataset, cfg.data_dir, device,
                                            cfg.classifier_epochs, cfg.seed, sha)
    else:  # row i holds sample i of every requested class
        y = torch.tensor(classes, device=device).repeat(cfg.n)
    start = time.time()
    shape = (in_channels, image_size, image_size)
    images, snapshots = generate(ema, diffusion, y, shape, cfg, steps, frames=40 if cfg.gif else 0)
    seconds = time.time() - start
    print(f"{name}: {len(y)} images in {seconds:.1f} s, {len(y) / seconds:.2f} images/s")

    if cfg.evaluate:
        accuracy, cfid, fid = evaluate(images, y, classifier, cached, trained.dataset, cfg.data_dir,
                                       name)
        append_eval_row(out_dir / "eval.csv", cfg, steps, accuracy, cfid, fid, seconds)
    nrow = len(classes) if len(classes) > 1 else 8
    if cfg.grid:
        write_grid(images, out_dir / cfg.grid, nrow)
    if cfg.gif:  # the first row only: keeps the GIF small
        write_gif([x[:nrow] for x in snapshots], out_dir / f"ddpm_{cfg.sampler}.gif", nrow)


if __name__ == "__main__":
    main()
