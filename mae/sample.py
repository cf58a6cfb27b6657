"""Everything done with a mae/ checkpoint: reconstructions, test accuracy, and the encoder's cost vs the mask ratio.

    python sample.py --checkpoint runs/mae/pretrain/ckpt.pt             # images/mae_reconstructions.png
    python sample.py --checkpoint runs/mae/linprobe/ckpt.pt --eval      # test accuracy of a probe or fine-tuned model
    python sample.py --checkpoint runs/mae/pretrain/ckpt.pt --benchmark # encoder FLOPs and time vs mask ratio
"""
import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from model import num_visible, patchify, unpatchify  # noqa: E402
from train import DATASETS, build_model, evaluate, load_checkpoint, load_dataset, normalize  # noqa: E402

IMAGES = Path(__file__).resolve().parent.parent / "images"


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=os.path.join("runs", "mae", "pretrain", "ckpt.pt"), help="a mae/ checkpoint")
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "data"), help="dataset root (default: $DATA_DIR or ./data)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, then mps, then cpu")
    p.add_argument("--seed", type=int, default=0, help="seed for the random masks")
    p.add_argument("--num-images", type=int, default=8, help="test images in the reconstruction figure")
    p.add_argument("--mask-ratio", type=float, default=None, help="mask ratio for the figure (default: the checkpoint's)")
    p.add_argument("--out", default=str(IMAGES / "mae_reconstructions.png"), help="where the figure goes")
    p.add_argument("--eval", action="store_true",
                   help="print test accuracy (linprobe/finetune) or masked-patch loss (pretrain) instead of a figure")
    p.add_argument("--test-examples", type=int, default=0, help="--eval on the first N test images (0: all)")
    p.add_argument("--benchmark", action="store_true", help="print the encoder's FLOPs and time per image vs mask ratio")
    p.add_argument("--mask-ratios", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 0.9],
                   help="--benchmark: the mask ratios to compare (0: the whole image, as in probing/fine-tuning)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    return p


@torch.no_grad()
def reconstruct(mae, imgs, mask_ratio):
    """-> masked input, reconstruction, reconstruction with the visible patches pasted back; all (B, C, H, W)."""
    p, C = mae.encoder.patch_size, mae.encoder.in_chans
    _, pred, mask = mae(imgs, mask_ratio)  # pred (B, N, p*p*C), mask (B, N), 1 = masked
    if mae.norm_pix_loss:  # the decoder predicts normalised patches: put each patch's mean and std back
        target = patchify(imgs, p)
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    recon = unpatchify(pred, p, C)
    mask_img = unpatchify(mask[:, :, None].expand(-1, -1, p * p * C), p, C)  # 1 on masked pixels
    return mask_img, recon, imgs * (1 - mask_img) + recon * mask_img


def to_pixels(x, dataset):
    """Standardised (B, C, H, W) -> numpy (B, H, W[, 3]) in [0, 1] for imshow."""
    spec = DATASETS[dataset]
    mean = torch.tensor(spec["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(spec["std"]).view(1, -1, 1, 1)
    x = (x.float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return x[..., 0] if x.shape[-1] == 1 else x


def plot_reconstructions(imgs, mask_img, recon, pasted, dataset, mask_ratio, path):
    original = to_pixels(imgs, dataset)
    m = mask_img[:, 0].cpu().numpy()  # (B, H, W), 1 on masked pixels
    m = m[..., None] if original.ndim == 4 else m
    masked = original * (1 - m) + 0.5 * m  # masked patches in grey
    rows = [("original", original), (f"masked {mask_ratio:.0%}", masked),
            ("reconstruction", to_pixels(recon, dataset)), ("+ visible", to_pixels(pasted, dataset))]
    n = len(imgs)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.2 * n, 1.3 * len(rows)), squeeze=False)
    for r, (title, images) in enumerate(rows):
        for c in range(n):
            axes[r][c].imshow(images[c], cmap="gray", vmin=0, vmax=1)
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
        axes[r][0].set_ylabel(title, fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def encoder_cost(encoder, imgs, mask_ratios, repeats=3):
    """For each mask ratio: (tokens the encoder sees, forward+backward GFLOPs per image, milliseconds per image)."""
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
        rows.append((ratio, tokens, counter.get_total_flops() / len(imgs) / 1e9, 1e3 * min(times) / len(imgs)))
    return rows


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.mask_ratio is not None and not 0 < args.mask_ratio < 1:
        parser.error(f"--mask-ratio must be in (0, 1), got {args.mask_ratio}")
    if any(not 0 <= r < 1 for r in args.mask_ratios):
        parser.error("--mask-ratios must be in [0, 1)")
    if args.num_images <= 0 or args.batch_size <= 0:
        parser.error("--num-images and --batch-size must be positive")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(args.device)
    ckpt = load_checkpoint(args.checkpoint, device)
    cfg, mode = ckpt["config"], ckpt["mode"]
    if not (args.eval or args.benchmark) and mode != "pretrain":
        sys.exit(f"error: reconstructions need a pretrain checkpoint, {args.checkpoint} is {mode} (try --eval)")
    model = build_model(cfg, mode).to(device)  # rebuilt from the checkpoint alone
    model.load_state_dict(ckpt["model"])
    model.eval()
    torch.manual_seed(args.seed)
    _, _, test_x, test_y = load_dataset(cfg["dataset"], args.data_dir)

    if args.benchmark:
        imgs = normalize(test_x[:args.batch_size].to(device), cfg["dataset"])
        print("| mask ratio | encoder tokens | encoder GFLOPs / image (fwd+bwd) | encoder ms / image (fwd+bwd) |")
        print("| --- | --- | --- | --- |")
        for ratio, tokens, gflops, ms in encoder_cost(model.encoder, imgs, args.mask_ratios):
            print(f"| {ratio:.2f} | {tokens} | {gflops:.4f} | {ms:.3f} |")
    elif args.eval:
        if args.test_examples:
            test_x, test_y = test_x[:args.test_examples], test_y[:args.test_examples]
        cfg = dict(cfg, mask_ratio=args.mask_ratio or cfg["mask_ratio"])
        result = evaluate(model, "pretrain" if mode == "pretrain" else "finetune", test_x, test_y, cfg, device,
                          args.batch_size, torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                          else contextlib.nullcontext())
        what = f"masked-patch loss at mask ratio {cfg['mask_ratio']}" if mode == "pretrain" else "accuracy %"
        print(f"{mode} checkpoint {args.checkpoint}: test {what} = {result:.4f} on {len(test_x)} {cfg['dataset']} images")
    else:
        ratio = args.mask_ratio or cfg["mask_ratio"]
        imgs = normalize(test_x[:args.num_images].to(device), cfg["dataset"])
        mask_img, recon, pasted = reconstruct(model, imgs, ratio)
        plot_reconstructions(imgs, mask_img, recon, pasted, cfg["dataset"], ratio, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
