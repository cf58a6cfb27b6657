"""Fast Feedforward Networks (Belcak & Wattenhofer, 2023, arXiv:2308.14711), and dense baselines.

An FFF of depth d is a balanced binary tree: 2^d - 1 node networks that each decide "left or right"
and 2^d leaves that are small feed-forward networks. Training mixes all leaves, weighted by the
probability of the path to each (soft); inference walks one path and runs one leaf (hard), so its
cost grows with d, not with the 2^d leaves. Nodes are stored in heap order: node i has children
2i+1 (left) and 2i+2 (right), the nodes of level k are 2^k - 1 ... 2^(k+1) - 2, and leaf j is
reached from heap index 2^d - 1 + j. Equation numbers (Eq. 1-5) are those of fff/README.md.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def bernoulli_entropy(logits):
    """H(c) = -c log c - (1 - c) log(1 - c) for c = sigmoid(logits), stably from logits (Eq. 4)."""
    c = torch.sigmoid(logits)
    return c * F.softplus(-logits) + (1 - c) * F.softplus(logits)


class FFF(nn.Module):
    """input -> FFF -> output. Nodes: input -> node_width (ReLU) -> 1 logit; leaves: input ->
    leaf_width (ReLU) -> output.

    The parameters of all nodes (and of all leaves) live in stacked tensors, so that training
    evaluates them with one matmul and inference gathers just the ones on each sample's path.
    """

    def __init__(self, input_width, output_width, depth=3, leaf_width=32, node_width=32):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if min(input_width, output_width, leaf_width, node_width) < 1:
            raise ValueError("input, output, leaf and node widths must be positive")
        self.depth = depth
        self.num_nodes, self.num_leaves = 2**depth - 1, 2**depth

        def stacked(count, fan_in, fan_out):  # `count` independent nn.Linear(fan_in, fan_out) inits
            bound = fan_in**-0.5
            weight = nn.Parameter(torch.empty(count, fan_in, fan_out).uniform_(-bound, bound))
            bias = nn.Parameter(torch.empty(count, fan_out).uniform_(-bound, bound))
            return weight, bias

        self.node_w1, self.node_b1 = stacked(self.num_nodes, input_width, node_width)
        self.node_w2, self.node_b2 = stacked(self.num_nodes, node_width, 1)
        self.leaf_w1, self.leaf_b1 = stacked(self.num_leaves, input_width, leaf_width)
        self.leaf_w2, self.leaf_b2 = stacked(self.num_leaves, leaf_width, output_width)

    def node_logits(self, x):
        """Every node's decision logit for every sample; c_n(x) = sigmoid(logit) = P(right at n)."""
        h = F.relu(torch.einsum("bi,nih->bnh", x, self.node_w1) + self.node_b1)  # (B, nodes, width)
        logits = torch.einsum("bnh,nho->bno", h, self.node_w2).squeeze(-1)  # (B, nodes)
        return logits + self.node_b2.squeeze(-1)

    def mixture(self, logits):
        """Path probabilities of all leaves: products of the decisions on the way down (sum 1)."""
        c = torch.sigmoid(logits)  # (B, nodes), c_n(x), Eq. 1
        path = torch.ones_like(c[:, :1])  # (B, 1): the root is reached with probability 1
        for k in range(self.depth):  # level k: nodes 2^k - 1 ... 2^(k+1) - 2
            c_k = c[:, 2**k - 1 : 2 ** (k + 1) - 1]  # (B, 2^k)
            path = torch.stack([path * (1 - c_k), path * c_k], dim=-1).flatten(1)  # Eq. 2
        return path  # (B, leaves), P(j | x)

    def leaf_outputs(self, x):
        h = F.relu(torch.einsum("bi,lih->blh", x, self.leaf_w1) + self.leaf_b1)  # (B, leaves, hid)
        return torch.einsum("blh,lho->blo", h, self.leaf_w2) + self.leaf_b2  # (B, leaves, output)

    def forward(self, x, transposition_prob=0.0):
        """Soft (training) forward: sum over leaves of P(path to leaf | x) * leaf(x).
        Returns (output, node logits).

        transposition_prob > 0 swaps each node's children for each sample with that probability: the
        paper's randomised child transpositions against overfragmentation (only while training).
        """
        logits = self.node_logits(x)  # (B, nodes)
        if transposition_prob > 0:
            flip = torch.rand_like(logits) < transposition_prob
            logits = torch.where(flip, -logits, logits)  # c -> 1 - c: l <-> r, Eq. 5
        weights = self.mixture(logits)  # (B, leaves)
        y = torch.einsum("bl,blo->bo", weights, self.leaf_outputs(x))  # (B, output), Eq. 2
        return y, logits

    def leaf_index(self, x):
        """Hard descent: d node evaluations per sample, each with only that node's own weights."""
        node = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # (B,) heap index, root 0
        for _ in range(self.depth):
            w1, b1 = self.node_w1[node], self.node_b1[node]  # gathered: (B, in, node_width), (B, .)
            h = F.relu(torch.bmm(x.unsqueeze(1), w1).squeeze(1) + b1)  # (B, node_width)
            logit = torch.bmm(h.unsqueeze(1), self.node_w2[node]).view(-1) + self.node_b2[node, 0]
            node = 2 * node + 1 + (logit > 0).long()  # right when c > 1/2, Eq. 3
        return node - self.num_nodes  # (B,) leaf index in 0 .. 2^d - 1

    @torch.no_grad()
    def forward_hard(self, x):
        """Hard (inference) forward: run only the leaf at the end of each sample's path: O(d), not
        O(2^d)."""
        leaf = self.leaf_index(x)  # (B,), F_hard(x) = L_leaf(x)(x), Eq. 3
        w1, b1 = self.leaf_w1[leaf], self.leaf_b1[leaf]  # gathered: (B, in, leaf_width), (B, .)
        h = F.relu(torch.bmm(x.unsqueeze(1), w1).squeeze(1) + b1)  # (B, leaf_width)
        return torch.bmm(h.unsqueeze(1), self.leaf_w2[leaf]).squeeze(1) + self.leaf_b2[leaf]


def hardening_loss(logits):
    """The paper's hardening penalty: the batch-mean entropy of each node's decision, summed over
    the nodes (Eq. 4)."""
    return bernoulli_entropy(logits).mean(dim=0).sum()


class FF(nn.Module):
    """The dense baseline: input -> width (ReLU) -> output. Its forward_hard is its forward."""

    def __init__(self, input_width, output_width, width):
        super().__init__()
        if min(input_width, output_width, width) < 1:
            raise ValueError("input, output and hidden widths must be positive")
        self.hidden = nn.Linear(input_width, width)
        self.out = nn.Linear(width, output_width)

    def forward(self, x, transposition_prob=0.0):
        return self.out(F.relu(self.hidden(x))), None

    @torch.no_grad()
    def forward_hard(self, x):
        return self.out(F.relu(self.hidden(x)))
