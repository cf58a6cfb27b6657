"""Everything done with a mae/ checkpoint: reconstructions, test accuracy, and the encoder's cost
against the mask ratio. Without --checkpoint: the models shipped in pretrained/.

    python sample.py                     # the shipped MAE: runs/mae/mae_reconstructions.png
    python sample.py --eval              # the shipped models' test accuracy and masked-patch loss
    python sample.py --checkpoint runs/mae/pretrain/ckpt.pt --out-dir ../images   # your own run
    python sample.py --checkpoint runs/mae/linprobe/ckpt.pt --eval       # a probe's test accuracy
    python sample.py --benchmark         # the encoder's FLOPs and time against the mask ratio
"""
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from model import num_visible, patchify, unpatchify  # noqa: E402
from plumbing import (  # noqa: E402
    IMAGE_DATASETS,
    config_from_checkpoint,
    load_checkpoint,
    load_image_dataset,
    make_out_dir,
    normalize,
    parse_config,
    pick_device,
    require,
)
from train import Config as TrainConfig  # noqa: E402
from train import accuracy, build_model, load_weights, masked_patch_loss  # noqa: E402


@dataclass
class Config:
    """Draw a pretrain checkpoint's reconstructions of test images (the default), print a
    checkpoint's test accuracy or masked-patch loss (--eval), or time its encoder (--benchmark).
    Without --checkpoint: the shipped MAE (pretrained/mae_mnist.pt), and for --eval also the
    shipped fine-tuned classifier (pretrained/mae_mnist_finetune.pt)."""
    checkpoint: str = ""  # a checkpoint written by mae/train.py (default: the shipped models)
    data_dir: str = os.environ.get("DATA_DIR", "data")  # dataset root ($DATA_DIR, else ./data)
    out_dir: str = "runs/mae"  # the figure goes here (--out-dir images: the README's picture)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: cuda, then mps, then the cpu
    threads: int = 0  # CPU threads for torch (0: its default)
    seed: int = 0  # seeds the random masks
    num_images: int = 8  # test images in the reconstruction figure
    mask_ratio: float | None = None  # for the figure and --eval (default: the checkpoint's)
    eval: bool = False  # print the test accuracy (linprobe, finetune) or masked-patch loss
    test_examples: int = 0  # --eval on only the first N test images (0: all)
    benchmark: bool = False  # print the encoder's FLOPs and time per image at each --mask-ratios
    mask_ratios: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 0.9)  # --benchmark's (0: whole images)
    batch_size: int = 256  # images per forward pass

    def __post_init__(self):
        require(self.mask_ratio is None or 0 < self.mask_ratio < 1,
                f"--mask-ratio must be in (0, 1), got {self.mask_ratio}")
        require(all(r < 1 for r in self.mask_ratios), "--mask-ratios must be in [0, 1)")
        require(self.num_images > 0 and self.batch_size > 0,
                "--num-images and --batch-size must be positive")


@torch.no_grad()
def reconstruct(mae, imgs, mask_ratio):
    """-> masked input, reconstruction, reconstruction with the visible patches pasted back;
    all (B, C, H, W)."""
    p, C = mae.encoder.patch_size, mae.encoder.in_chans
    _, pred, mask = mae(imgs, mask_ratio)  # pred (B, N, p*p*C), mask (B, N), 1 = masked
    if mae.norm_pix_loss:  # the decoder predicts normalised patches: put each one's mean, std back
        target = patchify(imgs, p)
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 \
            + target.mean(dim=-1, keepdim=True)
    recon = unpatchify(pred, p, C)
    mask_img = unpatchify(mask[:, :, None].expand(-1, -1, p * p * C), p, C)  # 1 on masked pixels
    return mask_img, recon, imgs * (1 - mask_img) + recon * mask_img


