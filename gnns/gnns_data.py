"""Data for gnns/: the Planetoid citation graphs (Cora, CiteSeer) from their original ind.<name>.* files, and
images (MNIST, FashionMNIST) as pixel graphs. Downloads when the files are absent; one-line exit when it cannot."""
import os
import pickle
import shutil
import sys
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import torch

from model import prepare_edges

CITATION = {"cora": "Cora", "citeseer": "CiteSeer"}  # task name -> folder name under --data-dir
IMAGES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


# -----------------------------------------------------------------------------
# Data: Planetoid citation graphs from the original ind.<name>.* files


PLANETOID_URL = "https://github.com/kimiyoung/planetoid/raw/master/data"
PLANETOID_PARTS = ["x", "y", "tx", "ty", "allx", "ally", "graph", "test.index"]


def download_or_exit(dataset, raw_dir, fetch):
    """Run `fetch()`; if it fails, remove every directory and file it created and stop with one line."""
    created = [d for d in [raw_dir, *raw_dir.parents] if not d.exists()]
    before = set(raw_dir.iterdir()) if raw_dir.exists() else set()
    try:
        fetch()
    except Exception as e:  # offline, HTTP error, partial file: nothing may stay behind
        if created:
            shutil.rmtree(created[-1], ignore_errors=True)
        else:
            for path in set(raw_dir.iterdir()) - before:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        sys.exit(f"error: {dataset} not found in {raw_dir} and the download failed ({type(e).__name__}); "
                 f"put the files there or point --data-dir / DATA_DIR at a folder that has them")


def load_planetoid(data_dir, task):
    """Cora / CiteSeer as Kipf & Welling's and torch_geometric's loaders read them: features (N, F) row-normalised,
    labels (N,), edge_index from `prepare_edges`, and the standard train/val/test node indices."""
    name = task
    raw_dir = Path(data_dir) / CITATION[task] / "raw"
    paths = {part: raw_dir / f"ind.{name}.{part}" for part in PLANETOID_PARTS}
    if not all(p.exists() for p in paths.values()):
        def fetch():
            raw_dir.mkdir(parents=True, exist_ok=True)
            for part, path in paths.items():
                if not path.exists():
                    urllib.request.urlretrieve(f"{PLANETOID_URL}/ind.{name}.{part}", str(path) + ".tmp")
                    os.replace(str(path) + ".tmp", path)
        download_or_exit(CITATION[task], raw_dir, fetch)
    try:
        objects = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # old pickles name scipy.sparse.csr, deprecated
            for part in ["x", "y", "tx", "ty", "allx", "ally", "graph"]:
                with open(paths[part], "rb") as f:
                    objects[part] = pickle.load(f, encoding="latin1")
        test_index = [int(line) for line in paths["test.index"].read_text().split()]
        tx, ty, allx, ally = (objects[k] for k in ["tx", "ty", "allx", "ally"])
        tx = np.asarray(tx.todense(), dtype=np.float32)
        allx = np.asarray(allx.todense(), dtype=np.float32)
        num_train = objects["y"].shape[0]
    except Exception as e:
        sys.exit(f"error: could not read the {CITATION[task]} files in {raw_dir} ({type(e).__name__}: {e}); "
                 f"they may be truncated: delete them to download again")
    sorted_test = sorted(test_index)
    if name == "citeseer":  # some CiteSeer test nodes are isolated and absent from tx: give them zero rows
        full = sorted_test[-1] - sorted_test[0] + 1
        tx_full = np.zeros((full, tx.shape[1]), dtype=np.float32)
        ty_full = np.zeros((full, ty.shape[1]), dtype=ty.dtype)
        tx_full[np.array(sorted_test) - sorted_test[0]] = tx
        ty_full[np.array(sorted_test) - sorted_test[0]] = ty
        tx, ty = tx_full, ty_full
    features = np.concatenate([allx, tx])
    labels = np.concatenate([ally, ty]).argmax(1)
    features[test_index] = features[sorted_test]   # the test rows are stored in sorted order: undo that
    labels[test_index] = labels[sorted_test]
    features /= np.maximum(features.sum(1, keepdims=True), 1e-12)  # row-normalise, as both papers do
    num_nodes = features.shape[0]
    edges = [(j, i) for i, neighbours in objects["graph"].items() for j in neighbours]
    try:
        edge_index = prepare_edges(torch.tensor(edges, dtype=torch.long).T.reshape(2, -1), num_nodes)
    except ValueError as e:
        sys.exit(f"error: {paths['graph']}: {e}")
    return dict(x=torch.from_numpy(features).to_sparse(), y=torch.from_numpy(labels).long(), edge_index=edge_index,
                train=torch.arange(num_train), val=torch.arange(num_train, num_train + 500),
                test=torch.tensor(test_index), num_classes=int(ally.shape[1]))


# -----------------------------------------------------------------------------
# Data: images as pixel graphs


def grid_graph(height, width):
    """8-neighbour grid: an edge (j, i) for every pair of distinct pixels at most one step apart (diagonals too),
    in both directions, no self-loops. (2, E) with E = 2 (H(W-1) + (H-1)W + 2(H-1)(W-1))."""
    ids = torch.arange(height * width).view(height, width)
    src, dst = [], []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == dx == 0:
                continue  # the layers add the self-loop
            rows, cols = slice(max(0, -dy), height - max(0, dy)), slice(max(0, -dx), width - max(0, dx))
            rows_to, cols_to = slice(max(0, dy), height + min(0, dy)), slice(max(0, dx), width + min(0, dx))
            src.append(ids[rows, cols].reshape(-1))
            dst.append(ids[rows_to, cols_to].reshape(-1))
    return torch.stack([torch.cat(src), torch.cat(dst)])


def pixel_features(images):
    """(B, H, W) uint8 -> (B, H*W, 3) node features: intensity in [0, 1], x and y in [0, 1]."""
    batch, height, width = images.shape
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    coords = torch.stack([x, y], -1).view(1, height * width, 2).expand(batch, -1, -1)
    return torch.cat([images.float().div(255).view(batch, -1, 1), coords], -1)


def block_diagonal(edge_index, num_nodes, num_graphs):
    """One graph's prepared edges repeated for `num_graphs` copies, node ids shifted: a block-diagonal batch.
    Returns edge_index (2, num_graphs*E) and batch (num_graphs*num_nodes,) holding each node's graph id."""
    offsets = torch.arange(num_graphs).repeat_interleave(edge_index.size(1)) * num_nodes
    return edge_index.repeat(1, num_graphs) + offsets, torch.arange(num_graphs).repeat_interleave(num_nodes)


def load_images(data_dir, task, train):
    """(images uint8 (n, 28, 28), labels (n,)) via torchvision, downloading when the files are absent."""
    import torchvision  # imported here: the citation tasks do not need it, and it costs a second to import

    cls = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST}[task]
    raw_dir = Path(data_dir) / IMAGES[task] / "raw"
    try:
        dataset = cls(data_dir, train=train, download=False)
    except RuntimeError:
        holder = {}
        download_or_exit(IMAGES[task], raw_dir, lambda: holder.update(d=cls(data_dir, train=train, download=True)))
        dataset = holder["d"]
    return dataset.data, dataset.targets
