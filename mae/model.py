"""Masked Autoencoders Are Scalable Vision Learners (He et al., CVPR 2022), arXiv:2111.06377

Read top to bottom in the paper's order (Sec. 3):
  patchify / unpatchify, PatchEmbed  the image as a sequence of N = (H/p)(W/p) patches, embedded
  get_2d_sincos_pos_embed            the fixed 2-D sine-cosine position embeddings
  random_masking                     "Masking": shuffle each sample's patches by argsort of noise,
                                     keep the first
  Attention, MLP, Block              a standard pre-norm ViT block
  MAEEncoder                         "MAE encoder": a ViT on the visible patches only (+ [CLS])
  MAEDecoder                         "MAE decoder": narrow and shallow, sees the visible tokens
                                     + shared mask tokens
  MaskedAutoencoder.forward_loss     "Reconstruction target": MSE on the masked patches,
                                     optionally of per-patch normalised pixels
  ViTClassifier                      the encoder reused for linear probing and fine-tuning (Sec. 4)

Parameter names are the paper's code's (and timm's): patch_embed.proj, cls_token, pos_embed, blocks
(norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2), norm; decoder_embed, mask_token,
decoder_pos_embed, decoder_blocks, decoder_norm, decoder_pred; head.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# Patches


def patchify(imgs, patch_size):
    """(B, C, H, W) -> (B, N, p*p*C): patches in row-major order, each flattened as (p, p, C)
    like the paper's code."""
    B, C, H, W = imgs.shape
    p = patch_size
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)  # (B, h, w, p, p, C)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(x, patch_size, channels):
    """(B, N, p*p*C) -> (B, C, H, W); the inverse of patchify for a square grid."""
    B, N, _ = x.shape
    p = patch_size
    h = w = int(math.isqrt(N))
    x = x.reshape(B, h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(B, channels, h * p, w * p)


# --------------------------------------------------------------------------------------------------
# Position embeddings: fixed 2-D sine-cosine (the paper: "we use the sine-cosine version", in the
# encoder and in the decoder)


def get_1d_sincos_pos_embed(embed_dim, positions):
    """positions (M,) -> (M, embed_dim): [sin(pos * omega_i), cos(pos * omega_i)],
    omega_i = 1 / 10000^(2i / D)."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = positions.double()[:, None] * omega[None, :]  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """(grid_size**2 [+1], embed_dim): half the channels encode the column, half the row;
    a zero row for [CLS] (Sec. 3, "MAE encoder" and "MAE decoder": sine-cosine embeddings)."""
    assert embed_dim % 4 == 0, "2-D sin-cos embeddings need embed_dim divisible by 4"
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    column = get_1d_sincos_pos_embed(embed_dim // 2, cols.flatten())  # (N, D/2), x
    row = get_1d_sincos_pos_embed(embed_dim // 2, rows.flatten())  # (N, D/2), y
    emb = torch.cat([column, row], dim=1)  # (N, D)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


# --------------------------------------------------------------------------------------------------
# Masking


def num_visible(num_patches, mask_ratio):
    """How many patches each sample keeps: round(N * (1 - mask_ratio)), at least one."""
    return max(1, round(num_patches * (1 - mask_ratio)))


def random_masking(x, mask_ratio):
    """Per-sample random masking by argsort of uniform noise (Sec. 3, "Masking").

    x: (B, N, D) patch tokens. Returns the visible tokens (B, N_vis, D), the binary mask (B, N)
    with 0 = keep and 1 = masked in the original patch order, and ids_restore (B, N) that undoes
    the shuffle.
    """
    B, N, D = x.shape
    len_keep = num_visible(N, mask_ratio)
    noise = torch.rand(B, N, device=x.device)  # a different random permutation for every sample
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first len_keep are kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # the inverse permutation
    ids_keep = ids_shuffle[:, :len_keep]
    x_visible = torch.gather(x, 1, ids_keep[:, :, None].expand(-1, -1, D))  # (B, N_vis, D)
    mask = torch.ones(B, N, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to the original order
    return x_visible, mask, ids_restore


# --------------------------------------------------------------------------------------------------
# The Transformer block (pre-norm, as in ViT)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        assert dim % num_heads == 0, "width must be divisible by the number of heads"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, C/H)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, C/H), softmax(q k^T / sqrt(d)) v
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, dim, mlp_ratio):
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_weights(module):
    """xavier_uniform for Linear layers, as in the paper's code (following the official ViT)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------------------
# Encoder: a ViT that sees only the visible patches


class PatchEmbed(nn.Module):
    """Each p x p patch, flattened, times one matrix: a stride-p convolution, as a matmul."""

    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(patch_size * patch_size * in_chans, embed_dim)

    def forward(self, imgs):
        return self.proj(patchify(imgs, self.patch_size))  # (B, N, D)


class MAEEncoder(nn.Module):
    def __init__(self, img_size=28, patch_size=7, in_chans=1, embed_dim=64, depth=4, num_heads=4,
                 mlp_ratio=4.0):
        super().__init__()
        assert img_size % patch_size == 0, "the image size must be a multiple of the patch size"
        self.patch_size, self.in_chans = patch_size, in_chans
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        pos_embed = get_2d_sincos_pos_embed(embed_dim, self.grid_size, cls_token=True)[None]
        self.register_buffer("pos_embed", pos_embed, persistent=False)  # (1, N+1, D), fixed
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.apply(init_weights)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, imgs, mask_ratio=0.0):
        """imgs (B, C, H, W) -> latent (B, 1 + N_vis, D), mask (B, N), ids_restore (B, N)
        (Sec. 3, "MAE encoder": a ViT applied only on visible, unmasked patches).

        With mask_ratio = 0 (probing, fine-tuning) every patch is kept, in order, and mask and
        ids_restore are None.
        """
        x = self.patch_embed(imgs)  # (B, N, D)
        x = x + self.pos_embed[:, 1:, :]  # added before masking: visible tokens keep their place
        mask = ids_restore = None
        if mask_ratio > 0:
            x, mask, ids_restore = random_masking(x, mask_ratio)  # (B, N_vis, D)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + N_vis, D): the only tokens the encoder pays for
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore


