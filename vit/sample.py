"""Use a trained ViT: classify test images, evaluate the whole test split, draw predictions and attention.

    python sample.py                      # classify 16 test images, write images/vit_predictions.png
    python sample.py --eval               # also the accuracy on the whole test split
    python sample.py --attention          # also the attention-rollout map, images/vit_attention.png
"""
import argparse
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model import ViT, attention_rollout  # noqa: E402
from train import evaluate, get_device, load_checkpoint, load_split, normalize  # noqa: E402

IMAGES = Path(__file__).resolve().parent.parent / "images"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="runs/vit/best.pt", help="a checkpoint written by train.py")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto picks cuda, then mps, then cpu")
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "data"),
                   help="where the dataset lives (default $DATA_DIR, else ./data)")
    p.add_argument("-n", "--num-images", type=int, default=16, help="classify the first N test images")
    p.add_argument("--eval", action="store_true", help="print the accuracy on the whole test split")
    p.add_argument("--attention", action="store_true", help="also draw the attention rollout of 8 images")
    p.add_argument("--predictions-out", default=str(IMAGES / "vit_predictions.png"),
                   help="where the grid of predictions goes")
    p.add_argument("--attention-out", default=str(IMAGES / "vit_attention.png"),
                   help="where the attention-rollout picture goes")
    args = p.parse_args(argv)
    if args.num_images < 1:
        p.error("-n must be at least 1")
    return args


def show(ax, image, dataset):
    """A uint8 (C, H, W) image on a matplotlib axis."""
    if image.shape[0] == 1:
        ax.imshow(image[0].numpy(), cmap="gray_r")
    else:
        ax.imshow(image.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def short(name):
    """'7 - seven' (torchvision's MNIST class names) -> '7'; other names unchanged."""
    return name.split(" - ")[0]


def plot_predictions(images, labels, probabilities, classes, dataset, path):
    n = len(images)
    cols = min(8, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:n]):
        ax.axis("on")
        show(ax, images[i], dataset)
        predicted = probabilities[i].argmax().item()
        ok = predicted == labels[i].item()
        ax.set_title(f"{short(classes[predicted])} {100 * probabilities[i, predicted]:.0f}%"
                     + ("" if ok else f"\n(true: {short(classes[labels[i]])})"), fontsize=8,
                     color="black" if ok else "red")
    fig.suptitle("ViT predictions on test images (red: wrong)", fontsize=10)
    fig.tight_layout()
    save(fig, path)


def plot_attention(images, rollout, patch_size, dataset, path):
    """Each image, and above it the class token's rolled-out attention upsampled to pixels."""
    n = len(images)
    side = images.shape[-1] // patch_size
    maps = rollout.view(n, 1, side, side)
    maps = F.interpolate(maps, size=images.shape[-2:], mode="nearest")[:, 0]
    maps = maps / maps.flatten(1).max(dim=1).values.view(n, 1, 1)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4), squeeze=False)
    for i in range(n):
        show(axes[0, i], images[i], dataset)
        show(axes[1, i], images[i], dataset)
        axes[1, i].imshow(maps[i].numpy(), cmap="jet", alpha=0.5)
    axes[0, 0].set_ylabel("image", fontsize=8)
    axes[1, 0].set_ylabel("attention rollout", fontsize=8)
    fig.suptitle("Where the class token looks: attention rollout over all layers", fontsize=10)
    fig.tight_layout()
    save(fig, path)


def save(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path + ".tmp.png", dpi=80)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None):
    args = get_args(argv)
    device = get_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, device)
    model = ViT(**ckpt["model_config"]).to(device)
    model.load_state_dict(ckpt["model"])
    model.eval()
    dataset, classes = ckpt["config"]["dataset"], ckpt["classes"]
    images, labels, _ = load_split(dataset, args.data_dir, train=False)

    first, first_labels = images[:args.num_images], labels[:args.num_images]
    with torch.no_grad():
        logits, attentions = model(normalize(first.to(device), dataset), return_attention=True)
    probabilities = logits.float().softmax(-1).cpu()
    for i, (p, y) in enumerate(zip(probabilities, first_labels)):
        print(f"test image {i}: predicted {classes[p.argmax()]} ({100 * p.max():.1f}%), true {classes[y]}")
    plot_predictions(first, first_labels, probabilities, classes, dataset, args.predictions_out)
    if args.attention:
        rollout = attention_rollout([A[:8] for A in attentions]).cpu()
        plot_attention(first[:8], rollout, ckpt["model_config"]["patch_size"], dataset, args.attention_out)
    if args.eval:
        loss, accuracy = evaluate(model, images, labels, dataset, device)
        print(f"test accuracy {100 * accuracy:.2f}% ({len(images)} images), test loss {loss:.4f}")
        return accuracy


if __name__ == "__main__":
    main()
