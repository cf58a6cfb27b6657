"""Graph convolutional and graph attention networks as hand-built message passing.

Kipf & Welling, "Semi-Supervised Classification with Graph Convolutional Networks", ICLR 2017
    https://arxiv.org/abs/1609.02907
Velickovic et al., "Graph Attention Networks", ICLR 2018
    https://arxiv.org/abs/1710.10903
framed as in Velickovic, "Everything is Connected: Graph Neural Networks" (2023), Eq. 6-8:

    h_i' = phi( x_i, AGG_{j in N(i)} psi(x_i, x_j) )

A graph is an edge list `edge_index` of shape (2, E): row 0 holds the source j, row 1 the destination i
of each message j -> i. Both layers end in the same aggregation, out_i = sum_{j in N(i)} w_ji h_j
(`NeighbourhoodSum`): the message passing `zeros.index_add_(0, dst, w * h[src])`, computed as a sparse
(CSR) matrix product so that its cost is O(E) rather than the O(N^2) of a dense adjacency matrix, and
without materialising the (E, F) messages. The dense, adjacency-masked formulation is kept beside each
layer (`forward_dense`) as the reference the tests compare against.

Edge conventions (what `prepare_edges` guarantees, and what every layer assumes):
  * duplicate edges count once (the graph is a set of edges, as a 0/1 adjacency matrix);
  * self-loops in the input are dropped and exactly one self-loop (i, i) per node is added,
    so an isolated node attends to / averages over itself alone (A + I in GCN's Eq. 2, and
    "j in N_i including i" in GAT's Eq. 3);
  * an index outside [0, num_nodes) is an error (ValueError, one line);
  * edges are sorted by destination (then source), the row order of a CSR matrix.
"""
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")  # it is used, and tested, here

# -----------------------------------------------------------------------------
# Graph plumbing: edge lists, the dense reference adjacency, scatter-softmax