# --------------------------------------------------------------------------------------------------
# Decoder: narrow and shallow, sees the full set of tokens


class MAEDecoder(nn.Module):
    def __init__(self, num_patches, patch_dim, embed_dim=64, decoder_embed_dim=32, decoder_depth=2,
                 decoder_num_heads=4, mlp_ratio=4.0):
        super().__init__()
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)  # encoder -> decoder width
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))  # one vector, shared
        grid_size = int(math.isqrt(num_patches))
        pos_embed = get_2d_sincos_pos_embed(decoder_embed_dim, grid_size, cls_token=True)[None]
        # its own position embeddings: mask tokens have no position otherwise
        self.register_buffer("decoder_pos_embed", pos_embed, persistent=False)
        self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, mlp_ratio)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_dim)  # one pixel vector per patch
        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent, ids_restore):
        """latent (B, 1 + N_vis, D_enc), ids_restore (B, N) -> predicted pixels (B, N, p*p*C)
        (Sec. 3, "MAE decoder": encoded visible tokens and mask tokens, in image order)."""
        x = self.decoder_embed(latent)  # (B, 1 + N_vis, D_dec)
        B, T, D = x.shape
        N = ids_restore.shape[1]
        mask_tokens = self.mask_token.expand(B, N + 1 - T, -1)  # (B, N - N_vis, D_dec)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # (B, N, D_dec), still in shuffled order
        x_ = torch.gather(x_, 1, ids_restore[:, :, None].expand(-1, -1, D))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed  # (B, 1 + N, D_dec)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]  # drop [CLS]


# --------------------------------------------------------------------------------------------------
# The masked autoencoder


class MaskedAutoencoder(nn.Module):
    def __init__(self, img_size=28, patch_size=7, in_chans=1, embed_dim=64, depth=4, num_heads=4,
                 decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4, mlp_ratio=4.0,
                 norm_pix_loss=True):
        super().__init__()
        self.encoder = MAEEncoder(img_size, patch_size, in_chans, embed_dim, depth, num_heads,
                                  mlp_ratio)
        self.decoder = MAEDecoder(self.encoder.num_patches, patch_size * patch_size * in_chans,
                                  embed_dim, decoder_embed_dim, decoder_depth, decoder_num_heads,
                                  mlp_ratio)
        self.norm_pix_loss = norm_pix_loss

    def forward_loss(self, imgs, pred, mask):
        """Mean squared error in pixel space, averaged over the masked patches only (Sec. 3,
        "Reconstruction target"). With norm_pix_loss the target is each patch's pixels normalised
        by that patch's mean and std.
        """
        target = patchify(imgs, self.encoder.patch_size)  # (B, N, p*p*C)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)  # (B, N), the loss per patch
        return (loss * mask).sum() / mask.sum()  # visible patches (mask = 0) do not count

    def forward(self, imgs, mask_ratio=0.75):
        latent, mask, ids_restore = self.encoder(imgs, mask_ratio)
        pred = self.decoder(latent, ids_restore)  # (B, N, p*p*C)
        return self.forward_loss(imgs, pred, mask), pred, mask


# --------------------------------------------------------------------------------------------------
# The encoder reused for recognition (Sec. 4): linear probing and end-to-end fine-tuning


class ViTClassifier(nn.Module):
    """The MAE encoder, unmasked, with a head on the pooled features.

    head="linprobe": BatchNorm without affine parameters, then a linear layer (the paper's
    Appendix A.2: the BN normalises the pre-trained features, whose scale differs across methods).
    head="finetune": a linear layer. pool="mean" averages the patch tokens (the paper fine-tunes
    this way); pool="cls" takes the [CLS] token.
    """

    def __init__(self, num_classes, head="finetune", pool="mean", **encoder_kwargs):
        super().__init__()
        self.encoder = MAEEncoder(**encoder_kwargs)
        self.pool = pool
        embed_dim = self.encoder.norm.normalized_shape[0]
        fc = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(fc.weight, std=0.01 if head == "linprobe" else 2e-5)
        nn.init.zeros_(fc.bias)
        if head == "linprobe":
            self.head = nn.Sequential(nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6), fc)
        else:
            self.head = fc

    def features(self, imgs):
        latent, _, _ = self.encoder(imgs, mask_ratio=0.0)  # (B, 1 + N, D)
        return latent[:, 1:, :].mean(dim=1) if self.pool == "mean" else latent[:, 0, :]  # (B, D)

    def forward(self, imgs):
        return self.head(self.features(imgs))


def layer_id(name, depth):
    """0 for the patch embedding and [CLS], i + 1 for block i, depth + 1 for the final norm and
    the head."""
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    if name.startswith(("encoder.patch_embed", "encoder.cls_token")):
        return 0
    return depth + 1


def param_groups_lrd(model, weight_decay, layer_decay):
    """Layer-wise lr decay (Clark et al. 2020, used by the paper for fine-tuning):
    lr scale = layer_decay^(L+1-id).

    No weight decay on biases and norm weights (1-D parameters), as in the paper's code.
    """
    depth = len(model.encoder.blocks)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = 0.0 if p.ndim == 1 or name.endswith("cls_token") else weight_decay
        lid = layer_id(name, depth)
        key = (lid, decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": decay,
                           "lr_scale": layer_decay ** (depth + 1 - lid)}
        groups[key]["params"].append(p)
    return list(groups.values())
