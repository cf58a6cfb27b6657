"""Use a trained FFF: test accuracy (soft vs hard), where samples go in the tree, inference speed.

    python fff/sample.py                             # the shipped model: soft and hard accuracy
    python fff/sample.py --leaves                    # runs/fff/fff_leaves.png: samples per leaf
    python fff/sample.py --leaves --out-dir images   # the README's picture, images/fff_leaves.png
    python fff/sample.py --eval --checkpoint runs/fff/ckpt.pt   # your own run instead
    python fff/sample.py --benchmark                 # FFF hard inference vs the two dense baselines
    python fff/sample.py --benchmark --node-width 1 --compile   # single-neuron nodes, compiled

Without --checkpoint, --eval and --leaves use the model shipped in pretrained/fff_mnist.pt (its
sha256 checked against pretrained/manifest.json). With no flag at all, --eval is meant.
"""
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after the backend is set)
import torch  # noqa: E402

from model import FF, FFF
from plumbing import (
    config_from_checkpoint,
    load_checkpoint,
    make_out_dir,
    parse_config,
    pick_device,
    require,
)
from train import Config as TrainConfig
from train import build_model, evaluate, load_split

SHIPPED = "fff_mnist.pt"  # pretrained/fff_mnist.pt, listed in pretrained/manifest.json


@dataclass
class Config:
    """Use a trained FFF: soft and hard test accuracy, samples per leaf, hard-inference speed."""
    checkpoint: str = ""  # a train.py checkpoint ("": the shipped pretrained/fff_mnist.pt)
    eval: bool = False  # print soft and hard test accuracy (the default when no mode is given)
    leaves: bool = False  # plot how test samples spread over the leaves (OUT_DIR/fff_leaves.png)
    benchmark: bool = False  # time hard inference against the dense baselines (needs no checkpoint)
    depths: tuple[int, ...] = (3, 6, 9)  # tree depths for --benchmark
    leaf_width: int = 32  # leaf width for --benchmark
    node_width: int = 32  # node width for --benchmark
    batch_sizes: tuple[int, ...] = (1, 256)  # batch sizes for --benchmark
    compile: bool = False  # --benchmark compiles every network (fuses the FFF's gathers, small ops)
    out_dir: str = "runs/fff"  # where --leaves writes fff_leaves.png (images: the README's picture)
    data_dir: str = os.environ.get("DATA_DIR", "data")  # datasets are here ($DATA_DIR, else ./data)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # where to evaluate
    seed: int = 0  # seed for the benchmark's random weights and inputs

    def __post_init__(self):
        self.eval = self.eval or not (self.leaves or self.benchmark)
        require(min(self.depths + self.batch_sizes + (self.leaf_width, self.node_width)) >= 1,
                "--depths, --batch-sizes, --leaf-width and --node-width must be positive")


def time_call(fn, x, min_seconds=0.3):
    """Seconds per call: warm up, then repeat the call until min_seconds have passed."""
    for _ in range(3):
        fn(x)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        fn(x)
        calls += 1
    sync()
    return (time.perf_counter() - start) / calls


@torch.inference_mode()
def benchmark(cfg):
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    input_width, output_width = 28 * 28, 10
    print(f"hard inference, input {input_width}, leaf width {cfg.leaf_width}, node width "
          f"{cfg.node_width}, {'compiled' if cfg.compile else 'eager'}, {torch.get_num_threads()} "
          f"CPU threads; times in ms per batch")
    print(f"{'device':>6} {'depth':>5} {'batch':>5} {'FFF hard':>9} {'FF train-width':>15} "
          f"{'FF leaf-width':>14} {'speed-up':>9}")
    for device in devices:
        for depth in cfg.depths:
            torch.manual_seed(cfg.seed)
            fff = FFF(input_width, output_width, depth, cfg.leaf_width, cfg.node_width)
            wide = FF(input_width, output_width, 2**depth * cfg.leaf_width)
            narrow = FF(input_width, output_width, cfg.leaf_width)
            calls = [m.to(device).eval().forward_hard for m in (fff, wide, narrow)]
            if cfg.compile:
                torch._dynamo.reset()  # fresh compile caches for each depth's three networks
                calls = [torch.compile(call, dynamic=False) for call in calls]
            for batch in cfg.batch_sizes:
                x = torch.randn(batch, input_width, device=device)
                t_fff, t_wide, t_narrow = (time_call(call, x) for call in calls)
                print(f"{device.type:>6} {depth:>5} {batch:>5} {1e3 * t_fff:>9.3f} "
                      f"{1e3 * t_wide:>15.3f} {1e3 * t_narrow:>14.3f} {t_wide / t_fff:>8.1f}x")


@torch.no_grad()
def plot_leaves(model, x, y, path):
    """A (leaves x classes) count matrix of where the hard path sends each test sample."""
    leaf = torch.cat([model.leaf_index(x[i : i + 1024]) for i in range(0, len(x), 1024)])
    counts = torch.zeros(model.num_leaves, 10, dtype=torch.long)
    counts.index_put_((leaf.cpu(), y.cpu()), torch.ones_like(leaf.cpu()), accumulate=True)
    fig, ax = plt.subplots(figsize=(6, 0.35 * model.num_leaves + 1.5))
    im = ax.imshow(counts.numpy(), cmap="viridis", aspect="auto")
    ax.set_xlabel("true class")
    ax.set_ylabel("leaf (hard path)")
    ax.set_xticks(range(10))
    ax.set_yticks(range(model.num_leaves))
    ax.set_title(f"Test samples per leaf of a depth-{model.depth} FFF")
    fig.colorbar(im, ax=ax, label="samples")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None):
    cfg = parse_config(Config, argv)
    if cfg.eval or cfg.leaves:
        device = pick_device(cfg.device)
        ckpt = load_checkpoint(cfg.checkpoint, "fff", keys=["config", "model", "step"],
                               shipped=SHIPPED)
        train_cfg = config_from_checkpoint(TrainConfig, ckpt, cfg.checkpoint)
        if cfg.leaves and train_cfg.model != "fff":
            sys.exit("error: --leaves needs an FFF checkpoint (this one is a dense baseline)")
        model = build_model(train_cfg).to(device)
        model.load_state_dict(ckpt["model"])
        model.eval()
        x, y = load_split(train_cfg.dataset, cfg.data_dir, train=False, device=device)
        if cfg.eval:
            soft, hard = evaluate(model, x, y)
            print(f"{train_cfg.dataset} test accuracy: soft {100 * soft:.2f}%, hard "
                  f"{100 * hard:.2f}% ({train_cfg.model}, step {ckpt['step']})")
        if cfg.leaves:
            plot_leaves(model, x, y, make_out_dir(cfg.out_dir) / "fff_leaves.png")
    if cfg.benchmark:
        benchmark(cfg)


if __name__ == "__main__":
    main()
