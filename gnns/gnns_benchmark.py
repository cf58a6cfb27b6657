"""Time one training step (forward, backward, Adam) of the pixel-graph classifier on real MNIST batches:
our sparse message passing (model.py, O(E)) against the dense adjacency-masked reference (O(N^2) per graph),
and against torch_geometric's GCNConv / GATConv in the same network when torch_geometric is importable
(it is not a dependency of this folder: install it yourself to include it). `free` times the same network with
the neighbourhood sum replaced by the identity: the floor that no implementation of the aggregation can beat,
since the embedding, W h, LayerNorm, readout and optimiser step remain.

    python gnns_benchmark.py --batch-size 64 --batches 3
"""
import argparse
import os
import time
from contextlib import nullcontext
from unittest import mock

import torch
import torch.nn.functional as F

from gnns_data import block_diagonal, grid_graph, load_images, pixel_features
import model
from model import dense_adjacency, prepare_edges
from train import build_model


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gcn", "gat"], choices=["gcn", "gat"], help="layers to time")
    p.add_argument("--impls", nargs="+", default=["sparse", "dense", "pyg", "free"],
                   choices=["sparse", "dense", "pyg", "free"],
                   help="implementations to time (pyg is skipped when torch_geometric is not installed; "
                        "free: the aggregation replaced by the identity)")
    p.add_argument("--batch-size", type=int, default=64, help="graphs (images) per step")
    p.add_argument("--batches", type=int, default=3, help="timed steps per implementation (after one warm-up step)")
    p.add_argument("--hidden", type=int, default=64, help="hidden features, as train.py's image default")
    p.add_argument("--layers", type=int, default=4, help="graph layers, as train.py's image default")
    p.add_argument("--heads", type=int, default=4, help="GAT heads, as train.py's image default")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to time (the issue's target is CPU)")
    p.add_argument("--task", default="mnist", choices=["mnist", "fashion-mnist"], help="which images")
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "data"), help="datasets root (default $DATA_DIR or ./data)")
    p.add_argument("--seed", type=int, default=0, help="seeds torch")
    args = p.parse_args(argv)
    if min(args.batch_size, args.batches, args.hidden, args.layers, args.heads) < 1:
        p.error("--batch-size, --batches, --hidden, --layers and --heads must be >= 1")
    return args


def swap_in_torch_geometric(net, kind, hidden, heads):
    """The same network with torch_geometric's layers in place of ours (same shapes, same residual stack)."""
    from torch_geometric.nn import GATConv, GCNConv

    for i in range(len(net.convs)):
        net.convs[i] = GCNConv(hidden, hidden) if kind == "gcn" else GATConv(hidden, hidden // heads, heads)
    return net


class FreeAggregation:
    """Stands in for model.NeighbourhoodSum under --impls free: out_i = h_i, as if message passing cost nothing."""

    @staticmethod
    def apply(weight, h, edge_index):
        return h.clone()


def synchronize(device):
    """Wait for the GPU's queued kernels, so that wall-clock time measures them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images, labels = load_images(args.data_dir, args.task, train=True)
    height, width = images.shape[1:]
    nodes = height * width
    edge_index = prepare_edges(grid_graph(height, width), nodes)
    edges, batch = block_diagonal(edge_index, nodes, args.batch_size)
    device = torch.device(args.device)
    edges, batch = edges.to(device), batch.to(device)
    adj = dense_adjacency(edge_index, nodes).to(device).expand(args.batch_size, nodes, nodes)
    steps_per_epoch = -(-len(images) // args.batch_size)
    print(f"{args.task}: {args.batch_size} graphs of {nodes} nodes per step, {edges.size(1)} edges (self-loops "
          f"included), {steps_per_epoch} steps per epoch; torch threads {torch.get_num_threads()}, device {device}")
    results = {}
    for kind in args.models:
        for impl in args.impls:
            net = build_model(dict(kind="graph", model=kind, in_features=3, hidden=args.hidden, num_classes=10,
                                   layers=args.layers, heads=args.heads)).to(device)
            if impl == "pyg":
                try:
                    net = swap_in_torch_geometric(net, kind, args.hidden, args.heads).to(device)
                except ImportError:
                    print(f"{kind} pyg: skipped, torch_geometric is not installed")
                    continue
            optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
            seconds = []
            free = mock.patch.object(model, "NeighbourhoodSum", FreeAggregation) if impl == "free" else nullcontext()
            with free:
                for step in range(args.batches + 1):
                    index = torch.arange(step * args.batch_size, (step + 1) * args.batch_size) % len(images)
                    x, y = pixel_features(images[index]).to(device), labels[index].to(device)
                    synchronize(device)
                    start = time.perf_counter()
                    if impl == "dense":
                        logits = net.forward_dense(x, adj)
                    else:
                        logits = net(x.view(-1, 3), edges, batch, len(index))
                    loss = F.cross_entropy(logits, y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    synchronize(device)
                    if step > 0:  # the first step is a warm-up (allocator, lazy initialisation)
                        seconds.append(time.perf_counter() - start)
            per_step = sum(seconds) / len(seconds)
            results[kind, impl] = per_step
            print(f"{kind} {impl:6s}: {per_step * 1000:9.1f} ms/step (min {min(seconds) * 1000:.1f}), "
                  f"one epoch ~ {per_step * steps_per_epoch / 60:.1f} min (extrapolated from {len(seconds)} steps)")
        for impl in ["dense", "pyg"]:
            if (kind, impl) in results and (kind, "sparse") in results:
                print(f"{kind}: {impl} / sparse time per step = {results[kind, impl] / results[kind, 'sparse']:.1f}x")
        if (kind, "dense") in results and (kind, "free") in results:
            print(f"{kind}: dense / free = {results[kind, 'dense'] / results[kind, 'free']:.1f}x, the most that any "
                  f"implementation of the aggregation could gain over the dense reference in this network")


if __name__ == "__main__":
    main()
