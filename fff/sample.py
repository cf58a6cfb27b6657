"""Use a trained FFF: test accuracy (soft vs hard), where the samples go in the tree, and inference speed.

    python fff/sample.py --eval                        # soft and hard test accuracy of runs/fff/ckpt.pt
    python fff/sample.py --leaves                      # images/fff_leaves.png: test samples per leaf and class
    python fff/sample.py --benchmark                   # FFF hard inference vs the two dense baselines (no checkpoint)
    python fff/sample.py --benchmark --node-width 1 --compile   # single-neuron nodes, every network compiled
"""
import argparse
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from model import FF, FFF
from train import build_model, evaluate, get_device, load_checkpoint, load_split

IMAGES = Path(__file__).resolve().parent.parent / "images"


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/fff/ckpt.pt", help="checkpoint written by train.py")
    p.add_argument("--eval", action="store_true", help="print soft and hard test accuracy")
    p.add_argument("--leaves", action="store_true", help="plot how test samples spread over the leaves")
    p.add_argument("--plot", default=str(IMAGES / "fff_leaves.png"), help="where --leaves writes its picture")
    p.add_argument("--benchmark", action="store_true", help="time hard inference against the dense baselines")
    p.add_argument("--depths", type=int, nargs="+", default=[3, 6, 9], help="tree depths for --benchmark")
    p.add_argument("--leaf-width", type=int, default=32, help="leaf width for --benchmark")
    p.add_argument("--node-width", type=int, default=32, help="node width for --benchmark")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256], help="batch sizes for --benchmark")
    p.add_argument("--compile", action="store_true",
                   help="--benchmark compiles every network with torch.compile (fuses the FFF's gathers and small ops)")
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "data"), help="dataset root (default $DATA_DIR or ./data)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to evaluate")
    p.add_argument("--seed", type=int, default=0, help="seed for the benchmark's random weights and inputs")
    return p


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
def benchmark(args):
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    input_width, output_width = 28 * 28, 10
    print(f"hard inference, input {input_width}, leaf width {args.leaf_width}, node width {args.node_width}, "
          f"{'compiled' if args.compile else 'eager'}, {torch.get_num_threads()} CPU threads; times in ms per batch")
    print(f"{'device':>6} {'depth':>5} {'batch':>5} {'FFF hard':>9} {'FF train-width':>15} {'FF leaf-width':>14} {'speed-up':>9}")
    for device in devices:
        for depth in args.depths:
            torch.manual_seed(args.seed)
            fff = FFF(input_width, output_width, depth, args.leaf_width, args.node_width).to(device).eval()
            wide = FF(input_width, output_width, 2**depth * args.leaf_width).to(device).eval()
            narrow = FF(input_width, output_width, args.leaf_width).to(device).eval()
            calls = [m.forward_hard for m in (fff, wide, narrow)]
            if args.compile:
                torch._dynamo.reset()  # fresh compile caches for each depth's three networks
                calls = [torch.compile(call, dynamic=False) for call in calls]
            for batch in args.batch_sizes:
                x = torch.randn(batch, input_width, device=device)
                t_fff, t_wide, t_narrow = (time_call(call, x) for call in calls)
                print(f"{device.type:>6} {depth:>5} {batch:>5} {1e3 * t_fff:>9.3f} {1e3 * t_wide:>15.3f} "
                      f"{1e3 * t_narrow:>14.3f} {t_wide / t_fff:>8.1f}x")


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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if not (args.eval or args.leaves or args.benchmark):
        parser.error("nothing to do: pass --eval, --leaves and/or --benchmark")
    if min(args.depths + args.batch_sizes + [args.leaf_width, args.node_width]) < 1:
        parser.error("--depths, --batch-sizes, --leaf-width and --node-width must be positive")
    if args.eval or args.leaves:
        device = get_device(args.device)
        checkpoint = load_checkpoint(args.checkpoint, device)
        config = checkpoint["config"]
        model = build_model(config).to(device)
        model.load_state_dict(checkpoint["model"])
        model.eval()
        x, y = load_split(config["dataset"], args.data_dir, train=False)
        x, y = x.to(device), y.to(device)
        if args.eval:
            soft, hard = evaluate(model, x, y)
            print(f"{config['dataset']} test accuracy: soft {100 * soft:.2f}%, hard {100 * hard:.2f}% "
                  f"({config['model']}, epoch {checkpoint['epoch']})")
        if args.leaves:
            if config["model"] != "fff":
                parser.error("--leaves needs an FFF checkpoint")
            plot_leaves(model, x, y, args.plot)
    if args.benchmark:
        benchmark(args)


if __name__ == "__main__":
    main()
