"""Train a GCN or a GAT, built from hand-written message passing (model.py), on one of two tasks:

  node classification   Cora / CiteSeer, the Planetoid split (20 labelled nodes per class, 500
                        validation, 1000 test), full-batch, each paper's hyper-parameters, early
                        stopping on the validation nodes;
  graph classification  MNIST / FashionMNIST, each image a graph of 784 pixel nodes with 8-neighbour
                        edges, a minibatch being one block-diagonal graph.

    python gnns/train.py --task cora --model gcn --runs 10   # mean +- std test accuracy, 10 seeds
    python gnns/train.py --task mnist --model gat --epochs 1
"""
import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gnns_data import (
    CITATION,
    IMAGES,
    block_diagonal,
    grid_graph,
    load_images,
    load_planetoid,
    pixel_features,
)
from gnns_sparse import NeighbourhoodSum
from model import GraphClassifier, NodeClassifier, neighbourhood_sum, prepare_edges
from plumbing import (
    Clock,
    MetricsLog,
    config_dict,
    load_checkpoint,
    make_out_dir,
    parse_config,
    require,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    setup,
)


@dataclass
class Config:
    """Train a GCN (Kipf & Welling 2017) or a GAT (Velickovic et al. 2018): node classification on
    Cora or CiteSeer, graph classification on MNIST or FashionMNIST pixel graphs. A flag left at
    None takes the paper's value on the citation graphs and ours on images (DEFAULTS below)."""
    # data
    task: Literal["cora", "citeseer", "mnist", "fashion_mnist"] = "cora"  # node or graph task
    data_dir: str = os.environ.get("DATA_DIR", "data")  # datasets root ($DATA_DIR, else ./data)
    out_dir: str = "runs/gnns"  # ckpt.pt and metrics.csv (--runs N: one seedK/ folder per seed)
    test_images: int = 0  # images: evaluate on the first N test images only (0: all)
    # model
    model: Literal["gcn", "gat"] = "gcn"  # graph convolution or graph attention
    hidden: int | None = None  # hidden features (GCN 16; GAT 8 per head; images 64 in all)
    heads: int | None = None  # GAT attention heads (8 on citation graphs, 4 on images)
    out_heads: int = 1  # GAT heads of the output layer, averaged (paper: 1; 8 on PubMed)
    layers: int | None = None  # graph layers of the image classifier (4)
    readout: Literal["mean", "max"] = "mean"  # images: pooling of a graph's nodes
    dropout: float | None = None  # dropout on layer inputs (GCN 0.5, GAT 0.6, images 0)
    attention_dropout: float | None = None  # dropout on GAT's alpha_ij (GAT 0.6, images 0)
    aggregation: Literal["sparse", "index_add"] = "sparse"  # neighbour sums: CSR or index_add_
    # optimisation
    epochs: int | None = None  # max epochs (GCN 200, GAT 1000; images: GCN 10, GAT 5)
    lr: float | None = None  # Adam learning rate (GCN 0.01, GAT 0.005, images 0.001)
    weight_decay: float | None = None  # L2 penalty (5e-4 on citation graphs, 0 on images)
    schedule: Literal["cosine", "constant"] = "cosine"  # images: lr cosine-decays to 0
    batch_size: int = 64  # images: graphs per minibatch (one block-diagonal graph)
    grad_clip: float = 1.0  # images: clip the gradient norm to this (0: off)
    patience: int | None = None  # citation: early-stopping patience (GCN 10, GAT 100)
    runs: int = 1  # citation: train seeds seed, seed+1, ...; report mean +- std
    # evaluation and logging
    batchnorm_images: int = 5000  # images: training images that set BatchNorm's statistics
    log_every: int = 50  # images: log the training loss every N steps
    # run
    max_minutes: float = 0.0  # stop after this many minutes, evaluation included (0: off)
    resume: str | None = None  # continue from this checkpoint exactly where it stopped
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda, else cpu (no mps)
    threads: int = 0  # CPU threads for torch (0: torch's default)
    seed: int = 0  # seeds Python, NumPy and torch
    compile: bool = False  # torch.compile the model
    wandb: bool = False  # also log to Weights & Biases (WANDB_MODE=offline works)

    def __post_init__(self):
        family = "citation" if self.task in CITATION else "images"
        for name, value in {"heads": 1, "layers": 2, **DEFAULTS[family, self.model]}.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ["epochs", "hidden", "heads", "out_heads", "layers", "runs", "batch_size",
                     "log_every"]:
            require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1")
        require(self.batchnorm_images >= 2, "--batchnorm-images must be >= 2")
        require(self.dropout < 1 and self.attention_dropout < 1,
                "--dropout and --attention-dropout must be < 1")
        require(self.lr > 0, "--lr must be > 0")
        require(family == "citation" or self.model == "gcn" or self.hidden % self.heads == 0,
                f"--hidden ({self.hidden}) must be a multiple of --heads ({self.heads}) on images")
        require(family == "citation" or self.batch_size >= 2,
                "--batch-size must be >= 2 on images (the classifier's BatchNorm needs 2 graphs)")
        require(not (self.resume and self.runs > 1), "--resume continues one run: use --runs 1")


