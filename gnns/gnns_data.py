"""Data for gnns/: the Planetoid citation graphs (Cora, CiteSeer) from their original ind.<name>.*
files, and images (MNIST, FashionMNIST) as pixel graphs. Downloads when the files are absent; a
one-line exit when it cannot, or when a file is corrupt or holds anything but Planetoid types."""
import os
import pickle
import shutil
import sys
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse
import torch

from model import prepare_edges
from plumbing import IMAGE_DATASETS, load_image_dataset

CITATION = {"cora": "Cora", "citeseer": "CiteSeer"}  # task name -> folder name under --data-dir
IMAGES = {name: IMAGE_DATASETS[name][0] for name in ["mnist", "fashion_mnist"]}  # -> torchvision's


# -----------------------------------------------------------------------------
# Planetoid citation graphs from the original ind.<name>.* files


PLANETOID_URL = "https://github.com/kimiyoung/planetoid/raw/master/data"
PLANETOID_PARTS = ["x", "y", "tx", "ty", "allx", "ally", "graph", "test.index"]

# All that the Planetoid pickles are made of: numpy arrays (x, tx, allx: scipy CSR matrices of them)
# and a defaultdict(list) (graph). The files were written by Python 2 (numpy.core, __builtin__);
# today's spellings are admitted too, for the same files written again by Python 3 (which writes
# bytes as _codecs.encode at protocol 2). Anything else is refused before it is even imported.
PLANETOID_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("scipy.sparse.csr", "csr_matrix"), ("scipy.sparse._csr", "csr_matrix"),
    ("collections", "defaultdict"), ("__builtin__", "list"), ("builtins", "list"),
    ("_codecs", "encode"),
}


class PlanetoidUnpickler(pickle.Unpickler):
    """pickle.load that builds only the types of PLANETOID_GLOBALS: a file naming any other class or
    function (os.system, eval, a class whose __reduce__ runs code) stops before it is imported."""

    def find_class(self, module, name):
        if (module, name) not in PLANETOID_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which no Planetoid file holds")
        return super().find_class(module, name)


def read_planetoid_part(path, expected):
    """One ind.<name>.<part> pickle through PlanetoidUnpickler, or one line naming the file."""
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy.core and scipy.sparse.csr are deprecated names
            obj = PlanetoidUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        if "no Planetoid file holds" in str(e):
            sys.exit(f"error: refused to load {path}: {e} (replace it with the original file)")
        sys.exit(f"error: {path} is present but corrupt ({e}); delete it to download it again")
    except Exception as e:
        sys.exit(f"error: {path} is present but corrupt ({type(e).__name__}); delete it to "
                 f"download it again")
    if not isinstance(obj, expected):
        sys.exit(f"error: {path} holds a {type(obj).__name__}, not the {expected.__name__} of a "
                 f"Planetoid file; replace it with the original")
    return obj


def download_or_exit(dataset, raw_dir, fetch):
    """Run `fetch()`; if it fails, remove every folder and file it created, and stop in one line."""
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
        sys.exit(f"error: {dataset} not found in {raw_dir} and the download failed "
                 f"({type(e).__name__}); put the files there or point --data-dir / DATA_DIR at a "
                 f"folder that has them")


