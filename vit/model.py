"""Vision Transformer (Dosovitskiy et al., ICLR 2021), https://arxiv.org/abs/2010.11929

Pieces in the paper's order (Section 3.1): an image becomes a sequence of flattened patches, a
linear projection embeds them (Eq. 1), a learnable class token and position embeddings are added
(Eq. 1), pre-norm Transformer blocks of multi-head self-attention and an MLP follow (Eqs. 2-3; MSA
in Appendix A, Eqs. 5-8), and a head reads the class token (Eq. 4). Attention rollout (Abnar &
Zuidema, 2020; the paper's Fig. 6 and Appendix D.8) is at the end.

Parameter names are MAE's and timm's (patch_embed.proj, cls_token, pos_embed, blocks.i.norm1,
attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2, norm, head), as in the repo's other vision models.
E is a Linear on flattened patches (the paper's Eq. 1), not timm's equivalent strided Conv2d.

Shape letters: B batch, C channels, H/W image height/width, P patch size, N = HW/P^2 patches,
T = N + 1 tokens, D model width, h heads, D_h = D/h.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def patchify(images, patch_size):
    """x in R^{H x W x C} -> x_p in R^{N x (P^2 C)} (Section 3.1), patches in row-major order."""
    B, C, H, W = images.shape
    P = patch_size
    if H % P or W % P:
        raise ValueError(f"image size {H}x{W} is not divisible by the patch size {P}")
    x = images.reshape(B, C, H // P, P, W // P, P)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, H/P, W/P, P, P, C)
    return x.reshape(B, (H // P) * (W // P), P * P * C)  # (B, N, P^2 C)


def unpatchify(patches, patch_size, channels, height, width):
    """The inverse of patchify: (B, N, P^2 C) -> (B, C, H, W)."""
    B = patches.shape[0]
    P = patch_size
    x = patches.reshape(B, height // P, width // P, P, P, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, H/P, P, W/P, P)
    return x.reshape(B, channels, height, width)


class PatchEmbed(nn.Module):
    """The linear projection E of the flattened patches (Eq. 1): (B, C, H, W) -> (B, N, D)."""

    def __init__(self, patch_size, channels, dim):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(patch_size * patch_size * channels, dim)  # E, Eq. 1

    def forward(self, images):
        x_p = patchify(images, self.patch_size)  # (B, N, P^2 C)
        return self.proj(x_p)  # x_p E, (B, N, D)


class MultiHeadSelfAttention(nn.Module):
    """MSA, Appendix A: [q, k, v] = z U_qkv (Eq. 5), A = softmax(q k^T / sqrt(D_h)) (Eq. 6),
    SA(z) = A v (Eq. 7), MSA(z) = [SA_1(z); ...; SA_h(z)] U_msa (Eq. 8)."""

    def __init__(self, dim, num_heads, dropout=0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by the number of heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)  # U_qkv, Eq. 5
        self.proj = nn.Linear(dim, dim)  # U_msa, Eq. 8
        self.dropout = dropout

    def forward(self, z, return_attention=False):
        B, T, D = z.shape
        qkv = self.qkv(z).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each (B, h, T, D_h), Eq. 5
        if return_attention:  # the explicit equations, to hand A to attention rollout
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, h, T, T)
            A = scores.softmax(dim=-1)  # Eq. 6
            out = A @ v  # (B, h, T, D_h), Eq. 7
        else:  # the same maths in PyTorch's fused kernel
            A = None
            dropout = self.dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(B, T, D)  # concatenate the heads, (B, T, D)
        return self.proj(out), A  # Eq. 8


class MLP(nn.Module):
    """Two layers with a GELU non-linearity (Section 3.1)."""

    def __init__(self, dim, hidden_dim, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """One encoder layer, LayerNorm before every block and a residual after it (Eqs. 2-3)."""

    def __init__(self, dim, num_heads, mlp_dim, dropout=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, z, return_attention=False):
        attended, A = self.attn(self.norm1(z), return_attention)
        z = z + self.dropout(attended)  # z'_l = MSA(LN(z_{l-1})) + z_{l-1}, Eq. 2
        z = z + self.mlp(self.norm2(z))  # z_l = MLP(LN(z'_l)) + z'_l, Eq. 3
        return z, A


class ViT(nn.Module):
    def __init__(self, image_size=28, channels=1, patch_size=7, num_classes=10, dim=128, depth=6,
                 num_heads=4, mlp_dim=256, dropout=0.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not divisible by the patch size "
                             f"{patch_size}")
        self.image_size, self.channels, self.patch_size = image_size, channels, patch_size
        num_patches = (image_size // patch_size) ** 2  # N = HW / P^2
        self.patch_embed = PatchEmbed(patch_size, channels, dim)  # E, Eq. 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))  # x_class, Eq. 1
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)  # E_pos, Eq. 1
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_dim, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)  # the LN of Eq. 4
        # "an MLP with one hidden layer at pre-training time" (Section 3.1), tanh as in the paper's
        # code
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, num_classes))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, images, return_attention=False):
        """images (B, C, H, W) -> logits (B, classes); with return_attention also the list of
        per-layer attention maps, each (B, h, T, T)."""
        tokens = self.patch_embed(images)  # x_p E, (B, N, D)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)  # (B, 1, D)
        z = torch.cat([cls, tokens], dim=1) + self.pos_embed  # z_0, (B, T, D), Eq. 1
        z = self.dropout(z)
        attentions = []
        for block in self.blocks:
            z, A = block(z, return_attention)
            attentions.append(A)
        y = self.norm(z[:, 0])  # y = LN(z_L^0), (B, D), Eq. 4
        logits = self.head(y)
        return (logits, attentions) if return_attention else logits


def attention_rollout(attentions):
    """Attention rollout (Abnar & Zuidema, 2020), as in the paper's Fig. 6: average the heads, add
    the identity for the residual connection, renormalise the rows, multiply through the layers.
    attentions: list of (B, h, T, T). Returns (B, N): how much the class token attends to each
    patch."""
    T = attentions[0].shape[-1]
    rollout = torch.eye(T, device=attentions[0].device).expand(attentions[0].shape[0], T, T)
    for A in attentions:
        A = A.mean(dim=1) + torch.eye(T, device=A.device)  # (B, T, T)
        A = A / A.sum(dim=-1, keepdim=True)
        rollout = A @ rollout
    return rollout[:, 0, 1:]  # class-token row, patch columns