# The papers' hyper-parameters (node tasks) and ours (pixel graphs): the flags left at None.
DEFAULTS = {
    # Kipf & Welling Sec. 5.2: 2 layers, 16 hidden, dropout 0.5, L2 5e-4 (first layer), lr 0.01,
    # 200 epochs, stop when the validation loss has not improved for 10 epochs.
    ("citation", "gcn"): dict(lr=0.01, weight_decay=5e-4, hidden=16, dropout=0.5,
                              attention_dropout=0.0, epochs=200, patience=10),
    # Velickovic et al. Sec. 3.3: 8 heads x 8 features, ELU, 1 output head, dropout 0.6 on inputs
    # and on attention, L2 5e-4, lr 0.005, patience 100 on validation loss and accuracy.
    ("citation", "gat"): dict(lr=0.005, weight_decay=5e-4, hidden=8, heads=8, dropout=0.6,
                              attention_dropout=0.6, epochs=1000, patience=100),
    ("images", "gcn"): dict(lr=1e-3, weight_decay=0.0, hidden=64, layers=4, dropout=0.0,
                            attention_dropout=0.0, epochs=10),
    ("images", "gat"): dict(lr=1e-3, weight_decay=0.0, hidden=64, layers=4, heads=4, dropout=0.0,
                            attention_dropout=0.0, epochs=5),  # 98.1 % on MNIST (README)
}
COLUMNS = ["epoch", "step", "train_loss", "val_loss", "val_acc", "test_acc", "seconds"]
CHECKPOINT_KEYS = ["config", "model_args", "model", "optimizer", "step", "rng", "train_state",
                   "seconds"]


# -----------------------------------------------------------------------------
# Model, optimiser, checkpoints, metrics


def build_model(model_args, aggregation="sparse"):
    """The network a checkpoint's "model_args" describe (sample.py rebuilds models with this too),
    its neighbourhood sums done by gnns_sparse's CSR products or model.py's index_add_ (equal)."""
    aggregate = NeighbourhoodSum.apply if aggregation == "sparse" else neighbourhood_sum
    kwargs = {k: v for k, v in model_args.items() if k != "kind"}
    classifier = NodeClassifier if model_args["kind"] == "node" else GraphClassifier
    return classifier(**kwargs, aggregate=aggregate)


