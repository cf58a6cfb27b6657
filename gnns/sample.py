"""Use gnns/ checkpoints: evaluate them, draw a GAT's attention over a digit's pixel graph, compare
training curves. Pictures go to --out-dir (`--out-dir images` regenerates the README's).

    python gnns/sample.py                     # the shipped Cora GCN and GAT: training curves
    python gnns/sample.py --eval              # their test accuracy (needs Cora in DATA_DIR)
    python gnns/sample.py --checkpoint runs/gnns/ckpt.pt --eval
    python gnns/sample.py --checkpoint runs/mnist_gat_cos5/ckpt.pt --attention  # one GAT head
    python gnns/sample.py --checkpoint runs/cora_gcn/ckpt.pt runs/cora_gat/ckpt.pt --training
"""
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402

from gnns_data import (  # noqa: E402
    CITATION,
    grid_graph,
    load_images,
    load_planetoid,
    pixel_features,
)
from model import prepare_edges  # noqa: E402
from plumbing import (  # noqa: E402
    PRETRAINED,
    config_from_checkpoint,
    load_checkpoint,
    make_out_dir,
    parse_config,
    pick_device,
)
from train import (  # noqa: E402
    Config,
    build_model,
    evaluate_images,
    load_weights,
    precise_batchnorm,
)


@dataclass
class SampleConfig:
    """Use gnns/ checkpoints: print their test accuracy, draw a GAT's attention on a digit's pixel
    graph, plot training curves side by side. With none of --eval, --attention and --training:
    --training."""
    checkpoint: tuple[str, ...] = ()  # checkpoint(s) written by train.py (none: the shipped two)
    eval: bool = False  # print each checkpoint's test accuracy
    attention: bool = False  # draw an image GAT's attention on one test digit (gnns_attention.png)
    training: bool = False  # plot the checkpoints' training curves (gnns_training.png)
    index: int = 0  # which test image to draw
    layer: int = 0  # which GAT layer's attention to draw (0: the first)
    head: int = 0  # which attention head to draw
    limit: int = 0  # evaluate images on the first N test images only (0: all)
    out_dir: str = "runs/gnns"  # where pictures go (images: the README's)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda, else cpu (no mps)
    data_dir: str = os.environ.get("DATA_DIR", "data")  # datasets root ($DATA_DIR, else ./data)

    def __post_init__(self):
        if not (self.eval or self.attention or self.training):
            self.training = True  # the one picture that needs no dataset


SHIPPED = ("cora_gcn.pt", "cora_gat.pt")  # pretrained/: Cora GCN and GAT, seed 0 (README)


