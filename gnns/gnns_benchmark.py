"""Time one training step (forward, backward, Adam) of the pixel-graph classifier on real MNIST
batches: the CSR neighbourhood sums of gnns_sparse.py (`sparse`, what train.py uses), the plain
index_add_ message passing of model.py (`index_add`), the dense adjacency-masked reference (`dense`,
O(N^2) per graph), and torch_geometric's GCNConv / GATConv in the same network (`pyg`, when
torch_geometric is importable; it is not a dependency of this folder). `free` times the same network
with the neighbourhood sum replaced by the identity: the floor that no implementation of the
aggregation can beat, since the embedding, W h, LayerNorm, readout and optimiser step remain.

    python gnns/gnns_benchmark.py --batch-size 64 --batches 3
"""
import os
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from gnns_data import block_diagonal, grid_graph, load_images, pixel_features
from model import dense_adjacency, dense_graph_classifier, prepare_edges
from plumbing import parse_config, require
from train import build_model

IMPLEMENTATIONS = ("sparse", "index_add", "dense", "pyg", "free")


@dataclass
class BenchmarkConfig:
    """Time one training step of train.py's pixel-graph classifier, implementation by implementation
    (sparse, index_add, dense, pyg, free: see the top of gnns_benchmark.py)."""
    models: tuple[str, ...] = ("gcn", "gat")  # layers to time: gcn, gat
    impls: tuple[str, ...] = IMPLEMENTATIONS  # sparse, index_add, dense, pyg (if installed), free
    batch_size: int = 64  # graphs (images) per step
    batches: int = 3  # timed steps per implementation (after one warm-up step)
    hidden: int = 64  # hidden features, as train.py's image default
    layers: int = 4  # graph layers, as train.py's image default
    heads: int = 4  # GAT heads, as train.py's image default
    threads: int = 0  # CPU threads for torch (0: torch's default)
    device: Literal["cpu", "cuda"] = "cpu"  # where to time
    task: Literal["mnist", "fashion_mnist"] = "mnist"  # which images
    data_dir: str = os.environ.get("DATA_DIR", "data")  # datasets root ($DATA_DIR, else ./data)
    seed: int = 0  # seeds torch

    def __post_init__(self):
        for name in ["batch_size", "batches", "hidden", "layers", "heads"]:
            require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1")
        require(self.models and set(self.models) <= {"gcn", "gat"}, "--models: gcn and/or gat")
        require(self.impls and set(self.impls) <= set(IMPLEMENTATIONS),
                f"--impls: choose from {', '.join(IMPLEMENTATIONS)}")


def swap_in_torch_geometric(net, kind, hidden, heads):
    """The same network with torch_geometric's layers in place of ours (same shapes and stack)."""
    from torch_geometric.nn import GATConv, GCNConv

    for i in range(len(net.convs)):
        net.convs[i] = GCNConv(hidden, hidden) if kind == "gcn" else \
            GATConv(hidden, hidden // heads, heads)
    return net


def free_aggregation(weight, h, edge_index):
    """Stands in for the neighbourhood sum under `free`: out_i = h_i, as if it cost nothing."""
    return h.clone()


def make_network(kind, impl, cfg):
    model_args = dict(kind="graph", model=kind, in_features=3, hidden=cfg.hidden, num_classes=10,
                      layers=cfg.layers, heads=cfg.heads)
    net = build_model(model_args, "index_add" if impl == "index_add" else "sparse")
    if impl == "free":
        for conv in net.convs:
            conv.aggregate = free_aggregation
    if impl == "pyg":
        net = swap_in_torch_geometric(net, kind, cfg.hidden, cfg.heads)
    return net


def synchronize(device):
    """Wait for the GPU's queued kernels, so that wall-clock time measures them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(net, impl, images, labels, edges, batch, adj, cfg, device):
    """Seconds of each timed training step (the first step, a warm-up, is not counted)."""
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    seconds = []
    for step in range(cfg.batches + 1):
        index = torch.arange(step * cfg.batch_size, (step + 1) * cfg.batch_size) % len(images)
        x, y = pixel_features(images[index]).to(device), labels[index].to(device)
        synchronize(device)
        start = time.perf_counter()
        if impl == "dense":
            logits = dense_graph_classifier(net, x, adj)
        else:
            logits = net(x.view(-1, 3), edges, batch, len(index))
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize(device)
        if step > 0:  # the first step is a warm-up (allocator, lazy initialisation)
            seconds.append(time.perf_counter() - start)
    return seconds


def main(argv=None):
    cfg = parse_config(BenchmarkConfig, argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    images, labels = load_images(cfg.data_dir, cfg.task, train=True)
    height, width = images.shape[1:]
    nodes = height * width
    edge_index = prepare_edges(grid_graph(height, width), nodes)
    edges, batch = block_diagonal(edge_index, nodes, cfg.batch_size)
    device = torch.device(cfg.device)
    edges, batch = edges.to(device), batch.to(device)
    adj = dense_adjacency(edge_index, nodes).to(device).expand(cfg.batch_size, nodes, nodes)
    steps_per_epoch = -(-len(images) // cfg.batch_size)
    print(f"{cfg.task}: {cfg.batch_size} graphs of {nodes} nodes per step, {edges.size(1)} edges "
          f"(self-loops included), {steps_per_epoch} steps per epoch; torch threads "
          f"{torch.get_num_threads()}, device {device}")
    results = {}
    for kind in cfg.models:
        for impl in cfg.impls:
            try:
                net = make_network(kind, impl, cfg).to(device)
            except ImportError:
                print(f"{kind} {impl}: skipped, torch_geometric is not installed")
                continue
            seconds = time_steps(net, impl, images, labels, edges, batch, adj, cfg, device)
            per_step = results[kind, impl] = sum(seconds) / len(seconds)
            print(f"{kind} {impl:9s}: {per_step * 1000:9.1f} ms/step (min "
                  f"{min(seconds) * 1000:.1f}), one epoch ~ {per_step * steps_per_epoch / 60:.1f} "
                  f"min (extrapolated from {len(seconds)} steps)")
        for impl in ["index_add", "dense", "pyg"]:
            if (kind, impl) in results and (kind, "sparse") in results:
                ratio = results[kind, impl] / results[kind, "sparse"]
                print(f"{kind}: {impl} / sparse time per step = {ratio:.1f}x")
        if (kind, "dense") in results and (kind, "free") in results:
            print(f"{kind}: dense / free = {results[kind, 'dense'] / results[kind, 'free']:.1f}x, "
                  f"the most that any implementation of the aggregation could gain over the dense "
                  f"reference in this network")


if __name__ == "__main__":
    main()
