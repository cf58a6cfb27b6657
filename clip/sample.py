"""Use a trained CLIP checkpoint: zero-shot classification, text -> image search, caption ranking.

    python sample.py --zero-shot                          # accuracy with held-out prompts + confusion matrix
    python sample.py --search "a handwritten four"       # top-k test images -> images/clip_search.png
    python sample.py --image-index 0                     # rank candidate captions for test image 0
"""
import argparse
import os
import sys
from pathlib import Path

import matplotlib
import torch

from model import CharTokenizer, class_text_embeddings, encode_images, zero_shot_predict
from train import (CLASS_NAMES, PARTS, TEMPLATES, build_model, evaluate, fill, load_checkpoint, load_split,
                   pick_device, to_input)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

IMAGES = Path(__file__).resolve().parent.parent / "images"


def get_parser():
    p = argparse.ArgumentParser(description="Zero-shot classification, text search and caption ranking with CLIP.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--zero-shot", action="store_true",
                      help="classify the test split with prompt ensembles; print accuracy, plot a confusion matrix")
    mode.add_argument("--search", metavar="TEXT", help="retrieve the top-k test images for this text query")
    mode.add_argument("--image-index", type=int, metavar="I", help="rank candidate captions for test image I")
    p.add_argument("--ckpt", default="runs/clip/ckpt.pt", help="checkpoint written by train.py")
    p.add_argument("--templates", default="heldout", choices=["heldout", "train", "all"],
                   help="--zero-shot: which templates make the prompt ensemble (heldout: never seen in training)")
    p.add_argument("--k", type=int, default=16, help="--search: how many images to retrieve")
    p.add_argument("--captions", nargs="+", metavar="TEXT",
                   help="--image-index: the candidate captions (default: one held-out caption per class)")
    p.add_argument("--confusion-out", default=str(IMAGES / "clip_confusion.png"), help="--zero-shot: plot path")
    p.add_argument("--out", default=str(IMAGES / "clip_search.png"), help="--search: path of the image grid")
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "data"),
                   help="folder holding MNIST/raw and FashionMNIST/raw (default: $DATA_DIR, else ./data)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to run")
    return p


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
        templates = TEMPLATES[part]["train"] + TEMPLATES[part]["heldout"] if split == "all" else TEMPLATES[part][split]
        for template in templates:
            accuracies = []
            for j in range(max(len(names) for names in CLASS_NAMES[part])):  # 1st name, 2nd name, ...
                captions = [[fill(template, names[min(j, len(names) - 1)])] for names in CLASS_NAMES[part]]
                pred = zero_shot_predict(part_features, class_text_embeddings(model, tokenizer, captions, device))
                accuracies.append(f"{(pred == part_labels).float().mean().item():.4f}")
            print(f"  {part}: {template!r} alone, name 1, 2, ...: {' '.join(accuracies)}")


def plot_confusion(predictions, path):
    fig, axes = plt.subplots(1, len(predictions), figsize=(5 * len(predictions), 4.6), squeeze=False)
    for ax, (part, (pred, labels)) in zip(axes[0], predictions.items()):
        matrix = torch.zeros(10, 10, dtype=torch.long)
        matrix.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)  # rows: truth
        ax.imshow((matrix / matrix.sum(1, keepdim=True).clamp(min=1)).numpy(), cmap="Blues", vmin=0, vmax=1)
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
        ax.set_title(f"{part}: {(pred == labels).float().mean().item():.2%} (held-out prompts)", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_search(query, images, scores, labels, class_names, path):
    cols = min(8, len(images))
    rows = (len(images) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.5 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, score, label in zip(axes.flat, images, scores, labels):
        ax.imshow(image.numpy(), cmap="gray")
        ax.set_title(f"{class_names[label]} {score:.2f}", fontsize=7)
    fig.suptitle(f"query: {query!r}", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error("--k must be >= 1")
    ckpt = load_checkpoint(args.ckpt)
    config = ckpt["config"]
    tokenizer = CharTokenizer(config["context_length"], ckpt["vocab"])
    # Check the user's text before any work is done.
    if args.search is not None:
        query_tokens = tokenize_or_exit(tokenizer, [args.search])
    if args.captions is not None:
        caption_tokens = tokenize_or_exit(tokenizer, args.captions)

    device = pick_device(args.device)
    model = build_model(config, tokenizer.vocab_size).to(device)
    model.load_state_dict(ckpt["model"])
    model.eval()
    dataset = config["dataset"]
    images, labels = load_split(dataset, args.data_dir, train=False)  # labels 0-9, or 0-19 for 'both'
    class_names = [names[0] for part in PARTS[dataset] for names in CLASS_NAMES[part]]

    if args.zero_shot:
        metrics, predictions = evaluate(model, tokenizer, images, labels, dataset, device, split=args.templates)
        for part in PARTS[dataset]:
            n_prompts = len(TEMPLATES[part][args.templates] if args.templates != "all" else
                            TEMPLATES[part]["train"] + TEMPLATES[part]["heldout"])
            print(f"{part}: zero-shot accuracy {metrics[f'{part}_zero_shot_acc']:.4f} with {args.templates} "
                  f"prompts ({n_prompts} templates x names per class); text->image precision@10 "
                  f"{metrics[f'{part}_precision_at_10']:.4f}")
        print_single_template_accuracy(model, tokenizer, images, labels, dataset, args.templates, device)
        plot_confusion(predictions, args.confusion_out)
        print(f"confusion matrix: {args.confusion_out}")

    elif args.search is not None:
        features = encode_images(model, to_input(images), device)  # (N, D)
        query = model.encode_text(query_tokens.to(device)).float()  # (1, D)
        scores, top = (query @ features.t())[0].topk(min(args.k, len(images)))
        top = top.cpu()
        for rank, (i, s) in enumerate(zip(top.tolist(), scores.tolist())):
            print(f"{rank + 1:2d}. test image {i:5d}  {class_names[labels[i]]:>10}  similarity {s:.3f}")
        plot_search(args.search, images[top], scores.tolist(), labels[top].tolist(), class_names, args.out)
        print(f"grid: {args.out}")

    else:
        if not 0 <= args.image_index < len(images):
            sys.exit(f"error: --image-index {args.image_index} is outside the test split (0..{len(images) - 1})")
        if args.captions is None:
            captions = [fill(TEMPLATES[part]["heldout"][0], names[0]) for part in PARTS[dataset]
                        for names in CLASS_NAMES[part]]
            caption_tokens = tokenizer(captions)
        else:
            captions = args.captions
        image = model.encode_image(to_input(images[args.image_index:args.image_index + 1]).to(device))
        text = model.encode_text(caption_tokens.to(device))
        probs = (model.scale() * image @ text.t()).softmax(dim=-1)[0]  # softmax over captions, as in Figure 3
        print(f"test image {args.image_index}: true class {class_names[labels[args.image_index]]}")
        for p, caption in sorted(zip(probs.tolist(), captions), reverse=True):
            print(f"  {p:6.2%}  {caption}")


if __name__ == "__main__":
    main()