def prepare_edges(edge_index, num_nodes):
    """Check an edge list, drop duplicates and self-loops, add one self-loop per node. (2, E') int64."""
    edge_index = torch.as_tensor(edge_index, dtype=torch.long)
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"edge_index must have shape (2, E), got {tuple(edge_index.shape)}")
    if edge_index.numel() and (edge_index.min() < 0 or edge_index.max() >= num_nodes):
        raise ValueError(f"edge_index out of range: node ids span [{int(edge_index.min())}, {int(edge_index.max())}] "
                         f"but the graph has {num_nodes} nodes (valid ids: 0..{num_nodes - 1})")
    src, dst = edge_index
    keep = src != dst
    key = torch.unique(dst[keep] * num_nodes + src[keep])  # sorted by destination, duplicates removed
    loops = torch.arange(num_nodes)
    key = torch.sort(torch.cat([key, loops * num_nodes + loops])).values
    return torch.stack([key % num_nodes, key // num_nodes])  # (2, E'), row 0 = source j, row 1 = dest i


def dense_adjacency(edge_index, num_nodes):
    """The 0/1 matrix A[i, j] = 1 iff there is an edge j -> i, shape (N, N); the O(N^2) reference."""
    adj = torch.zeros(num_nodes, num_nodes)
    adj[edge_index[1], edge_index[0]] = 1.0
    return adj


def scatter_softmax(logits, index, num_nodes):
    """Softmax of per-edge logits (E, H) over all edges that share a destination, computed stably:
    the per-destination maximum is subtracted before exp, as the dense row-wise softmax does."""
    heads = logits.size(1)
    index = index.unsqueeze(1).expand_as(logits)
    max_per_node = logits.new_full((num_nodes, heads), -math.inf)
    max_per_node = max_per_node.scatter_reduce(0, index, logits.detach(), reduce="amax")  # a constant shift
    exp = (logits - max_per_node.gather(0, index)).exp()                    # (E, H), every entry <= 1
    denominator = exp.new_zeros(num_nodes, heads).index_add_(0, index[:, 0], exp)
    return exp / denominator.gather(0, index)


def row_pointers(index, num_nodes):
    """CSR row pointers of edges sorted by `index`: node i's edges are crow[i]:crow[i + 1]. (N + 1,)"""
    return F.pad(torch.bincount(index, minlength=num_nodes).cumsum(0), (1, 0))


def sparse_matrix(crow, col, values, num_nodes):
    """The (N, N) CSR matrix with `values` at rows given by `crow`, columns `col`."""
    return torch.sparse_csr_tensor(crow, col, values, (num_nodes, num_nodes), check_invariants=False)


class NeighbourhoodSum(torch.autograd.Function):
    """out_i = sum_{j -> i} w_ji h_j for every head: the aggregation of GCN's Eq. 2 and GAT's Eq. 4.

    It is the message passing `h.new_zeros(N, H, F).index_add_(0, dst, w.unsqueeze(-1) * h[src])` (the tests check
    this), computed as one sparse-dense product per head with the matrix W[i, j] = w_ji in CSR form. That streams
    over the E weights and rows of h instead of writing and re-reading an (E, H, F) message tensor, which made the
    index_add_ version memory-bound (6-10x slower on a batch of 64 MNIST pixel graphs). Each head's features are
    first copied into one contiguous (N, F) slab, because the CPU sparse kernel is ~3x slower on the strided view
    h[:, k], and each product writes straight into its slab of the output, with no stacking copy. Backward:
        dL/dh = W^T dL/dout                 (the same product on the transposed graph)
        dL/dw_ji = <dL/dout_i, h_j>         (only at the E stored positions: a sampled matrix product)
    Edges must be sorted by destination, as `prepare_edges` and `block_diagonal` leave them."""

    @staticmethod
    def forward(ctx, weight, h, edge_index):
        """weight (E, H), h (N, H, F), edge_index (2, E) -> (N, H, F)."""
        src, dst = edge_index
        num_nodes, heads = h.shape[:2]
        if dst.numel() > 1 and bool((dst[1:] < dst[:-1]).any()):
            raise ValueError("edges must be sorted by destination: build edge_index with prepare_edges")
        crow, weight_per_head = row_pointers(dst, num_nodes), weight.t().contiguous()   # (N + 1,), (H, E)
        h_per_head = h.transpose(0, 1).contiguous()                                     # (H, N, F)
        out = torch.empty_like(h_per_head)
        for k in range(heads):
            torch.mm(sparse_matrix(crow, src, weight_per_head[k], num_nodes), h_per_head[k], out=out[k])
        ctx.save_for_backward(weight, h_per_head, edge_index, crow)
        return out.transpose(0, 1)

    @staticmethod
    def backward(ctx, grad_out):
        weight, h_per_head, edge_index, crow = ctx.saved_tensors
        src, dst = edge_index
        heads, num_nodes = h_per_head.shape[:2]
        grad_per_head = grad_out.transpose(0, 1).contiguous()                          # (H, N, F)
        grad_weight = grad_h = None
        if ctx.needs_input_grad[0]:
            pattern = sparse_matrix(crow, src, weight.new_zeros(src.numel()), num_nodes)
            grad_weight = torch.stack([torch.sparse.sampled_addmm(pattern, grad_per_head[k], h_per_head[k].T,
                                                                  beta=0.0).values() for k in range(heads)], 1)  # (E, H)
        if ctx.needs_input_grad[1]:
            by_source = torch.argsort(src, stable=True)                          # the transposed graph's CSR order
            crow_t, col_t, weight_t = row_pointers(src, num_nodes), dst[by_source], weight[by_source].t().contiguous()
            grad_h = torch.empty_like(grad_per_head)
            for k in range(heads):
                torch.mm(sparse_matrix(crow_t, col_t, weight_t[k], num_nodes), grad_per_head[k], out=grad_h[k])
            grad_h = grad_h.transpose(0, 1)                                     # (N, H, F)
        return grad_weight, grad_h, None


def feature_dropout(x, p, training):
    """Dropout that also takes a sparse COO feature matrix (Cora's is 1% non-zero): it drops stored values only,
    as Kipf's sparse_dropout does. The zeros it skips would stay zero, so it equals dense dropout, far cheaper."""
    if x.is_sparse:
        return torch.sparse_coo_tensor(x.indices(), F.dropout(x.values(), p, training), x.shape,
                                       is_coalesced=True, check_invariants=False)
    return F.dropout(x, p, training)


# -----------------------------------------------------------------------------
# GCN layer, Kipf & Welling Eq. 2:  H' = D~^{-1/2} (A + I) D~^{-1/2} H W


class GCNConv(nn.Module):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.xavier_uniform_(self.weight)  # Glorot, as in both papers

    def forward(self, x, edge_index):
        """x: (N, in) dense or sparse COO, edge_index from `prepare_edges` -> (N, out)."""
        src, dst = edge_index
        num_nodes = x.size(0)
        h = x @ self.weight                                                 # (N, out), H W
        degree = h.new_zeros(num_nodes).index_add_(0, dst, h.new_ones(dst.numel()))  # D~_ii = sum_j (A+I)_ij
        inv_sqrt_degree = degree.pow(-0.5)
        norm = inv_sqrt_degree.index_select(0, src) * inv_sqrt_degree.index_select(0, dst)  # (E,), A^_ij of j -> i
        out = NeighbourhoodSum.apply(norm.unsqueeze(1), h.unsqueeze(1), edge_index).squeeze(1)  # sum_j A^_ij W h_j
        return out if self.bias is None else out + self.bias

    def forward_dense(self, x, adj):
        """Reference: x (B, N, in), adj (B, N, N) = A + I as 0/1 -> (B, N, out); O(N^2) per graph."""
        inv_sqrt_degree = adj.sum(-1).pow(-0.5)                             # (B, N)
        a_hat = inv_sqrt_degree.unsqueeze(-1) * adj * inv_sqrt_degree.unsqueeze(-2)
        out = a_hat @ (x @ self.weight)
        return out if self.bias is None else out + self.bias


# -----------------------------------------------------------------------------
# GAT layer, Velickovic et al. Eq. 1-6:
#   e_ij = LeakyReLU(a^T [W h_i || W h_j])                       (Eq. 1, 3)
#   alpha_ij = softmax_j(e_ij) over j in N_i (i included)         (Eq. 2)
#   h_i' = ||_k sigma(sum_j alpha_ij^k W^k h_j)  or  mean_k ...   (Eq. 5, 6)


class GATConv(nn.Module):
    def __init__(self, in_features, out_features, heads=8, concat=True, dropout=0.6, negative_slope=0.2,
                 bias=True):
        super().__init__()
        self.heads, self.out_features, self.concat = heads, out_features, concat
        self.dropout, self.negative_slope = dropout, negative_slope
        self.weight = nn.Parameter(torch.empty(in_features, heads * out_features))
        # a = [a_dst || a_src] split in two, so a^T [W h_i || W h_j] = a_dst . W h_i + a_src . W h_j
        self.att_src = nn.Parameter(torch.empty(heads, out_features))
        self.att_dst = nn.Parameter(torch.empty(heads, out_features))
        self.bias = nn.Parameter(torch.zeros(heads * out_features if concat else out_features)) if bias else None
        for p in (self.weight, self.att_src, self.att_dst):
            nn.init.xavier_uniform_(p)

    def forward(self, x, edge_index, return_attention=False):
        """x: (N, in) dense or sparse COO, edge_index from `prepare_edges` -> (N, heads*out) or (N, out)."""
        src, dst = edge_index
        num_nodes = x.size(0)
        h = (x @ self.weight).view(num_nodes, self.heads, self.out_features)  # (N, H, F), W h
        score_src = (h * self.att_src).sum(-1)                                 # (N, H)
        score_dst = (h * self.att_dst).sum(-1)                                 # (N, H)
        logits = F.leaky_relu(score_src.index_select(0, src) + score_dst.index_select(0, dst),
                              self.negative_slope)                     # (E, H), Eq. 3
        alpha = scatter_softmax(logits, dst, num_nodes)                        # (E, H), Eq. 2
        attention = alpha
        alpha = F.dropout(alpha, self.dropout, self.training)                 # dropout on alpha, Sec. 3.3
        out = NeighbourhoodSum.apply(alpha, h, edge_index)                    # (N, H, F), Eq. 4
        out = out.reshape(num_nodes, -1) if self.concat else out.mean(1)     # Eq. 5 (concat) / Eq. 6 (mean)
        if self.bias is not None:
            out = out + self.bias
        return (out, attention) if return_attention else out

    def forward_dense(self, x, adj, return_attention=False):
        """Reference: x (B, N, in), adj (B, N, N) = A + I as 0/1 -> (B, N, ...); O(N^2) per head."""
        batch, num_nodes, _ = x.shape
        h = (x @ self.weight).view(batch, num_nodes, self.heads, self.out_features).transpose(1, 2)  # (B,H,N,F)
        score_src = (h * self.att_src.unsqueeze(1)).sum(-1)                   # (B, H, N)
        score_dst = (h * self.att_dst.unsqueeze(1)).sum(-1)                   # (B, H, N)
        logits = F.leaky_relu(score_dst.unsqueeze(-1) + score_src.unsqueeze(-2), self.negative_slope)  # (B,H,N,N)
        logits = logits.masked_fill(adj.unsqueeze(1) == 0, -math.inf)
        attention = logits.softmax(-1)                                        # rows: destinations i
        out = F.dropout(attention, self.dropout, self.training) @ h           # (B, H, N, F)
        out = out.transpose(1, 2).reshape(batch, num_nodes, -1) if self.concat else out.mean(1)
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


def dense_pool(x, mode="mean"):
    """Reference readout for equal-sized graphs: x (B, N, F) -> (B, F)."""
    return x.mean(1) if mode == "mean" else x.amax(1)


# -----------------------------------------------------------------------------
# Networks: the papers' two-layer node classifiers, and a deeper stack with a readout for whole graphs


class NodeClassifier(nn.Module):
    """Kipf & Welling Eq. 9 (GCN), Velickovic et al. Sec. 3.3 (GAT): two graph layers, the second one
    outputs class logits. Dropout on each layer's input; ReLU after GCN's first layer, ELU after GAT's."""

    def __init__(self, model, in_features, hidden, num_classes, heads=8, out_heads=1, dropout=0.5,
                 attention_dropout=0.6):
        super().__init__()
        self.dropout = dropout
        if model == "gcn":
            self.conv1 = GCNConv(in_features, hidden)
            self.conv2 = GCNConv(hidden, num_classes)
            self.activation = F.relu
        else:
            self.conv1 = GATConv(in_features, hidden, heads, concat=True, dropout=attention_dropout)
            self.conv2 = GATConv(hidden * heads, num_classes, out_heads, concat=False, dropout=attention_dropout)
            self.activation = F.elu

    def forward(self, x, edge_index):
        """x: (N, in) node features, dense or sparse COO; edge_index from `prepare_edges`."""
        x = feature_dropout(x, self.dropout, self.training)
        x = self.activation(self.conv1(x, edge_index))
        x = F.dropout(x, self.dropout, self.training)
        return self.conv2(x, edge_index)                                      # (N, classes) logits

    def forward_dense(self, x, adj):
        x = F.dropout(x, self.dropout, self.training)
        x = self.activation(self.conv1.forward_dense(x, adj))
        x = F.dropout(x, self.dropout, self.training)
        return self.conv2.forward_dense(x, adj)


class GraphClassifier(nn.Module):
    """For whole graphs (MNIST digits as pixel graphs): a linear embedding of the node features, `layers`
    residual GCN/GAT layers, a mean or max readout per graph, and a two-layer MLP to class logits.
    The MLP starts with a BatchNorm: most of a pixel graph's pooled vector comes from the coordinate features,
    the same in every image, and without it our networks learned only the label frequencies."""

    def __init__(self, model, in_features, hidden, num_classes, layers=4, heads=4, dropout=0.0,
                 attention_dropout=0.0, readout="mean"):
        super().__init__()
        if model == "gat" and hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads}) for concatenated GAT heads")
        self.readout, self.dropout = readout, dropout
        self.embed = nn.Linear(in_features, hidden)
        self.convs = nn.ModuleList(
            GCNConv(hidden, hidden) if model == "gcn" else
            GATConv(hidden, hidden // heads, heads, concat=True, dropout=attention_dropout)
            for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.head = nn.Sequential(nn.BatchNorm1d(hidden), nn.Linear(hidden, hidden), nn.ReLU(),
                                  nn.Linear(hidden, num_classes))

    def forward(self, x, edge_index, batch, num_graphs):
        """x: (N, in) nodes of a block-diagonal batch, batch: (N,) graph ids -> (num_graphs, classes)."""
        h = self.embed(x)
        for conv, norm in zip(self.convs, self.norms):
            h = h + F.dropout(F.relu(conv(norm(h), edge_index)), self.dropout, self.training)
        return self.head(global_pool(h, batch, num_graphs, self.readout))

    def forward_dense(self, x, adj):
        """Reference: x (B, N, in), adj (B, N, N) -> (B, classes)."""
        h = self.embed(x)
        for conv, norm in zip(self.convs, self.norms):
            h = h + F.dropout(F.relu(conv.forward_dense(norm(h), adj)), self.dropout, self.training)
        return self.head(dense_pool(h, self.readout))