def to_pixels(x, dataset):
    """Standardised (B, C, H, W) -> numpy (B, H, W[, 3]) in [0, 1] for imshow."""
    _, _, _, mean, std = IMAGE_DATASETS[dataset]
    mean, std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    x = (x.float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return x[..., 0] if x.shape[-1] == 1 else x


def plot_reconstructions(imgs, mask_img, recon, pasted, dataset, mask_ratio, path):
    original = to_pixels(imgs, dataset)
    m = mask_img[:, 0].cpu().numpy()  # (B, H, W), 1 on masked pixels
    m = m[..., None] if original.ndim == 4 else m
    masked = original * (1 - m) + 0.5 * m  # masked patches in grey
    rows = [("original", original), (f"masked {mask_ratio:.0%}", masked),
            ("reconstruction", to_pixels(recon, dataset)),
            ("+ visible", to_pixels(pasted, dataset))]
    n = len(imgs)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.2 * n, 1.3 * len(rows)), squeeze=False)
    for r, (title, images) in enumerate(rows):
        for c in range(n):
            axes[r][c].imshow(images[c], cmap="gray", vmin=0, vmax=1)
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
        axes[r][0].set_ylabel(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def encoder_cost(encoder, imgs, mask_ratios, repeats=3):
    """For each mask ratio: (tokens the encoder sees, forward+backward GFLOPs per image,
    milliseconds per image)."""
    rows = []
    for ratio in mask_ratios:
        tokens = 1 + (num_visible(encoder.num_patches, ratio) if ratio > 0 else encoder.num_patches)
        with FlopCounterMode(display=False) as counter:
            encoder(imgs, ratio)[0].sum().backward()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            encoder(imgs, ratio)[0].sum().backward()
            times.append(time.perf_counter() - t0)
        rows.append((ratio, tokens, counter.get_total_flops() / len(imgs) / 1e9,
                     1e3 * min(times) / len(imgs)))
    return rows


SHIPPED = {"pretrain": "mae_mnist.pt", "finetune": "mae_mnist_finetune.pt"}  # in pretrained/
EXAMPLES = Path(__file__).resolve().parent / "pretrained" / "mnist_test_examples.png"


def load_model(path, device, shipped=SHIPPED["pretrain"]):
    """-> (model in eval mode, its training Config, mode), rebuilt from the checkpoint alone;
    path "" loads the shipped file `shipped`, checked against pretrained/manifest.json."""
    ckpt = load_checkpoint(path, "mae", keys=["config", "mode", "model"], shipped=shipped)
    name = path or f"pretrained/{shipped}"
    train_cfg, mode = config_from_checkpoint(TrainConfig, ckpt, name), ckpt["mode"]
    model = build_model(train_cfg, mode).to(device)
    load_weights(model, ckpt["model"], name)  # a bf16 shipped file is cast back to fp32 here
    return model.eval(), train_cfg, mode


def stored_examples():
    """The first 8 MNIST test images, kept beside the shipped models as one 28 x 224 PNG strip:
    (8, 1, 28, 28) uint8, so that the shipped MAE draws its reconstructions with no dataset."""
    strip = torch.as_tensor(np.array(Image.open(EXAMPLES)))  # (28, 8 * 28)
    return strip.reshape(28, -1, 28).permute(1, 0, 2)[:, None].contiguous()


def load_test_images(cfg, train_cfg):
    test_x, test_y, _ = load_image_dataset(train_cfg.dataset, cfg.data_dir, train=False)
    if cfg.test_examples:
        test_x, test_y = test_x[:cfg.test_examples], test_y[:cfg.test_examples]
    return test_x, test_y


def evaluate(model, train_cfg, mode, cfg, device, name):
    """One line: a classifier's test accuracy, or a pretrain checkpoint's masked-patch loss."""
    test_x, test_y = load_test_images(cfg, train_cfg)
    if mode == "pretrain":
        mask_ratio = cfg.mask_ratio or train_cfg.mask_ratio
        loss = masked_patch_loss(model, test_x, train_cfg, device, cfg.batch_size, mask_ratio)
        return (f"{mode} checkpoint {name}: test masked-patch loss at mask ratio {mask_ratio} = "
                f"{loss:.4f} on {len(test_x)} {train_cfg.dataset} images")
    acc = accuracy(model, test_x, test_y, device, cfg.batch_size, train_cfg.dataset)
    return (f"{mode} checkpoint {name}: test accuracy % = {acc:.4f} on {len(test_x)} "
            f"{train_cfg.dataset} images")


def main(argv=None):
    cfg = parse_config(Config, argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    if cfg.eval:
        shipped = [] if cfg.checkpoint else [SHIPPED["finetune"], SHIPPED["pretrain"]]
        for name in shipped or [cfg.checkpoint]:
            model, train_cfg, mode = load_model(cfg.checkpoint, device, name)
            print(evaluate(model, train_cfg, mode, cfg, device,
                           cfg.checkpoint or f"pretrained/{name}"))
        return
    model, train_cfg, mode = load_model(cfg.checkpoint, device)
    if not cfg.benchmark and mode != "pretrain":
        sys.exit(f"error: reconstructions need a pretrain checkpoint, {cfg.checkpoint} is {mode} "
                 f"(try --eval)")
    mnist_absent = not (Path(cfg.data_dir) / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists()
    if not (cfg.checkpoint or cfg.benchmark) and mnist_absent and cfg.num_images <= 8:
        test_x = stored_examples()
        print(f"MNIST is not in {cfg.data_dir}: using the {len(test_x)} test images in "
              f"pretrained/{EXAMPLES.name}", file=sys.stderr)
    else:
        test_x, _ = load_test_images(cfg, train_cfg)
    torch.manual_seed(cfg.seed)  # the masks
    if cfg.benchmark:
        imgs = normalize(test_x[:cfg.batch_size].to(device), train_cfg.dataset)
        print("| mask ratio | encoder tokens | encoder GFLOPs / image (fwd+bwd) "
              "| encoder ms / image (fwd+bwd) |")
        print("| --- | --- | --- | --- |")
        for ratio, tokens, gflops, ms in encoder_cost(model.encoder, imgs, cfg.mask_ratios):
            print(f"| {ratio:.2f} | {tokens} | {gflops:.4f} | {ms:.3f} |")
    else:
        mask_ratio = cfg.mask_ratio or train_cfg.mask_ratio
        imgs = normalize(test_x[:cfg.num_images].to(device), train_cfg.dataset)
        mask_img, recon, pasted = reconstruct(model, imgs, mask_ratio)
        path = Path(make_out_dir(cfg.out_dir)) / "mae_reconstructions.png"
        plot_reconstructions(imgs, mask_img, recon, pasted, train_cfg.dataset, mask_ratio, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
