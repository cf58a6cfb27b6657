"""Train a GCN or a GAT, built from hand-written message passing (model.py), on one of two tasks:

  node classification   Cora / CiteSeer, the Planetoid split (20 labelled nodes per class, 500 val, 1000 test),
                        full-batch, with each paper's hyper-parameters and early stopping;
  graph classification  MNIST / FashionMNIST, each image a graph of 784 pixel nodes with 8-neighbour edges,
                        a minibatch being one block-diagonal graph.

    python train.py --task cora --model gcn --runs 10      # mean +- std of test accuracy over 10 seeds
    python train.py --task mnist --model gat --epochs 1
"""
import argparse
import csv
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gnns_data import CITATION, IMAGES, block_diagonal, grid_graph, load_images, load_planetoid, pixel_features
from model import GraphClassifier, NodeClassifier, prepare_edges


# The papers' hyper-parameters (node tasks) and ours (pixel graphs): defaults for every flag left unset.
DEFAULTS = {
    # Kipf & Welling Sec. 5.2: 2 layers, 16 hidden, dropout 0.5, L2 5e-4 (first layer), lr 0.01, 200 epochs,
    # stop when the validation loss has not improved for 10 epochs.
    ("citation", "gcn"): dict(lr=0.01, weight_decay=5e-4, hidden=16, dropout=0.5, attention_dropout=0.0,
                              epochs=200, patience=10),
    # Velickovic et al. Sec. 3.3: 8 heads x 8 features, ELU, 1 output head, dropout 0.6 on inputs and on
    # attention, L2 5e-4, lr 0.005, patience 100 on validation loss and accuracy.
    ("citation", "gat"): dict(lr=0.005, weight_decay=5e-4, hidden=8, heads=8, dropout=0.6, attention_dropout=0.6,
                              epochs=1000, patience=100),
    ("images", "gcn"): dict(lr=1e-3, weight_decay=0.0, hidden=64, layers=4, dropout=0.0, attention_dropout=0.0,
                            epochs=10),
    ("images", "gat"): dict(lr=1e-3, weight_decay=0.0, hidden=64, layers=4, heads=4, dropout=0.0,
                            attention_dropout=0.0, epochs=5),  # 98.1 % on MNIST (README)
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="cora", choices=[*CITATION, *IMAGES], help="dataset (node or graph classification)")
    p.add_argument("--model", default="gcn", choices=["gcn", "gat"], help="graph convolution or graph attention")
    p.add_argument("--epochs", type=int, help="max epochs (default: GCN 200, GAT 1000 with early stopping; images: GCN 10, GAT 5)")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"],
                   help="images: the learning rate decays to 0 along a cosine over --epochs, or stays constant")
    p.add_argument("--lr", type=float, help="Adam learning rate (default: GCN 0.01, GAT 0.005, images 0.001)")
    p.add_argument("--weight-decay", type=float, help="L2 penalty (default 5e-4 on citation graphs, 0 on images)")
    p.add_argument("--hidden", type=int, help="hidden features (GCN 16; GAT 8 per head; images 64 in total)")
    p.add_argument("--heads", type=int, help="GAT attention heads (default 8 on citation graphs, 4 on images)")
    p.add_argument("--out-heads", type=int, default=1, help="GAT heads of the output layer, averaged (paper: 1; 8 on PubMed)")
    p.add_argument("--layers", type=int, help="graph layers of the image classifier (default 4)")
    p.add_argument("--dropout", type=float, help="dropout on layer inputs (GCN 0.5, GAT 0.6, images 0)")
    p.add_argument("--attention-dropout", type=float, help="dropout on GAT attention coefficients (GAT 0.6, images 0)")
    p.add_argument("--patience", type=int, help="citation graphs: stop after this many epochs without a better "
                                                  "validation loss or accuracy (GCN 10, GAT 100)")
    p.add_argument("--runs", type=int, default=1, help="citation graphs: train this many seeds (seed, seed+1, ...) "
                                                       "and report mean +- std test accuracy")
    p.add_argument("--readout", default="mean", choices=["mean", "max"], help="graph readout for image graphs")
    p.add_argument("--batch-size", type=int, default=64, help="images per minibatch (one block-diagonal graph)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (images; 0: off)")
    p.add_argument("--max-minutes", type=float, default=0.0, help="images: stop training after this many minutes, "
                                                                  "evaluate and save (0: no limit)")
    p.add_argument("--test-images", type=int, default=0, help="images: evaluate on the first N test images only "
                                                              "(0: all; a CPU shortcut, say so when you report it)")
    p.add_argument("--log-every", type=int, default=50, help="images: log the training loss every N steps")
    p.add_argument("--batchnorm-images", type=int, default=5000, help="images: the classifier's BatchNorm statistics "
                                                                      "are recomputed on this many training images "
                                                                      "before each evaluation (precise BN)")
    p.add_argument("--seed", type=int, default=0, help="seeds Python, NumPy and torch")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run (auto: CUDA if present, else CPU; no MPS: the sparse CSR products are untested there)")
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "data"), help="datasets root (default $DATA_DIR or ./data)")
    p.add_argument("--out-dir", default="runs/gnns", help="where checkpoints and metrics.csv go")
    p.add_argument("--resume", help="continue from this checkpoint, exactly where it stopped")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default; 1 is fastest "
                                                           "on a machine shared with other jobs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (WANDB_MODE=offline works)")
    args = p.parse_args(argv)
    family = "citation" if args.task in CITATION else "images"
    for key, value in DEFAULTS[(family, args.model)].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.heads = args.heads or 1
    args.layers = args.layers or 2
    for name in ["epochs", "hidden", "heads", "out_heads", "layers", "runs", "batch_size", "log_every"]:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.batchnorm_images < 2:
        p.error("--batchnorm-images must be >= 2")
    if args.test_images < 0:
        p.error("--test-images must be >= 0 (0: all)")
    for name in ["dropout", "attention_dropout"]:
        if not 0 <= getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1)")
    if args.lr <= 0:
        p.error("--lr must be > 0")
    if family == "images" and args.model == "gat" and args.hidden % args.heads:
        p.error(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads}) for image graphs")
    if family == "images" and args.batch_size < 2:
        p.error("--batch-size must be >= 2 for image graphs (the classifier's BatchNorm needs 2 graphs)")
    if args.resume and args.runs > 1:
        p.error("--resume continues one run: use it with --runs 1")
    return args


