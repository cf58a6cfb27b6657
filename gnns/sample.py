"""Use gnns/ checkpoints: evaluate them, draw a GAT's attention over a digit's pixel graph, compare training curves.

    python sample.py runs/gnns/ckpt.pt --eval
    python sample.py runs/mnist_gat/ckpt.pt --attention                      # images/gnns_attention.png
    python sample.py runs/cora_gcn/ckpt.pt runs/cora_gat/ckpt.pt --training  # images/gnns_training.png
"""
import argparse
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402

from gnns_data import CITATION, grid_graph, load_images, load_planetoid, pixel_features  # noqa: E402
from model import prepare_edges  # noqa: E402
from train import build_model, evaluate_images, load_checkpoint, load_weights, pick_device  # noqa: E402

IMAGES_DIR = Path(__file__).resolve().parent.parent / "images"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="checkpoint(s) written by train.py")
    p.add_argument("--eval", action="store_true", help="print each checkpoint's test accuracy")
    p.add_argument("--attention", action="store_true", help="draw a GAT image checkpoint's attention on one test digit")
    p.add_argument("--training", action="store_true", help="plot the checkpoints' training curves side by side")
    p.add_argument("--index", type=int, default=0, help="which test image to draw")
    p.add_argument("--layer", type=int, default=0, help="which GAT layer's attention to draw (0 = first)")
    p.add_argument("--head", type=int, default=0, help="which attention head to draw")
    p.add_argument("--limit", type=int, default=0, help="evaluate images on the first N test images only (0: all)")
    p.add_argument("--images-dir", default=str(IMAGES_DIR), help="where pictures go (default: images/ beside gnns/)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run (auto: CUDA if present, else CPU; no MPS: the sparse CSR products are untested there)")
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "data"), help="datasets root (default $DATA_DIR or ./data)")
    args = p.parse_args(argv)
    if not (args.eval or args.attention or args.training):
        p.error("nothing to do: pass --eval, --attention and/or --training")
    if args.index < 0 or args.head < 0 or args.layer < 0 or args.limit < 0:
        p.error("--index, --head, --layer and --limit must be >= 0")
    return args


def evaluate(ckpt, path, args, device):
    """Test accuracy of a checkpoint's model, from the checkpoint alone (plus the dataset)."""
    config = ckpt["config"]
    model = build_model(ckpt["model_args"]).to(device)
    if config["task"] in CITATION:
        data = load_planetoid(args.data_dir, config["task"])
        load_weights(model, ckpt["train_state"]["best_model"], path)  # the early-stopping weights that were tested
        model.eval()
        with torch.no_grad():
            logits = model(data["x"].to(device), data["edge_index"].to(device))
        test = data["test"].to(device)
        return (logits[test].argmax(1) == data["y"].to(device)[test]).float().mean().item()
    load_weights(model, ckpt["model"], path)
    images, labels = load_images(args.data_dir, config["task"], train=False)
    if args.limit:
        images, labels = images[:args.limit], labels[:args.limit]
    edge_index = prepare_edges(grid_graph(*images.shape[1:]), images.shape[1] * images.shape[2])
    return evaluate_images(model, images, labels, edge_index, device)


