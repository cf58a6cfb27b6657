"""Use a trained ViT: classify test images, evaluate the whole test split, draw predictions and
the attention rollout. With no --checkpoint it uses the model shipped in pretrained/ (MNIST).
Pictures go to --out-dir (`--out-dir images` from the repo root regenerates the README's).

    python sample.py                      # classify 16 test images, write vit_predictions.png
    python sample.py --eval               # also the accuracy on the whole test split
    python sample.py --attention          # also the attention-rollout map, vit_attention.png
"""
import os
from dataclasses import dataclass
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model import ViT, attention_rollout  # noqa: E402
from plumbing import (  # noqa: E402
    config_from_checkpoint,
    load_checkpoint,
    load_image_dataset,
    make_out_dir,
    normalize,
    parse_config,
    pick_device,
    require,
)
from train import Config, evaluate, model_config  # noqa: E402


@dataclass
class SampleConfig:
    """Use a trained ViT: classify test images, evaluate the test split, draw attention rollout."""
    checkpoint: str = ""  # a checkpoint of train.py (best.pt, ckpt.pt); "": the shipped model
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: cuda, then mps, then cpu
    data_dir: str = os.environ.get("DATA_DIR", "data")  # where datasets live ($DATA_DIR, else data)
    out_dir: str = "runs/vit"  # the pictures vit_predictions.png and vit_attention.png go here
    num_images: int = 16  # classify the first N test images
    eval: bool = False  # also print the accuracy on the whole test split
    attention: bool = False  # also draw the attention rollout of the first 8 images

    def __post_init__(self):
        require(self.num_images >= 1, "--num-images must be at least 1")


SHIPPED = "vit_mnist.pt"  # pretrained/vit_mnist.pt: the MNIST model of the README's results


def load_model(checkpoint, device):
    """The ViT of a checkpoint (the shipped one when `checkpoint` is ""), rebuilt from the Config
    stored in it, in eval mode; with that Config and the class names."""
    ckpt = load_checkpoint(checkpoint, "vit", keys=["config", "model", "classes"], shipped=SHIPPED)
    cfg = config_from_checkpoint(Config, ckpt, checkpoint or SHIPPED)  # the run's config
    model = ViT(**model_config(cfg)).to(device)
    model.load_state_dict(ckpt["model"])  # bfloat16 weights (the shipped file) become float32
    return model.eval(), cfg, ckpt["classes"]


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
    fig.savefig(f"{path}.tmp.png", dpi=80)
    os.replace(f"{path}.tmp.png", path)  # atomic: never half a picture
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None):
    args = parse_config(SampleConfig, argv)
    device = pick_device(args.device)
    model, cfg, classes = load_model(args.checkpoint, device)
    out_dir = make_out_dir(args.out_dir)
    images, labels, _ = load_image_dataset(cfg.dataset, args.data_dir, train=False)

    first, first_labels = images[:args.num_images], labels[:args.num_images]
    with torch.no_grad():
        logits, attentions = model(normalize(first.to(device), cfg.dataset), return_attention=True)
    probabilities = logits.float().softmax(-1).cpu()
    for i, (p, y) in enumerate(zip(probabilities, first_labels)):
        print(f"test image {i}: predicted {classes[p.argmax()]} ({100 * p.max():.1f}%), "
              f"true {classes[y]}")
    plot_predictions(first, first_labels, probabilities, classes, cfg.dataset,
                     out_dir / "vit_predictions.png")
    if args.attention:
        rollout = attention_rollout([A[:8] for A in attentions]).cpu()
        plot_attention(first[:8], rollout, cfg.patch_size, cfg.dataset,
                       out_dir / "vit_attention.png")
    if args.eval:
        loss, accuracy = evaluate(model, images, labels, cfg.dataset, device)
        print(f"test accuracy {100 * accuracy:.2f}% ({len(images)} images), test loss {loss:.4f}")
        return accuracy


if __name__ == "__main__":
    main()