# -----------------------------------------------------------------------------
# Checkpoints


def rng_state():
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state()}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    torch.set_rng_state(state["torch"])


def save_checkpoint(path, **state):
    torch.save({"folder": "gnns", **state}, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)


def load_checkpoint(path, map_location="cpu"):
    """The checkpoint dict, or a one-line exit for a missing, corrupt or foreign file."""
    if not os.path.isfile(path):
        sys.exit(f"error: checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        sys.exit(f"error: checkpoint {path} is truncated or corrupt ({type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("folder") != "gnns":
        sys.exit(f"error: checkpoint {path} was not written by gnns/ (folder={ckpt.get('folder') if isinstance(ckpt, dict) else None!r})")
    return ckpt


def resume(args, model, optimizer, device):
    """Load model, optimizer and RNG states from --resume; return the loop's saved state."""
    ckpt = load_checkpoint(args.resume, device)
    config = ckpt.get("config", {})
    if (config.get("task"), config.get("model"), config.get("hidden")) != (args.task, args.model, args.hidden):
        sys.exit(f"error: {args.resume} is a {config.get('model')} on {config.get('task')} with hidden "
                 f"{config.get('hidden')}; resume it with the same --task, --model and --hidden")
    load_weights(model, ckpt["model"], args.resume)
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    return ckpt["train_state"]


def build_model(model_args):
    """The network a checkpoint's "model_args" describes (sample.py rebuilds models with this too)."""
    kind = model_args["kind"]
    kwargs = {k: v for k, v in model_args.items() if k != "kind"}
    return NodeClassifier(**kwargs) if kind == "node" else GraphClassifier(**kwargs)


def load_weights(model, state_dict, path):
    """load_state_dict, or a one-line exit when the checkpoint was written by another version of model.py."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError:
        sys.exit(f"error: the weights in {path} do not fit this version of model.py (retrain, or use the code "
                 f"that wrote them)")


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model, args):
    """Adam with L2 as in each paper: GCN penalises the first layer's weights only (Kipf's code),
    GAT every weight but the biases (Velickovic's code); our image classifier uses plain Adam."""
    named = dict(model.named_parameters())
    if args.task in CITATION and args.model == "gcn":
        decayed = {"conv1.weight"}
    else:
        decayed = {n for n in named if not n.endswith("bias")}
    groups = [{"params": [p for n, p in named.items() if n in decayed], "weight_decay": args.weight_decay},
              {"params": [p for n, p in named.items() if n not in decayed], "weight_decay": 0.0}]
    return torch.optim.Adam(groups, lr=args.lr)


class MetricsLog:
    """metrics.csv in the run folder (appended on resume), the history kept in checkpoints, and W&B."""

    FIELDS = ["epoch", "step", "train_loss", "val_loss", "val_acc", "test_acc", "seconds"]

    def __init__(self, out_dir, history, wandb_run, resume):
        self.path, self.history, self.wandb_run = Path(out_dir) / "metrics.csv", history, wandb_run
        if not resume and self.path.exists():
            self.path.unlink()  # a new run in an old folder starts a new file

    def log(self, **row):
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        self.history.append(row)
        if self.wandb_run is not None:
            self.wandb_run.log(row, step=row["step"])


# -----------------------------------------------------------------------------
# Node classification: full-batch training on one graph, early stopping on the validation split


def train_citation(args, data, device, out_dir, wandb_run):
    seed_everything(args.seed)
    model_args = dict(kind="node", model=args.model, in_features=data["x"].size(1), hidden=args.hidden,
                      num_classes=data["num_classes"], heads=args.heads, out_heads=args.out_heads,
                      dropout=args.dropout, attention_dropout=args.attention_dropout)
    model = build_model(model_args).to(device)
    optimizer = make_optimizer(model, args)
    state = dict(epoch=0, best_val_acc=0.0, best_val_loss=math.inf, bad_epochs=0,
                 best_model={k: v.clone() for k, v in model.state_dict().items()}, history=[])
    if args.resume:
        state = resume(args, model, optimizer, device)
    forward = torch.compile(model) if args.compile else model
    x, y, edge_index = data["x"].to(device), data["y"].to(device), data["edge_index"].to(device)
    train, val, test = (data[k].to(device) for k in ["train", "val", "test"])
    log = MetricsLog(out_dir, state["history"], wandb_run, args.resume)
    start = time.time()
    epochs = tqdm(range(state["epoch"], args.epochs), desc=f"{args.task} {args.model} seed {args.seed}",
                  leave=False, disable=args.runs > 1)
    for epoch in epochs:
        model.train()
        loss = F.cross_entropy(forward(x, edge_index)[train], y[train])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        model.eval()
        with torch.no_grad():
            logits = forward(x, edge_index)
        val_loss = F.cross_entropy(logits[val], y[val]).item()
        val_acc = (logits[val].argmax(1) == y[val]).float().mean().item()
        log.log(epoch=epoch + 1, step=epoch + 1, train_loss=loss.item(), val_loss=val_loss, val_acc=val_acc,
                test_acc="", seconds=round(time.time() - start, 3))
        epochs.set_postfix(loss=f"{loss.item():.3f}", val_acc=f"{val_acc:.3f}")
        state["epoch"] = epoch + 1
        # Velickovic et al.'s rule: an epoch is progress if it matches the best validation accuracy or loss;
        # the weights kept for testing are those of an epoch that matched both.
        if val_acc >= state["best_val_acc"] or val_loss <= state["best_val_loss"]:
            if val_acc >= state["best_val_acc"] and val_loss <= state["best_val_loss"]:
                state["best_model"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            state["best_val_acc"] = max(val_acc, state["best_val_acc"])
            state["best_val_loss"] = min(val_loss, state["best_val_loss"])
            state["bad_epochs"] = 0
        else:
            state["bad_epochs"] += 1
            if state["bad_epochs"] >= args.patience:
                break

    final = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state["best_model"])
    model.eval()
    with torch.no_grad():
        test_acc = (model(x, edge_index)[test].argmax(1) == y[test]).float().mean().item()
    model.load_state_dict(final)  # the checkpoint resumes from the last epoch; "best_model" is what was tested
    log.log(epoch=state["epoch"], step=state["epoch"], train_loss="", val_loss="", val_acc=state["best_val_acc"],
            test_acc=test_acc, seconds=round(time.time() - start, 3))
    save_checkpoint(out_dir / "ckpt.pt", config=vars(args), model_args=model_args, model=model.state_dict(),
                    optimizer=optimizer.state_dict(), step=state["epoch"], rng=rng_state(), train_state=state,
                    test_acc=test_acc)
    return test_acc, state["epoch"]


# -----------------------------------------------------------------------------
# Graph classification: minibatches of pixel graphs


EVAL_BATCH_SIZE = 256  # pixel graphs per forward pass when evaluating


def image_logits(model, images, edge_index, device, batch_size=EVAL_BATCH_SIZE):
    """Yield the model's logits for (n, H, W) images, `batch_size` pixel graphs at a time."""
    nodes = images.shape[1] * images.shape[2]
    for i in range(0, len(images), batch_size):
        x = pixel_features(images[i:i + batch_size]).to(device)
        edges, batch = block_diagonal(edge_index, nodes, x.size(0))
        yield model(x.view(-1, 3), edges.to(device), batch.to(device), x.size(0))


@torch.no_grad()
def evaluate_images(model, images, labels, edge_index, device):
    """Accuracy of a GraphClassifier on (n, H, W) images; used by train.py and sample.py."""
    model.eval()
    predictions = torch.cat([logits.argmax(1).cpu() for logits in image_logits(model, images, edge_index, device)])
    return (predictions == labels).sum().item() / len(labels)


@torch.no_grad()
def precise_batchnorm(model, images, edge_index, device):
    """Set the classifier's BatchNorm statistics to their exact means over `images` under the current weights
    ("precise BN", Wu & Johnson 2021) instead of the running averages kept during training. A pixel graph's pooled
    vector is nearly the same in every image (its spread is about 2% of its size), so averages that lag a few hundred
    steps behind the weights are off by standard deviations: on the first 1,000 test images, an epoch-1 GCN scored
    18.7% with them, 87.3% with each test batch's own statistics and 88.5% after this (on 5,000 training images).
    Training never reads these statistics, so this changes no weight."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None                       # a cumulative average over the batches below
    model.train()
    if len(images) % EVAL_BATCH_SIZE == 1:
        images = images[:-1]                       # a last batch of one graph has no variance to measure
    for _ in image_logits(model, images, edge_index, device):
        pass
    for norm in norms:
        norm.momentum = 0.1


def cosine_lr(lr, step, total_steps):
    """The learning rate after `step` of `total_steps`: a cosine decay from lr to 0 (Loshchilov & Hutter 2017)."""
    return 0.5 * lr * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def train_images(args, device, out_dir, wandb_run):
    seed_everything(args.seed)
    train_x, train_y = load_images(args.data_dir, args.task, train=True)
    test_x, test_y = load_images(args.data_dir, args.task, train=False)
    if args.test_images:
        test_x, test_y = test_x[:args.test_images], test_y[:args.test_images]
    height, width = train_x.shape[1:]
    edge_index = prepare_edges(grid_graph(height, width), height * width)  # one image's graph, self-loops added
    model_args = dict(kind="graph", model=args.model, in_features=3, hidden=args.hidden, num_classes=10,
                      layers=args.layers, heads=args.heads, dropout=args.dropout,
                      attention_dropout=args.attention_dropout, readout=args.readout)
    model = build_model(model_args).to(device)
    optimizer = make_optimizer(model, args)
    state = dict(epoch=0, batch_in_epoch=0, step=0, history=[])
    if args.resume:
        state = resume(args, model, optimizer, device)
    forward = torch.compile(model) if args.compile else model
    full_edges, full_batch = block_diagonal(edge_index, height * width, args.batch_size)
    full_edges, full_batch = full_edges.to(device), full_batch.to(device)
    log = MetricsLog(out_dir, state["history"], wandb_run, args.resume)
    steps_per_epoch = max(1, len(train_x) // args.batch_size)  # the last incomplete batch is dropped
    start, out_of_time, test_acc = time.time(), False, None

    def save():
        save_checkpoint(out_dir / "ckpt.pt", config=vars(args), model_args=model_args, model=model.state_dict(),
                        optimizer=optimizer.state_dict(), step=state["step"], rng=rng_state(), train_state=state,
                        test_acc=test_acc)

    while state["epoch"] < args.epochs and not out_of_time:
        # the epoch's order depends on (seed, epoch) only, so a resumed run sees the same batches
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(args.seed * 10_000 + state["epoch"]))
        bar = tqdm(range(state["batch_in_epoch"], steps_per_epoch), desc=f"epoch {state['epoch'] + 1}", leave=False)
        for b in bar:
            index = order[b * args.batch_size:(b + 1) * args.batch_size]
            num_graphs = len(index)
            x = pixel_features(train_x[index]).view(-1, 3).to(device)           # (B*784, 3)
            y = train_y[index].to(device)
            edges = full_edges[:, :num_graphs * edge_index.size(1)]             # graphs 0..B-1 of the block diagonal
            model.train()
            loss = F.cross_entropy(forward(x, edges, full_batch[:x.size(0)], num_graphs), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            if args.schedule == "cosine":
                for group in optimizer.param_groups:
                    group["lr"] = cosine_lr(args.lr, state["step"], args.epochs * steps_per_epoch)
            optimizer.step()
            state["step"] += 1
            state["batch_in_epoch"] = b + 1
            if state["step"] % args.log_every == 0:
                log.log(epoch=state["epoch"] + 1, step=state["step"], train_loss=loss.item(), val_loss="", val_acc="",
                        test_acc="", seconds=round(time.time() - start, 3))
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if args.max_minutes and time.time() - start > 60 * args.max_minutes:
                out_of_time = True
                break
        if state["batch_in_epoch"] == steps_per_epoch:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
        precise_batchnorm(model, train_x[:args.batchnorm_images], edge_index, device)
        test_acc = evaluate_images(model, test_x, test_y, edge_index, device)
        log.log(epoch=state["epoch"], step=state["step"], train_loss="", val_loss="", val_acc="", test_acc=test_acc,
                seconds=round(time.time() - start, 3))
        print(f"epoch {state['epoch']} step {state['step']}: test accuracy {test_acc:.4f} "
              f"({time.time() - start:.0f} s)")
        save()
    return test_acc


def main(argv=None):
    args = get_args(argv)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out_dir = Path(args.out_dir)
    wandb_run = None
    if args.wandb:
        import wandb
        wandb_run = wandb.init(project="gnns", config=vars(args))

    if args.task in IMAGES:
        out_dir.mkdir(parents=True, exist_ok=True)
        train_images(args, device, out_dir, wandb_run)
    else:
        data = load_planetoid(args.data_dir, args.task)
        results, base_seed = [], args.seed
        for run in range(args.runs):
            args.seed = base_seed + run
            run_dir = out_dir if args.runs == 1 else out_dir / f"seed{args.seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            test_acc, epochs = train_citation(args, data, device, run_dir, wandb_run)
            results.append(test_acc)
            print(f"{args.task} {args.model} seed {args.seed}: test accuracy {test_acc:.4f} after {epochs} epochs")
        args.seed = base_seed
        accs = np.array(results) * 100
        print(f"{args.task} {args.model}: test accuracy {accs.mean():.1f} +- {accs.std():.1f} % over {args.runs} run(s)")
    if wandb_run is not None:
        wandb_run.finish()


if __name__ == "__main__":
    main()