def load_planetoid(data_dir, task):
    """Cora / CiteSeer as Kipf & Welling's and torch_geometric's loaders read them: features (N, F)
    row-normalised, labels (N,), edge_index from `prepare_edges`, and the standard train/val/test
    node indices."""
    name = task
    raw_dir = Path(data_dir) / CITATION[task] / "raw"
    paths = {part: raw_dir / f"ind.{name}.{part}" for part in PLANETOID_PARTS}
    if not all(p.exists() for p in paths.values()):
        def fetch():
            raw_dir.mkdir(parents=True, exist_ok=True)
            for part, path in paths.items():
                if not path.exists():
                    url = f"{PLANETOID_URL}/ind.{name}.{part}"
                    urllib.request.urlretrieve(url, str(path) + ".tmp")
                    os.replace(str(path) + ".tmp", path)
        download_or_exit(CITATION[task], raw_dir, fetch)
    matrix = scipy.sparse.spmatrix
    expected = dict(x=matrix, tx=matrix, allx=matrix, y=np.ndarray, ty=np.ndarray, ally=np.ndarray,
                    graph=dict)
    objects = {part: read_planetoid_part(paths[part], kind) for part, kind in expected.items()}
    try:
        test_index = [int(line) for line in paths["test.index"].read_text().split()]
        tx, ty, allx, ally = (objects[k] for k in ["tx", "ty", "allx", "ally"])
        tx = np.asarray(tx.todense(), dtype=np.float32)
        allx = np.asarray(allx.todense(), dtype=np.float32)
        num_train = objects["y"].shape[0]
        sorted_test = sorted(test_index)
        if name == "citeseer":  # some test nodes are isolated and absent from tx: zero rows
            full = sorted_test[-1] - sorted_test[0] + 1
            tx_full = np.zeros((full, tx.shape[1]), dtype=np.float32)
            ty_full = np.zeros((full, ty.shape[1]), dtype=ty.dtype)
            tx_full[np.array(sorted_test) - sorted_test[0]] = tx
            ty_full[np.array(sorted_test) - sorted_test[0]] = ty
            tx, ty = tx_full, ty_full
        features = np.concatenate([allx, tx])
        labels = np.concatenate([ally, ty]).argmax(1)
        features[test_index] = features[sorted_test]   # the test rows are stored sorted: undo that
        labels[test_index] = labels[sorted_test]
    except Exception as e:
        sys.exit(f"error: the {CITATION[task]} files in {raw_dir} do not fit together "
                 f"({type(e).__name__}: {e}); delete them to download them again")
    features /= np.maximum(features.sum(1, keepdims=True), 1e-12)  # row-normalise, as both papers
    num_nodes = features.shape[0]
    edges = [(j, i) for i, neighbours in objects["graph"].items() for j in neighbours]
    try:
        edge_index = torch.tensor(edges, dtype=torch.long).T.reshape(2, -1)
        edge_index = prepare_edges(edge_index, num_nodes)
    except (ValueError, TypeError, RuntimeError) as e:
        sys.exit(f"error: {paths['graph']}: {e}")
    return dict(x=torch.from_numpy(features).to_sparse(), y=torch.from_numpy(labels).long(),
                edge_index=edge_index, train=torch.arange(num_train),
                val=torch.arange(num_train, num_train + 500), test=torch.tensor(test_index),
                num_classes=int(ally.shape[1]))


# -----------------------------------------------------------------------------
# Images as pixel graphs


def load_images(data_dir, task, train):
    """(images uint8 (n, H, W), labels (n,)) of MNIST or FashionMNIST, through plumbing's loader."""
    images, labels, _ = load_image_dataset(task, data_dir, train)
    return images[:, 0], labels


def grid_graph(height, width):
    """8-neighbour grid: an edge (j, i) for every pair of distinct pixels at most one step apart
    (diagonals too), in both directions, no self-loops.
    (2, E) with E = 2 (H(W-1) + (H-1)W + 2(H-1)(W-1))."""
    ids = torch.arange(height * width).view(height, width)
    src, dst = [], []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == dx == 0:
                continue  # the layers add the self-loop
            rows = slice(max(0, -dy), height - max(0, dy))
            cols = slice(max(0, -dx), width - max(0, dx))
            rows_to = slice(max(0, dy), height + min(0, dy))
            cols_to = slice(max(0, dx), width + min(0, dx))
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
    """One graph's prepared edges repeated for `num_graphs` copies, node ids shifted: a
    block-diagonal batch. Returns edge_index (2, num_graphs*E) and batch (num_graphs*num_nodes,),
    each node's graph id."""
    offsets = torch.arange(num_graphs).repeat_interleave(edge_index.size(1)) * num_nodes
    batch = torch.arange(num_graphs).repeat_interleave(num_nodes)
    return edge_index.repeat(1, num_graphs) + offsets, batch
