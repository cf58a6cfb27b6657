"""Use a trained CLIP checkpoint: zero-shot classification, text -> image search, caption ranking.

    python clip/sample.py                                # the shipped model, held-out prompts:
                                                         # zero-shot accuracy, confusion matrix
    python clip/sample.py --search "a handwritten four"  # top-k test images: clip_search.png
    python clip/sample.py --image-index 0                # rank captions for test image 0
    python clip/sample.py --checkpoint runs/clip/ckpt.pt # your own run instead

Without --checkpoint the model shipped in pretrained/clip_mnist.pt is used (its sha256 checked
against pretrained/manifest.json). Pictures go to --out-dir only.
"""
import os
import sys
from dataclasses import dataclass
from typing import Literal

import matplotlib
import torch

from model import CharTokenizer, class_text_embeddings, encode_images, zero_shot_predict
from plumbing import load_checkpoint, make_out_dir, parse_config, pick_device, require
from train import (
    CLASS_NAMES,
    PARTS,
    TEMPLATES,
    build_model,
    evaluate,
    fill,
    load_split,
    templates,
    to_input,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

SHIPPED = "clip_mnist.pt"  # pretrained/clip_mnist.pt, listed in pretrained/manifest.json


@dataclass
class Config:
    """Zero-shot classification, text search and caption ranking with a trained CLIP."""
    checkpoint: str = ""  # a train.py checkpoint ("": the shipped pretrained/clip_mnist.pt)
    # one of three modes
    zero_shot: bool = False  # classify the test split with prompt ensembles (the default mode)
    search: str | None = None  # retrieve the top-k test images for this text query
    image_index: int | None = None  # rank candidate captions for this test image
    # their options
    templates: Literal["heldout", "train", "all"] = "heldout"  # --zero-shot prompts; heldout: new
    k: int = 16  # --search: how many images to retrieve
    captions: tuple[str, ...] | None = None  # --image-index: the captions (default: held-out ones)
    out_dir: str = "runs/clip"  # clip_confusion.png, clip_search.png (--out-dir images: README's)
    data_dir: str = os.environ.get("DATA_DIR", "data")  # where datasets live ($DATA_DIR or ./data)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: cuda, then mps, then cpu

    def __post_init__(self):
        modes = [self.zero_shot, self.search is not None, self.image_index is not None]
        require(sum(modes) <= 1, "give one of --zero-shot, --search TEXT, --image-index I")
        self.zero_shot = self.zero_shot or not any(modes)
        require(self.k >= 1, "--k must be >= 1")
        require(self.captions != (), "--captions needs at least one caption")


def tokenize_or_exit(tokenizer, texts):
    try:
        return tokenizer(texts)
    except ValueError as e:
        sys.exit(f"error: {e}")


def print_single_template_accuracy(model, tokenizer, images, labels, dataset, split, device):
    """Zero-shot accuracy with one template and one name per class, to compare with the ensemble."""
    features = encode_images(model, to_input(images), device)
    for i, part in enumerate(PARTS[dataset]):
        mask = (labels >= 10 * i) & (labels < 10 * (i + 1))
        part_features, part_labels = features[mask.to(device)], (labels[mask] - 10 * i).to(device)
        for template in templates(part, split):
            accuracies = []
            for j in range(max(len(names) for names in CLASS_NAMES[part])):  # 1st name, 2nd, ...
                captions = [[fill(template, names[min(j, len(names) - 1)])]
                            for names in CLASS_NAMES[part]]
                weights = class_text_embeddings(model, tokenizer, captions, device)
                pred = zero_shot_predict(part_features, weights)
                accuracies.append(f"{(pred == part_labels).float().mean().item():.4f}")
            print(f"  {part}: {template!r} alone, name 1, 2, ...: {' '.join(accuracies)}")


def plot_confusion(predictions, path, split):
    fig, axes = plt.subplots(1, len(predictions), figsize=(5 * len(predictions), 4.6),
                             squeeze=False)
    for ax, (part, (pred, labels)) in zip(axes[0], predictions.items()):
        matrix = torch.zeros(10, 10, dtype=torch.long)
        matrix.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)  # rows: truth
        rates = matrix / matrix.sum(1, keepdim=True).clamp(min=1)
        ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
        for i in range(10):
            for j in range(10):
                if matrix[i, j]:
                    ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if i == j else "black")
        names = [n[0] for n in CLASS_NAMES[part]]
        ax.set_xticks(range(10), names, rotation=60, fontsize=7)
        ax.set_yticks(range(10), names, fontsize=7)
        ax.set_xlabel("zero-shot prediction")
        ax.set_ylabel("true class")
        prompts = {"heldout": "held-out", "train": "training", "all": "all"}[split]
        ax.set_title(f"{part}: {(pred == labels).float().mean().item():.2%} ({prompts} prompts)",
                     fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_search(query, images, scores, labels, class_names, path):
    cols = min(8, len(images))
    rows = (len(images) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.5 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, score, label in zip(axes.flat, images, scores, labels):
        ax.imshow(image[0].numpy(), cmap="gray")  # (1, 28, 28) -> (28, 28)
        ax.set_title(f"{class_names[label]} {score:.2f}", fontsize=7)
    fig.suptitle(f"query: {query!r}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def main(argv=None):
    cfg = parse_config(Config, argv)
    ckpt = load_checkpoint(cfg.checkpoint, "clip", keys=["config", "model", "vocab"],
                           shipped=SHIPPED)
    config = ckpt["config"]
    tokenizer = CharTokenizer(config["context_length"], ckpt["vocab"])
    # Check the user's text before any work is done.
    if cfg.search is not None:
        query_tokens = tokenize_or_exit(tokenizer, [cfg.search])
    if cfg.captions is not None:
        caption_tokens = tokenize_or_exit(tokenizer, list(cfg.captions))

    device = pick_device(cfg.device)
    model = build_model(config, tokenizer.vocab_size).to(device)
    model.load_state_dict(ckpt["model"])
    model.eval()
    dataset = config["dataset"]
    images, labels = load_split(dataset, cfg.data_dir, train=False)  # labels 0-9, 0-19 for 'both'
    class_names = [names[0] for part in PARTS[dataset] for names in CLASS_NAMES[part]]

    if cfg.zero_shot:
        metrics, predictions = evaluate(model, tokenizer, images, labels, dataset, device,
                                        split=cfg.templates)
        for part in PARTS[dataset]:
            print(f"{part}: zero-shot accuracy {metrics[f'{part}_zero_shot_acc']:.4f} with "
                  f"{cfg.templates} prompts ({len(templates(part, cfg.templates))} templates x "
                  f"names per class); text->image precision@10 "
                  f"{metrics[f'{part}_precision_at_10']:.4f}")
        print_single_template_accuracy(model, tokenizer, images, labels, dataset, cfg.templates,
                                       device)
        path = make_out_dir(cfg.out_dir) / "clip_confusion.png"
        plot_confusion(predictions, path, cfg.templates)
        print(f"confusion matrix: {path}")

    elif cfg.search is not None:
        features = encode_images(model, to_input(images), device)  # (N, D)
        query = model.encode_text(query_tokens.to(device)).float()  # (1, D)
        scores, top = (query @ features.t())[0].topk(min(cfg.k, len(images)))
        top = top.cpu()
        for rank, (i, s) in enumerate(zip(top.tolist(), scores.tolist())):
            print(f"{rank + 1:2d}. test image {i:5d}  {class_names[labels[i]]:>10}  "
                  f"similarity {s:.3f}")
        path = make_out_dir(cfg.out_dir) / "clip_search.png"
        plot_search(cfg.search, images[top], scores.tolist(), labels[top].tolist(), class_names,
                    path)
        print(f"grid: {path}")

    else:
        if not 0 <= cfg.image_index < len(images):
            sys.exit(f"error: --image-index {cfg.image_index} is outside the test split "
                     f"(0..{len(images) - 1})")
        if cfg.captions is None:
            captions = [fill(TEMPLATES[part]["heldout"][0], names[0]) for part in PARTS[dataset]
                        for names in CLASS_NAMES[part]]
            caption_tokens = tokenizer(captions)
        else:
            captions = list(cfg.captions)
        image = model.encode_image(to_input(images[cfg.image_index:cfg.image_index + 1]).to(device))
        text = model.encode_text(caption_tokens.to(device))
        probs = (model.scale() * image @ text.t()).softmax(dim=-1)[0]  # over captions (Figure 3)
        print(f"test image {cfg.image_index}: true class {class_names[labels[cfg.image_index]]}")
        for p, caption in sorted(zip(probs.tolist(), captions), reverse=True):
            print(f"  {p:6.2%}  {caption}")


if __name__ == "__main__":
    main()