def draw_attention(ckpt, ckpt_path, args, path):
    """One test digit as its pixel graph; every edge j -> i coloured by alpha_ij of one head of one GAT layer."""
    model = build_model(ckpt["model_args"])
    load_weights(model, ckpt["model"], ckpt_path)
    model.eval()
    images, labels = load_images(args.data_dir, ckpt["config"]["task"], train=False)
    if args.index >= len(images):
        sys.exit(f"error: --index {args.index} is out of range: the test set has {len(images)} images")
    height, width = images.shape[1:]
    edge_index = prepare_edges(grid_graph(height, width), height * width)
    x = pixel_features(images[args.index:args.index + 1]).view(-1, 3)
    with torch.no_grad():
        h = model.embed(x)
        for conv, norm in list(zip(model.convs, model.norms))[:args.layer + 1]:
            out, attention = conv(norm(h), edge_index, return_attention=True)  # attention: (E, heads)
            h = h + torch.relu(out)
        logits = model(x, edge_index, torch.zeros(x.size(0), dtype=torch.long), 1)[0]  # the whole network's answer
    src, dst = edge_index
    keep = src != dst                                                           # self-loops have no line to draw
    xy = torch.stack([src % width, src // width], 1).float(), torch.stack([dst % width, dst // width], 1).float()
    # draw each edge from j towards i, stopping short of i so that the 8 incoming edges of a node stay apart
    segments = torch.stack([xy[0], xy[0] + 0.45 * (xy[1] - xy[0])], 1)[keep]
    weights = attention[keep, args.head]
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.2))
    axes[0].imshow(images[args.index].numpy(), cmap="gray_r")
    axes[0].set_title(f"test image {args.index}: label {int(labels[args.index])}, predicted {int(logits.argmax())}")
    axes[1].imshow(images[args.index].numpy(), cmap="gray_r", alpha=0.25)
    lines = LineCollection(segments.numpy(), array=weights.numpy(), cmap="viridis", linewidths=0.8)
    axes[1].add_collection(lines)
    fig.colorbar(lines, ax=axes[1], fraction=0.046, label="attention alpha_ij (9 incoming edges sum to 1)")
    axes[1].set_title(f"GAT layer {args.layer + 1}, head {args.head + 1}: edge j -> i")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def draw_training(ckpts, names, path):
    """Training loss and validation/test accuracy against the step, one line per checkpoint."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ckpt, name in zip(ckpts, names):
        rows = ckpt["train_state"]["history"]
        losses = [(r["step"], r["train_loss"]) for r in rows if r["train_loss"] != ""]
        if ckpt["config"]["task"] in CITATION:  # one row per epoch, then a final row with the test accuracy
            accuracy_key, accuracies = "val_acc", [(r["step"], r["val_acc"]) for r in rows if r["train_loss"] != ""]
        else:                                   # a test accuracy at the end of every epoch
            accuracy_key, accuracies = "test_acc", [(r["step"], r["test_acc"]) for r in rows if r["test_acc"] != ""]
        label = f"{ckpt['config']['task']} {ckpt['config']['model'].upper()} ({name})"
        axes[0].plot(*zip(*losses), label=label)
        if accuracies:
            axes[1].plot(*zip(*accuracies), marker="o" if accuracy_key == "test_acc" else None, label=label)
        axes[1].set_ylabel("validation accuracy" if accuracy_key == "val_acc" else "test accuracy")
    axes[0].set_ylabel("training loss")
    for ax in axes:
        ax.set_xlabel("step (= epoch on citation graphs)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    args = get_args(argv)
    device = pick_device(args.device)
    ckpts = [load_checkpoint(path, "cpu") for path in args.checkpoints]
    images_dir = Path(args.images_dir)
    if args.eval:
        for path, ckpt in zip(args.checkpoints, ckpts):
            print(f"{path}: {ckpt['config']['task']} {ckpt['config']['model']}: "
                  f"test accuracy {evaluate(ckpt, path, args, device):.4f}")
    if args.attention:
        ckpt = ckpts[0]
        if ckpt["model_args"]["kind"] != "graph" or ckpt["config"]["model"] != "gat":
            sys.exit(f"error: --attention needs a GAT checkpoint trained on images, {args.checkpoints[0]} is "
                     f"{ckpt['config']['model']} on {ckpt['config']['task']}")
        if args.layer >= ckpt["model_args"]["layers"] or args.head >= ckpt["model_args"]["heads"]:
            sys.exit(f"error: the model has {ckpt['model_args']['layers']} layers and {ckpt['model_args']['heads']} heads")
        images_dir.mkdir(parents=True, exist_ok=True)
        draw_attention(ckpt, args.checkpoints[0], args, images_dir / "gnns_attention.png")
        print(f"wrote {images_dir / 'gnns_attention.png'}")
    if args.training:
        images_dir.mkdir(parents=True, exist_ok=True)
        draw_training(ckpts, [Path(p).parent.name for p in args.checkpoints], images_dir / "gnns_training.png")
        print(f"wrote {images_dir / 'gnns_training.png'}")


if __name__ == "__main__":
    main()