def evaluate(ckpt, path, cfg, device):
    """Test accuracy of a checkpoint's model, from the checkpoint alone (plus the dataset)."""
    train_cfg = config_from_checkpoint(Config, ckpt, path)
    model = build_model(ckpt["model_args"]).to(device)
    if train_cfg.task in CITATION:
        data = load_planetoid(cfg.data_dir, train_cfg.task)
        # the weights early stopping selected on the validation nodes: those train.py tested
        load_weights(model, ckpt["train_state"]["best_model"], path)
        model.eval()
        with torch.no_grad():
            logits = model(data["x"].to(device), data["edge_index"].to(device))
        test = data["test"].to(device)
        return (logits[test].argmax(1) == data["y"].to(device)[test]).float().mean().item()
    load_weights(model, ckpt["model"], path)
    images, labels = load_images(cfg.data_dir, train_cfg.task, train=False)
    if cfg.limit:
        images, labels = images[:cfg.limit], labels[:cfg.limit]
    edge_index = prepare_edges(grid_graph(*images.shape[1:]), images.shape[1] * images.shape[2])
    train_images = load_images(cfg.data_dir, train_cfg.task, train=True)[0]
    if ckpt["step"] % max(1, len(train_images) // train_cfg.batch_size):  # stopped mid-epoch:
        # its BatchNorm statistics are the lagging running averages; set them as train.py does
        precise_batchnorm(model, train_images[:train_cfg.batchnorm_images], edge_index, device)
    return evaluate_images(model, images, labels, edge_index, device)


def draw_attention(ckpt, ckpt_path, cfg, path):
    """One test digit as its pixel graph; each edge j -> i coloured by alpha_ij of one GAT head."""
    model = build_model(ckpt["model_args"])
    load_weights(model, ckpt["model"], ckpt_path)
    model.eval()
    images, labels = load_images(cfg.data_dir, ckpt["config"]["task"], train=False)
    if cfg.index >= len(images):
        sys.exit(f"error: --index {cfg.index} is out of range: the test set has {len(images)} "
                 f"images")
    height, width = images.shape[1:]
    edge_index = prepare_edges(grid_graph(height, width), height * width)
    x = pixel_features(images[cfg.index:cfg.index + 1]).view(-1, 3)
    with torch.no_grad():
        h = model.embed(x)
        for conv, norm in list(zip(model.convs, model.norms))[:cfg.layer + 1]:
            out, attention = conv(norm(h), edge_index, return_attention=True)  # (E, heads)
            h = h + torch.relu(out)
        graph = torch.zeros(x.size(0), dtype=torch.long)
        logits = model(x, edge_index, graph, 1)[0]                   # the whole network's answer
    src, dst = edge_index
    keep = src != dst                                                # self-loops: no line to draw
    xy = (torch.stack([src % width, src // width], 1).float(),
          torch.stack([dst % width, dst // width], 1).float())
    # each edge from j towards i, stopping short of i so that a node's 8 incoming edges stay apart
    segments = torch.stack([xy[0], xy[0] + 0.45 * (xy[1] - xy[0])], 1)[keep]
    weights = attention[keep, cfg.head]
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.2))
    axes[0].imshow(images[cfg.index].numpy(), cmap="gray_r")
    axes[0].set_title(f"test image {cfg.index}: label {int(labels[cfg.index])}, "
                      f"predicted {int(logits.argmax())}")
    axes[1].imshow(images[cfg.index].numpy(), cmap="gray_r", alpha=0.25)
    lines = LineCollection(segments.numpy(), array=weights.numpy(), cmap="viridis", linewidths=0.8)
    axes[1].add_collection(lines)
    fig.colorbar(lines, ax=axes[1], fraction=0.046,
                 label="attention alpha_ij (9 incoming edges sum to 1)")
    axes[1].set_title(f"GAT layer {cfg.layer + 1}, head {cfg.head + 1}: edge j -> i")
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
        losses = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
        if ckpt["config"]["task"] in CITATION:  # a row per epoch, then one with the test accuracy
            key = "val_acc"
            accuracies = [(r["step"], r["val_acc"]) for r in rows if "train_loss" in r]
        else:                                   # a test accuracy at the end of every epoch
            key = "test_acc"
            accuracies = [(r["step"], r["test_acc"]) for r in rows if "test_acc" in r]
        label = f"{ckpt['config']['task']} {ckpt['config']['model'].upper()} ({name})"
        axes[0].plot(*zip(*losses), label=label)
        if accuracies:
            axes[1].plot(*zip(*accuracies), marker="o" if key == "test_acc" else None, label=label)
        axes[1].set_ylabel("validation accuracy" if key == "val_acc" else "test accuracy")
    axes[0].set_ylabel("training loss")
    for ax in axes:
        ax.set_xlabel("step (= epoch on citation graphs)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    cfg = parse_config(SampleConfig, argv)
    device = pick_device(cfg.device, mps=False)  # auto: CUDA, else CPU (CSR untested on MPS)
    keys = ["config", "model_args", "model", "step", "train_state"]
    if not cfg.checkpoint:  # the shipped models, each checked against pretrained/manifest.json
        cfg.checkpoint = tuple(str(PRETRAINED / name) for name in SHIPPED)
        ckpts = [load_checkpoint("", "gnns", keys=keys, shipped=name) for name in SHIPPED]
    else:
        ckpts = [load_checkpoint(path, "gnns", keys=keys) for path in cfg.checkpoint]
    if cfg.eval:
        for path, ckpt in zip(cfg.checkpoint, ckpts):
            print(f"{path}: {ckpt['config']['task']} {ckpt['config']['model']}: "
                  f"test accuracy {evaluate(ckpt, path, cfg, device):.4f}")
    if cfg.attention:
        ckpt, config, model_args = ckpts[0], ckpts[0]["config"], ckpts[0]["model_args"]
        if model_args["kind"] != "graph" or config["model"] != "gat":
            sys.exit(f"error: --attention needs a GAT checkpoint trained on images, "
                     f"{cfg.checkpoint[0]} is {config['model']} on {config['task']}")
        if cfg.layer >= model_args["layers"] or cfg.head >= model_args["heads"]:
            sys.exit(f"error: the model has {model_args['layers']} layers and "
                     f"{model_args['heads']} heads")
        path = make_out_dir(cfg.out_dir) / "gnns_attention.png"
        draw_attention(ckpt, cfg.checkpoint[0], cfg, path)
        print(f"wrote {path}")
    if cfg.training:
        path = make_out_dir(cfg.out_dir) / "gnns_training.png"
        draw_training(ckpts, [Path(p).parent.name for p in cfg.checkpoint], path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
