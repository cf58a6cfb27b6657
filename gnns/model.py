"""Graph convolutional and graph attention networks as message passing over an edge list.

Kipf & Welling, "Semi-Supervised Classification with Graph Convolutional Networks", ICLR 2017
    https://arxiv.org/abs/1609.02907
Velickovic et al., "Graph Attention Networks", ICLR 2018
    https://arxiv.org/abs/1710.10903
framed as in Velickovic, "Everything is Connected: Graph Neural Networks" (2023), Eq. 6-8:

    h_i' = phi( x_i, AGG_{j in N(i)} psi(x_i, x_j) )

A graph is an edge list `edge_index` of shape (2, E): row 0 holds the source j, row 1 the
destination i of each message j -> i. Shapes: N nodes, E edges (self-loops included), H heads,
F features, B graphs.

| paper                                      | here                                        |
| ------------------------------------------ | ------------------------------------------- |
| N(i), i included (GCN's A + I)             | prepare_edges                               |
| sum_{j in N(i)} w_ji h_j (the AGG above)   | neighbourhood_sum (gather, index_add_)      |
| GCN Eq. 2 (Eq. 8 for one layer)            | GCNConv.forward                             |
| GAT Eq. 1-3: e_ij, alpha_ij                | GATConv.forward, scatter_softmax            |
| GAT Eq. 4-6: aggregation, multi-head       | GATConv.forward                             |
| GCN Eq. 9, GAT Sec. 3.3: the networks      | NodeClassifier (GraphClassifier for images) |
| the same layers with a dense N x N A       | dense_* at the end: the tests' reference    |

Both layers end in the same sum over each neighbourhood, written here as message passing, which
builds the (E, H, F) messages. gnns_sparse.NeighbourhoodSum computes that sum as sparse (CSR) matrix
products, 6-10x faster on MNIST batches; every layer takes it as `aggregate=`, and train.py uses it
unless told `--aggregation index_add`.

Edge conventions (what `prepare_edges` guarantees, and what every layer assumes):
  * duplicate edges count once (the graph is a set of edges, as a 0/1 adjacency matrix);
  * self-loops in the input are dropped and exactly one self-loop (i, i) per node is added,
    so an isolated node attends to / averages over itself alone (A + I in GCN's Eq. 2, and
    "j in N_i including i" in GAT's Eq. 3);
  * an index outside [0, num_nodes) is an error (ValueError, one line);
  * edges are sorted by destination (then source), the row order of a CSR matrix.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Message passing: the edge list, the sum and the softmax over each neighbourhood


def prepare_edges(edge_index, num_nodes):
    """Check an edge list, drop duplicates and self-loops, add one self-loop per node. (2, E')"""
    edge_index = torch.as_tensor(edge_index, dtype=torch.long)
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"edge_index must have shape (2, E), got {tuple(edge_index.shape)}")
    if edge_index.numel() and (edge_index.min() < 0 or edge_index.max() >= num_nodes):
        raise ValueError(f"edge_index out of range: node ids span [{int(edge_index.min())}, "
                         f"{int(edge_index.max())}] but the graph has {num_nodes} nodes "
                         f"(valid ids: 0..{num_nodes - 1})")
    src, dst = edge_index
    keep = src != dst
    key = torch.unique(dst[keep] * num_nodes + src[keep])  # sorted by destination, no duplicates
    loops = torch.arange(num_nodes)
    key = torch.sort(torch.cat([key, loops * num_nodes + loops])).values
    return torch.stack([key % num_nodes, key // num_nodes])  # row 0 = source j, row 1 = dest i


def neighbourhood_sum(weight, h, edge_index):
    """out_i = sum_{j in N(i)} w_ji h_j for every head: the aggregation both layers end with
    (GCN Eq. 2, GAT Eq. 4). weight (E, H), h (N, H, F), edge_index (2, E) -> (N, H, F)."""
    src, dst = edge_index
    messages = weight.unsqueeze(-1) * h.index_select(0, src)  # (E, H, F), w_ji h_j along j -> i
    return h.new_zeros(h.shape).index_add_(0, dst, messages)  # (N, H, F), summed at each i


def scatter_softmax(logits, index, num_nodes):
    """Softmax of per-edge logits (E, H) over all edges that share a destination, computed stably:
    the per-destination maximum is subtracted before exp, as the dense row-wise softmax does."""
    heads = logits.size(1)
    index = index.unsqueeze(1).expand_as(logits)
    max_per_node = logits.new_full((num_nodes, heads), -math.inf)
    max_per_node = max_per_node.scatter_reduce(0, index, logits.detach(), reduce="amax")  # a shift
    exp = (logits - max_per_node.gather(0, index)).exp()              # (E, H), every entry <= 1
    denominator = exp.new_zeros(num_nodes, heads).index_add_(0, index[:, 0], exp)
    return exp / denominator.gather(0, index)


def feature_dropout(x, p, training):
    """Dropout that also takes a sparse COO feature matrix (Cora's is 1% non-zero): it drops stored
    values only, as Kipf's sparse_dropout does. The zeros it skips would stay zero: same result."""
    if x.is_sparse:
        return torch.sparse_coo_tensor(x.indices(), F.dropout(x.values(), p, training), x.shape,
                                       is_coalesced=True, check_invariants=False)
    return F.dropout(x, p, training)


# -----------------------------------------------------------------------------
# GCN layer, Kipf & Welling Eq. 2:  H' = D~^{-1/2} (A + I) D~^{-1/2} H W   (Eq. 8: one layer)
# per node:  h_i' = sum_{j in N(i)} A^_ij W h_j,  A^_ij = 1 / sqrt(d_i d_j),  d_i = |N(i)|


class GCNConv(nn.Module):
    def __init__(self, in_features, out_features, bias=True, aggregate=neighbourhood_sum):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.aggregate = aggregate  # or gnns_sparse.NeighbourhoodSum.apply: the same sum, faster
        nn.init.xavier_uniform_(self.weight)  # Glorot, as in both papers

    def forward(self, x, edge_index):
        """x: (N, in) dense or sparse COO, edge_index from `prepare_edges` -> (N, out)."""
        src, dst = edge_index
        num_nodes = x.size(0)
        h = x @ self.weight                                                 # (N, out), H W
        ones = h.new_ones(dst.numel())
        degree = h.new_zeros(num_nodes).index_add_(0, dst, ones)          # D~_ii = sum_j (A+I)_ij
        inv_sqrt_degree = degree.pow(-0.5)
        norm = inv_sqrt_degree.index_select(0, src) * inv_sqrt_degree.index_select(0, dst)  # A^_ij
        out = self.aggregate(norm.unsqueeze(1), h.unsqueeze(1), edge_index).squeeze(1)  # (N, out)
        return out if self.bias is None else out + self.bias


# -----------------------------------------------------------------------------
# GAT layer, Velickovic et al. Eq. 1-6:
#   e_ij = LeakyReLU(a^T [W h_i || W h_j])                       (Eq. 1, with Eq. 3's a)
#   alpha_ij = softmax_j(e_ij) over j in N_i (i included)         (Eq. 2, 3)
#   h_i' = sigma(sum_j alpha_ij W h_j)                            (Eq. 4)
#   h_i' = ||_k sigma(sum_j alpha_ij^k W^k h_j)  or  mean_k ...   (Eq. 5, 6)


class GATConv(nn.Module):
    def __init__(self, in_features, out_features, heads=8, concat=True, dropout=0.6,
                 negative_slope=0.2, bias=True, aggregate=neighbourhood_sum):
        super().__init__()
        self.heads, self.out_features, self.concat = heads, out_features, concat
        self.dropout, self.negative_slope = dropout, negative_slope
        self.weight = nn.Parameter(torch.empty(in_features, heads * out_features))
        # a = [a_dst || a_src] split in two, so a^T [W h_i || W h_j] = a_dst . W h_i + a_src . W h_j
        self.att_src = nn.Parameter(torch.empty(heads, out_features))
        self.att_dst = nn.Parameter(torch.empty(heads, out_features))
        out_size = heads * out_features if concat else out_features
        self.bias = nn.Parameter(torch.zeros(out_size)) if bias else None
        self.aggregate = aggregate  # or gnns_sparse.NeighbourhoodSum.apply: the same sum, faster
        for p in (self.weight, self.att_src, self.att_dst):
            nn.init.xavier_uniform_(p)

    def forward(self, x, edge_index, return_attention=False):
        """x: (N, in) dense or sparse COO, edge_index from `prepare_edges` -> (N, H*F) or (N, F)."""
        src, dst = edge_index
        num_nodes = x.size(0)
        h = (x @ self.weight).view(num_nodes, self.heads, self.out_features)  # (N, H, F), W h
        score_src = (h * self.att_src).sum(-1)                       # (N, H), a_src . W h_j
        score_dst = (h * self.att_dst).sum(-1)                       # (N, H), a_dst . W h_i
        logits = F.leaky_relu(score_src.index_select(0, src) + score_dst.index_select(0, dst),
                              self.negative_slope)                   # (E, H), e_ij, Eq. 1
        alpha = scatter_softmax(logits, dst, num_nodes)              # (E, H), alpha_ij, Eq. 2
        attention = alpha
        alpha = F.dropout(alpha, self.dropout, self.training)        # dropout on alpha, Sec. 3.3
        out = self.aggregate(alpha, h, edge_index)                   # (N, H, F), Eq. 4
        out = out.reshape(num_nodes, -1) if self.concat else out.mean(1)  # Eq. 5 / Eq. 6
        if self.bias is not None:
            out = out + self.bias
        return (out, attention) if return_attention else out


# -----------------------------------------------------------------------------
# Readout: a graph's vector from its nodes' (mean or max pooling), invariant to node order


def global_pool(x, batch, num_graphs, mode="mean"):
    """x: (N, F) nodes of several graphs, batch: (N,) graph id of each node -> (num_graphs, F)."""
    if mode == "mean":
        total = x.new_zeros(num_graphs, x.size(1)).index_add_(0, batch, x)
        count = x.new_zeros(num_graphs).index_add_(0, batch, x.new_ones(x.size(0)))
        return total / count.clamp(min=1).unsqueeze(1)
    if mode == "max":
        index = batch.unsqueeze(1).expand_as(x)
        return x.new_full((num_graphs, x.size(1)), -math.inf).scatter_reduce(0, index, x, "amax")
    raise ValueError(f"unknown readout {mode!r} (use 'mean' or 'max')")


# -----------------------------------------------------------------------------
# Networks: the papers' two-layer node classifiers, and a deeper stack with a readout for graphs


class NodeClassifier(nn.Module):
    """Kipf & Welling Eq. 9 (GCN), Velickovic et al. Sec. 3.3 (GAT): two graph layers, the second
    one outputs class logits. Dropout on each layer's input; ReLU after GCN's first layer, ELU
    after GAT's."""

    def __init__(self, model, in_features, hidden, num_classes, heads=8, out_heads=1, dropout=0.5,
                 attention_dropout=0.6, aggregate=neighbourhood_sum):
        super().__init__()
        self.dropout = dropout
        if model == "gcn":
            self.conv1 = GCNConv(in_features, hidden, aggregate=aggregate)
            self.conv2 = GCNConv(hidden, num_classes, aggregate=aggregate)
            self.activation = F.relu
        else:
            self.conv1 = GATConv(in_features, hidden, heads, concat=True,
                                 dropout=attention_dropout, aggregate=aggregate)
            self.conv2 = GATConv(hidden * heads, num_classes, out_heads, concat=False,
                                 dropout=attention_dropout, aggregate=aggregate)
            self.activation = F.elu

    def forward(self, x, edge_index):
        """x: (N, in) node features, dense or sparse COO; edge_index from `prepare_edges`."""
        x = feature_dropout(x, self.dropout, self.training)
        x = self.activation(self.conv1(x, edge_index))
        x = F.dropout(x, self.dropout, self.training)
        return self.conv2(x, edge_index)                                  # (N, classes) logits


class GraphClassifier(nn.Module):
    """For whole graphs (MNIST digits as pixel graphs): a linear embedding of the node features,
    `layers` residual GCN/GAT layers, a mean or max readout per graph, and a two-layer MLP to class
    logits. The MLP starts with a BatchNorm: most of a pixel graph's pooled vector comes from the
    coordinate features, the same in every image, and without it our networks learned only the
    label frequencies."""

    def __init__(self, model, in_features, hidden, num_classes, layers=4, heads=4, dropout=0.0,
                 attention_dropout=0.0, readout="mean", aggregate=neighbourhood_sum):
        super().__init__()
        if model == "gat" and hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads}) for "
                             f"concatenated GAT heads")
        self.readout, self.dropout = readout, dropout
        self.embed = nn.Linear(in_features, hidden)
        self.convs = nn.ModuleList(
            GCNConv(hidden, hidden, aggregate=aggregate) if model == "gcn" else
            GATConv(hidden, hidden // heads, heads, concat=True, dropout=attention_dropout,
                    aggregate=aggregate)
            for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.head = nn.Sequential(nn.BatchNorm1d(hidden), nn.Linear(hidden, hidden), nn.ReLU(),
                                  nn.Linear(hidden, num_classes))

    def forward(self, x, edge_index, batch, num_graphs):
        """x: (N, in) nodes of a block-diagonal batch, batch: (N,) graph ids -> (B, classes)."""
        h = self.embed(x)
        for conv, norm in zip(self.convs, self.norms):
            h = h + F.dropout(F.relu(conv(norm(h), edge_index)), self.dropout, self.training)
        return self.head(global_pool(h, batch, num_graphs, self.readout))


# -----------------------------------------------------------------------------
# The same layers in matrix form, with a dense 0/1 adjacency A + I per graph: O(N^2) per graph and
# head. Nothing trains with these: they are the tests' independent reference and the benchmark's
# baseline.


def dense_adjacency(edge_index, num_nodes):
    """The 0/1 matrix A[i, j] = 1 iff there is an edge j -> i, shape (N, N)."""
    adj = torch.zeros(num_nodes, num_nodes)
    adj[edge_index[1], edge_index[0]] = 1.0
    return adj


def dense_gcn(conv, x, adj):
    """GCNConv in Kipf's matrix form: x (B, N, in), adj (B, N, N) = A + I as 0/1 -> (B, N, out)."""
    inv_sqrt_degree = adj.sum(-1).pow(-0.5)                             # (B, N)
    a_hat = inv_sqrt_degree.unsqueeze(-1) * adj * inv_sqrt_degree.unsqueeze(-2)
    out = a_hat @ (x @ conv.weight)
    return out if conv.bias is None else out + conv.bias


def dense_gat(conv, x, adj, return_attention=False):
    """GATConv with an (N, N) attention matrix masked to the graph: x (B, N, in), adj (B, N, N)."""
    batch, num_nodes, _ = x.shape
    h = (x @ conv.weight).view(batch, num_nodes, conv.heads, conv.out_features)
    h = h.transpose(1, 2)                                                 # (B, H, N, F)
    score_src = (h * conv.att_src.unsqueeze(1)).sum(-1)                   # (B, H, N)
    score_dst = (h * conv.att_dst.unsqueeze(1)).sum(-1)                   # (B, H, N)
    logits = score_dst.unsqueeze(-1) + score_src.unsqueeze(-2)            # (B, H, N, N)
    logits = F.leaky_relu(logits, conv.negative_slope).masked_fill(adj.unsqueeze(1) == 0, -math.inf)
    attention = logits.softmax(-1)                                        # rows: destinations i
    out = F.dropout(attention, conv.dropout, conv.training) @ h           # (B, H, N, F)
    out = out.transpose(1, 2).reshape(batch, num_nodes, -1) if conv.concat else out.mean(1)
    if conv.bias is not None:
        out = out + conv.bias
    return (out, attention) if return_attention else out


def dense_conv(conv, x, adj):
    return dense_gcn(conv, x, adj) if isinstance(conv, GCNConv) else dense_gat(conv, x, adj)


def dense_node_classifier(net, x, adj):
    """NodeClassifier.forward with dense layers: x (B, N, in), adj (B, N, N) -> (B, N, classes)."""
    x = F.dropout(x, net.dropout, net.training)
    x = net.activation(dense_conv(net.conv1, x, adj))
    x = F.dropout(x, net.dropout, net.training)
    return dense_conv(net.conv2, x, adj)


def dense_graph_classifier(net, x, adj):
    """GraphClassifier.forward for B graphs of N nodes each: x (B, N, in), adj (B, N, N)."""
    h = net.embed(x)
    for conv, norm in zip(net.convs, net.norms):
        h = h + F.dropout(F.relu(dense_conv(conv, norm(h), adj)), net.dropout, net.training)
    return net.head(h.mean(1) if net.readout == "mean" else h.amax(1))