def make_optimizer(model, cfg):
    """Adam with L2 as in each paper: GCN penalises the first layer's weights only (Kipf's code),
    GAT every weight but the biases (Velickovic's code); our image classifier uses plain Adam."""
    named = dict(model.named_parameters())
    if cfg.task in CITATION and cfg.model == "gcn":
        decayed = {"conv1.weight"}
    else:
        decayed = {n for n in named if not n.endswith("bias")}
    groups = [{"params": [p for n, p in named.items() if n in decayed],
               "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in named.items() if n not in decayed], "weight_decay": 0.0}]
    return torch.optim.Adam(groups, lr=cfg.lr)


def load_weights(model, state_dict, path, optimizer=None, optimizer_state=None):
    """load_state_dict, or one line when the checkpoint was written by another model.py."""
    try:
        model.load_state_dict(state_dict)
        if optimizer is not None:
            optimizer.load_state_dict(optimizer_state)
    except (RuntimeError, ValueError, KeyError):
        sys.exit(f"error: the weights in {path} do not fit this version of model.py (retrain, or "
                 f"use the code that wrote them)")


def resume(ckpt, cfg, model, optimizer):
    """Model, optimiser and RNG states from the --resume checkpoint; returns the loop's state."""
    stored = ckpt["config"]
    if (stored.get("task"), stored.get("model"), stored.get("hidden")) != \
            (cfg.task, cfg.model, cfg.hidden):
        sys.exit(f"error: {cfg.resume} is a {stored.get('model')} on {stored.get('task')} with "
                 f"hidden {stored.get('hidden')}; resume it with the same --task, --model and "
                 f"--hidden")
    load_weights(model, ckpt["model"], cfg.resume, optimizer, ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    return ckpt["train_state"]


def save(path, cfg, model_args, model, optimizer, state, clock, test_acc):
    save_checkpoint(path, {"folder": "gnns", "config": config_dict(cfg), "model_args": model_args,
                           "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "step": state["step"], "rng": rng_state(), "train_state": state,
                           "seconds": clock.seconds, "test_acc": test_acc})


def open_log(out_dir, cfg):
    wandb_config = config_dict(cfg) if cfg.wandb else None
    return MetricsLog(out_dir, COLUMNS, resume=bool(cfg.resume), wandb_config=wandb_config,
                      project="gnns", run_name=f"{cfg.task}-{cfg.model}-seed{cfg.seed}")


def record(log, state, **row):
    """One row of metrics.csv (and W&B), also kept in the checkpoint for sample.py --training."""
    log.log(**row)
    state["history"].append(row)


# -----------------------------------------------------------------------------
# Node classification: full-batch training on one graph, early stopping on the validation nodes


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def evaluate_nodes(forward, x, y, edge_index, nodes):
    """(cross-entropy, accuracy) of the model's predictions on `nodes`."""
    forward.eval()
    logits = forward(x, edge_index)[nodes]
    loss = F.cross_entropy(logits, y[nodes]).item()
    return loss, (logits.argmax(1) == y[nodes]).float().mean().item()


def early_stopping(state, model, val_loss, val_acc, patience):
    """Velickovic et al.'s rule: an epoch is progress if it matches the best validation accuracy or
    loss; the weights kept for testing are those of an epoch that matched both. True: stop now."""
    if val_acc >= state["best_val_acc"] or val_loss <= state["best_val_loss"]:
        if val_acc >= state["best_val_acc"] and val_loss <= state["best_val_loss"]:
            state["best_model"] = weights(model)
        state["best_val_acc"] = max(val_acc, state["best_val_acc"])
        state["best_val_loss"] = min(val_loss, state["best_val_loss"])
        state["bad_epochs"] = 0
        return False
    state["bad_epochs"] += 1
    return state["bad_epochs"] >= patience


def train_citation(cfg, data, device, out_dir, clock, ckpt=None):
    """One seed: (test accuracy, epochs), or (None, epochs) when the clock or Ctrl-C stopped it."""
    seed_everything(cfg.seed)
    model_args = dict(kind="node", model=cfg.model, in_features=data["x"].size(1),
                      hidden=cfg.hidden, num_classes=data["num_classes"], heads=cfg.heads,
                      out_heads=cfg.out_heads, dropout=cfg.dropout,
                      attention_dropout=cfg.attention_dropout)
    model = build_model(model_args, cfg.aggregation).to(device)
    optimizer = make_optimizer(model, cfg)
    state = dict(step=0, best_val_acc=0.0, best_val_loss=math.inf, bad_epochs=0,
                 best_model=weights(model), history=[])
    if ckpt:
        state = resume(ckpt, cfg, model, optimizer)
    forward = torch.compile(model) if cfg.compile else model
    x, y, edge_index = data["x"].to(device), data["y"].to(device), data["edge_index"].to(device)
    train, val, test = (data[k].to(device) for k in ["train", "val", "test"])
    log, test_acc, stopped = open_log(out_dir, cfg), None, False
    epochs = tqdm(range(state["step"], cfg.epochs), desc=f"{cfg.task} {cfg.model} seed {cfg.seed}",
                  leave=False, disable=cfg.runs > 1)
    for epoch in epochs:  # one step per epoch: the whole graph is the batch
        model.train()
        loss = F.cross_entropy(forward(x, edge_index)[train], y[train])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state["step"] = epoch + 1
        val_loss, val_acc = evaluate_nodes(forward, x, y, edge_index, val)
        record(log, state, epoch=epoch + 1, step=epoch + 1, train_loss=loss.item(),
               val_loss=val_loss, val_acc=val_acc, seconds=clock.seconds)
        epochs.set_postfix(loss=f"{loss.item():.3f}", val_acc=f"{val_acc:.3f}")
        if early_stopping(state, model, val_loss, val_acc, cfg.patience):
            break
        if clock.done():
            stopped = True
            break
    if not stopped:  # finished: test the weights selected on the validation nodes, once
        final = weights(model)
        model.load_state_dict(state["best_model"])
        test_acc = evaluate_nodes(model, x, y, edge_index, test)[1]
        model.load_state_dict(final)  # the checkpoint resumes from the last epoch
        record(log, state, epoch=state["step"], step=state["step"], val_acc=state["best_val_acc"],
               test_acc=test_acc, seconds=clock.seconds)
    save(out_dir / "ckpt.pt", cfg, model_args, model, optimizer, state, clock, test_acc)
    log.close()
    return test_acc, state["step"]


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
    logits = image_logits(model, images, edge_index, device)
    predictions = torch.cat([batch_logits.argmax(1).cpu() for batch_logits in logits])
    return (predictions == labels).sum().item() / len(labels)


@torch.no_grad()
def precise_batchnorm(model, images, edge_index, device):
    """Set the classifier's BatchNorm statistics to their exact means over `images` under the
    current weights ("precise BN", Wu & Johnson 2021) instead of the running averages kept during
    training. A pixel graph's pooled vector is nearly the same in every image (its spread is about
    2% of its size), so averages that lag a few hundred steps behind the weights are off by
    standard deviations: on the first 1,000 test images, an epoch-1 GCN scored 18.7% with them,
    87.3% with each test batch's own statistics and 88.5% after this (on 5,000 training images).
    Training never reads these statistics, so this changes no weight."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None                   # a cumulative average over the batches below
    model.train()
    if len(images) % EVAL_BATCH_SIZE == 1:
        images = images[:-1]                   # a last batch of one graph has no variance
    for _ in image_logits(model, images, edge_index, device):
        pass
    for norm in norms:
        norm.momentum = 0.1


def cosine_lr(lr, step, total_steps):
    """The learning rate after `step` of `total_steps`: a cosine decay from lr to 0 (Loshchilov &
    Hutter 2017)."""
    return 0.5 * lr * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def epoch_order(cfg, epoch, n):
    """The order of the training images depends on (seed, epoch) only: a resumed run sees it too."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 10_000 + epoch))


def end_of_epoch(model, train_x, test_x, test_y, edge_index, cfg, device):
    """Precise BatchNorm statistics, then the test accuracy (reported, never used to select)."""
    precise_batchnorm(model, train_x[:cfg.batchnorm_images], edge_index, device)
    return evaluate_images(model, test_x, test_y, edge_index, device)


def train_images(cfg, device, clock, ckpt=None):
    """Minibatch training over --epochs; True when it ran to the end, False when it was stopped."""
    train_x, train_y = load_images(cfg.data_dir, cfg.task, train=True)
    test_x, test_y = load_images(cfg.data_dir, cfg.task, train=False)
    if cfg.test_images:
        test_x, test_y = test_x[:cfg.test_images], test_y[:cfg.test_images]
    out_dir = make_out_dir(cfg.out_dir)
    height, width = train_x.shape[1:]
    edge_index = prepare_edges(grid_graph(height, width), height * width)  # self-loops added
    model_args = dict(kind="graph", model=cfg.model, in_features=3, hidden=cfg.hidden,
                      num_classes=10, layers=cfg.layers, heads=cfg.heads, dropout=cfg.dropout,
                      attention_dropout=cfg.attention_dropout, readout=cfg.readout)
    model = build_model(model_args, cfg.aggregation).to(device)
    optimizer = make_optimizer(model, cfg)
    state, test_acc = dict(step=0, history=[]), None
    if ckpt:
        state, test_acc = resume(ckpt, cfg, model, optimizer), ckpt.get("test_acc")
    forward = torch.compile(model) if cfg.compile else model
    all_edges, all_batch = block_diagonal(edge_index, height * width, cfg.batch_size)
    all_edges, all_batch = all_edges.to(device), all_batch.to(device)
    log = open_log(out_dir, cfg)
    steps_per_epoch = max(1, len(train_x) // cfg.batch_size)  # the last incomplete batch is dropped
    total_steps = cfg.epochs * steps_per_epoch
    bar = tqdm(range(state["step"], total_steps), desc=f"{cfg.task} {cfg.model}", leave=False)
    order = None
    for step in bar:
        epoch, b = divmod(step, steps_per_epoch)
        order = epoch_order(cfg, epoch, len(train_x)) if b == 0 or order is None else order
        index = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        x = pixel_features(train_x[index]).view(-1, 3).to(device)         # (B*784, 3)
        y = train_y[index].to(device)
        edges = all_edges[:, :len(index) * edge_index.size(1)]            # graphs 0..B-1
        model.train()
        loss = F.cross_entropy(forward(x, edges, all_batch[:x.size(0)], len(index)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if cfg.schedule == "cosine":
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(cfg.lr, step, total_steps)
        optimizer.step()
        state["step"] = step + 1
        bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        if state["step"] % cfg.log_every == 0:
            record(log, state, epoch=epoch + 1, step=state["step"], train_loss=loss.item(),
                   seconds=clock.seconds)
        if state["step"] % steps_per_epoch == 0:
            test_acc = end_of_epoch(model, train_x, test_x, test_y, edge_index, cfg, device)
            record(log, state, epoch=epoch + 1, step=state["step"], test_acc=test_acc,
                   seconds=clock.seconds)
            print(f"epoch {epoch + 1} step {state['step']}: test accuracy {test_acc:.4f} "
                  f"({clock.seconds:.0f} s)")
            save(out_dir / "ckpt.pt", cfg, model_args, model, optimizer, state, clock, test_acc)
        if clock.done():
            break
    save(out_dir / "ckpt.pt", cfg, model_args, model, optimizer, state, clock, test_acc)
    log.close()
    return state["step"] == total_steps


def main(argv=None):
    cfg = parse_config(Config, argv)
    ddp, _, _, device = setup(cfg, mps=False)  # auto: CUDA, else CPU (CSR untested on MPS)
    if ddp:
        sys.exit("error: gnns/ trains in one process; run it without torchrun")
    ckpt = load_checkpoint(cfg.resume, "gnns", keys=CHECKPOINT_KEYS) if cfg.resume else None
    clock = Clock(cfg.max_minutes, seconds=ckpt["seconds"] if ckpt else 0.0)
    finished = True
    if cfg.task in IMAGES:
        finished = train_images(cfg, device, clock, ckpt)
    else:
        data = load_planetoid(cfg.data_dir, cfg.task)
        accuracies = []
        for seed in range(cfg.seed, cfg.seed + cfg.runs):
            run_dir = cfg.out_dir if cfg.runs == 1 else os.path.join(cfg.out_dir, f"seed{seed}")
            run_cfg = dataclasses.replace(cfg, seed=seed)
            test_acc, epochs = train_citation(run_cfg, data, device, make_out_dir(run_dir), clock,
                                              ckpt)
            if test_acc is None:
                finished = False
                break
            accuracies.append(100 * test_acc)
            print(f"{cfg.task} {cfg.model} seed {seed}: test accuracy {test_acc:.4f} after "
                  f"{epochs} epochs")
        if accuracies:
            print(f"{cfg.task} {cfg.model}: test accuracy {np.mean(accuracies):.1f} +- "
                  f"{np.std(accuracies):.1f} % over {len(accuracies)} run(s)")
    if not finished:
        print(f"stopped after {clock.seconds / 60:.1f} min (--max-minutes or Ctrl-C): the run's "
              f"ckpt.pt continues it exactly with --resume", file=sys.stderr)
    clock.close()


if __name__ == "__main__":
    main()
