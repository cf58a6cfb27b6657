"""Speed machinery: the neighbourhood sum of model.py as sparse (CSR) matrix products.

model.neighbourhood_sum is the paper's message passing, out_i = sum_{j -> i} w_ji h_j: gather h_j
along every edge, scale it, index_add_ it onto i. It writes an (E, H, F) message tensor and reads it
back, forwards and backwards, which is memory-bound: 430,336 x 64 floats (110 MB) for a batch of 64
MNIST pixel graphs. `NeighbourhoodSum` computes the same sum as one sparse-dense product per head,
W h with W[i, j] = w_ji, streaming over the E weights instead. train.py and sample.py hand it to the
layers as `aggregate=NeighbourhoodSum.apply`; test_gnns.py checks it against
model.neighbourhood_sum (values, both gradients, and gradcheck in float64).
"""
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")  # used, tested


def row_pointers(index, num_nodes):
    """CSR row pointers of edges sorted by `index`: node i's edges are crow[i]:crow[i + 1]."""
    return F.pad(torch.bincount(index, minlength=num_nodes).cumsum(0), (1, 0))


def sparse_matrix(crow, col, values, num_nodes):
    """The (N, N) CSR matrix with `values` at rows given by `crow`, columns `col`."""
    shape = (num_nodes, num_nodes)
    return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class NeighbourhoodSum(torch.autograd.Function):
    """out_i = sum_{j -> i} w_ji h_j for every head, equal to model.neighbourhood_sum, in O(E).

    One sparse-dense product per head with the matrix W[i, j] = w_ji in CSR form (edges sorted by
    destination are already its rows); on a batch of 64 MNIST pixel graphs the index_add_ version
    was 6-10x slower. Each head's features are first copied into one contiguous (N, F) slab,
    because the CPU sparse kernel is ~3x slower on the strided view h[:, k], and each product writes
    straight into its slab of the output, with no stacking copy. torch's own autograd through a CSR
    matrix whose values need a gradient took over a minute per call, so the backward is written out:
        dL/dh = W^T dL/dout                 (the same product on the transposed graph)
        dL/dw_ji = <dL/dout_i, h_j>         (only at the E stored positions: a sampled product)
    Edges must be sorted by destination, as `prepare_edges` and `block_diagonal` leave them."""

    @staticmethod
    def forward(ctx, weight, h, edge_index):
        """weight (E, H), h (N, H, F), edge_index (2, E) -> (N, H, F)."""
        src, dst = edge_index
        num_nodes, heads = h.shape[:2]
        if dst.numel() > 1 and bool((dst[1:] < dst[:-1]).any()):
            raise ValueError("edges must be sorted by destination: build them with prepare_edges")
        crow = row_pointers(dst, num_nodes)                                # (N + 1,)
        weight_per_head = weight.t().contiguous()                          # (H, E)
        h_per_head = h.transpose(0, 1).contiguous()                        # (H, N, F)
        out = torch.empty_like(h_per_head)
        for k in range(heads):
            W = sparse_matrix(crow, src, weight_per_head[k], num_nodes)
            torch.mm(W, h_per_head[k], out=out[k])
        ctx.save_for_backward(weight, h_per_head, edge_index, crow)
        return out.transpose(0, 1)

    @staticmethod
    def backward(ctx, grad_out):
        weight, h_per_head, edge_index, crow = ctx.saved_tensors
        src, dst = edge_index
        heads, num_nodes = h_per_head.shape[:2]
        grad_per_head = grad_out.transpose(0, 1).contiguous()             # (H, N, F)
        grad_weight = grad_h = None
        if ctx.needs_input_grad[0]:
            pattern = sparse_matrix(crow, src, weight.new_zeros(src.numel()), num_nodes)
            grad_weight = torch.stack([  # <dL/dout_i, h_j> at the stored positions only: (E, H)
                torch.sparse.sampled_addmm(pattern, grad_per_head[k], h_per_head[k].T,
                                           beta=0.0).values() for k in range(heads)], 1)
        if ctx.needs_input_grad[1]:
            by_source = torch.argsort(src, stable=True)             # the transposed graph's rows
            crow_t, col_t = row_pointers(src, num_nodes), dst[by_source]
            weight_t = weight[by_source].t().contiguous()
            grad_h = torch.empty_like(grad_per_head)
            for k in range(heads):
                W_t = sparse_matrix(crow_t, col_t, weight_t[k], num_nodes)
                torch.mm(W_t, grad_per_head[k], out=grad_h[k])
            grad_h = grad_h.transpose(0, 1)                                # (N, H, F)
        return grad_weight, grad_h, None
