"""CLIP at MNIST scale: "Learning Transferable Visual Models From Natural Language Supervision".

Radford et al., 2021, https://arxiv.org/abs/2103.00020. Read top to bottom in the paper's order:
the tokenizer and the text encoder (Sec. 2.4, a GPT-2-style Transformer with nanoGPT's part names:
wte, wpe, h, ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj, ln_f), the image encoder
(Sec. 2.4, here a small CNN), the joint embedding with a learned temperature and the symmetric loss
(Sec. 2.3, Figure 3), then zero-shot classification with prompt ensembles (Sec. 3.1.2, 3.1.4) and
text -> image search. Last, below the paper's plain computation, one speed-up that training uses:
each distinct caption of a batch encoded once (unique_captions), exact, tested against the plain
CLIP.encode_text.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

PAD, SOT, EOT = 0, 1, 2  # padding, [SOS] and [EOS] of Sec. 2.4


class CharTokenizer:
    """Characters to ids: [SOS] text [EOS] then padding. Lower-cases and collapses spaces first.

    The paper uses a 49,152-token BPE vocabulary; with captions made of a few dozen words,
    characters are enough and any new phrasing made of these characters can be read (no unknown
    words).
    """

    CHARS = " abcdefghijklmnopqrstuvwxyz0123456789'-,.:/"

    def __init__(self, context_length=48, chars=CHARS):
        self.context_length = context_length
        self.chars = chars
        self.stoi = {c: i + 3 for i, c in enumerate(chars)}
        self.vocab_size = len(chars) + 3

    @staticmethod
    def normalize(text):
        return " ".join(text.lower().split())

    def encode(self, text):
        """One caption -> [SOT, ids..., EOT]. ValueError (one line): empty, unknown or too long."""
        text = self.normalize(text)
        if not text:
            raise ValueError("empty text: give a caption such as 'a handwritten seven'")
        unknown = sorted({c for c in text if c not in self.stoi})
        if unknown:
            raise ValueError(f"unknown characters {''.join(unknown)!r} in {text!r}; "
                             f"known: {self.chars!r}")
        if len(text) + 2 > self.context_length:
            raise ValueError(f"text of {len(text)} characters is longer than "
                             f"{self.context_length - 2}: {text!r}")
        return [SOT] + [self.stoi[c] for c in text] + [EOT]

    def decode(self, ids):
        return "".join(self.chars[i - 3] for i in ids if i > EOT)

    def __call__(self, texts):
        """A list of captions -> (B, context_length) ids, padded after [EOS]."""
        tokens = torch.full((len(texts), self.context_length), PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            tokens[row, :len(ids)] = torch.tensor(ids)
        return tokens


class CausalSelfAttention(nn.Module):
    def __init__(self, width, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.c_attn = nn.Linear(width, 3 * width)  # query, key and value in one matmul
        self.c_proj = nn.Linear(width, width)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)
                   for t in (q, k, v))  # (B, H, T, C/H)
        # Masked self-attention (Sec. 2.4): position t sees tokens <= t, so the padding after [EOS]
        # never reaches the [EOS] feature.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, C/H)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-norm Transformer block (GPT-2 style, as CLIP's text encoder)."""

    def __init__(self, width, num_heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, num_heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextEncoder(nn.Module):
    """Causal Transformer; a caption's feature is the top layer's activation at [EOS] (Sec. 2.4)."""

    def __init__(self, vocab_size, context_length, width, layers, num_heads):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, width)  # token embeddings
        self.wpe = nn.Parameter(torch.randn(context_length, width) * 0.01)  # position embeddings
        self.h = nn.Sequential(*[Block(width, num_heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(width)

    def forward(self, tokens):
        x = self.wte(tokens) + self.wpe[:tokens.shape[1]]  # (B, T, width)
        x = self.ln_f(self.h(x))
        eot_index = (tokens == EOT).int().argmax(dim=1)  # (B,) the first [EOS] of each row
        return x[torch.arange(tokens.shape[0], device=tokens.device), eot_index]  # (B, width)


class ImageEncoder(nn.Module):
    """Small CNN for 28x28 digits: three 3x3 conv stages (28 -> 14 -> 7), global average pooling.

    The paper's encoders are ResNets and ViTs; at 28x28 a 3-stage CNN (width 16: 24k weights, 1.9M
    multiply-adds per image) learns digit features in one CPU epoch, where a ViT needs many more.
    """

    def __init__(self, width):
        super().__init__()

        def stage(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                    nn.ReLU()]

        self.net = nn.Sequential(*stage(1, width), nn.MaxPool2d(2),             # (B, w, 14, 14)
                                 *stage(width, 2 * width), nn.MaxPool2d(2),     # (B, 2w, 7, 7)
                                 *stage(2 * width, 4 * width),                  # (B, 4w, 7, 7)
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())         # (B, 4w)
        self.out_dim = 4 * width

    def forward(self, images):
        return self.net(images)


class CLIP(nn.Module):
    """Two encoders, each followed by a linear map into the joint space (Figure 3: W_i, W_t)."""

    def __init__(self, vocab_size, context_length=48, embed_dim=64, image_width=16,
                 text_width=32, text_layers=2, text_heads=4):
        super().__init__()
        self.visual = ImageEncoder(image_width)
        self.text = TextEncoder(vocab_size, context_length, text_width, text_layers, text_heads)
        self.image_projection = nn.Linear(self.visual.out_dim, embed_dim, bias=False)  # W_i
        self.text_projection = nn.Linear(text_width, embed_dim, bias=False)            # W_t
        # Learned temperature, "initialized to the equivalent of 0.07" and clipped so that logits
        # are scaled by at most 100 (Sec. 2.5). Stored as log(1/T) so it stays positive.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, images):
        return F.normalize(self.image_projection(self.visual(images)), dim=-1)  # (B, D), ||.|| = 1

    def encode_text(self, tokens):
        return F.normalize(self.text_projection(self.text(tokens)), dim=-1)  # (B, D), ||.|| = 1

    def scale(self):
        return self.logit_scale.clamp(max=math.log(100)).exp()  # 1/T <= 100

    def forward(self, images, tokens):
        return self.encode_image(images), self.encode_text(tokens), self.scale()


def clip_loss(image_features, text_features, logit_scale):
    """Symmetric cross-entropy over the N x N cosine similarities (Figure 3 pseudocode).

    logits[i, j] = exp(t) * <I_i, T_j>; row i's correct column is i (image -> text), and column j's
    correct row is j (text -> image); the loss is the mean of the two cross-entropies.
    """
    logits = logit_scale * image_features @ text_features.t()  # (N, N)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


@torch.no_grad()
def class_text_embeddings(model, tokenizer, captions_per_class, device):
    """Prompt ensembling (Sec. 3.1.4): a class is the mean of its captions' unit embeddings,
    renormalised.

    captions_per_class: C lists of captions. Returns (C, D) unit vectors: the zero-shot classifier
    weights.
    """
    weights = []
    for captions in captions_per_class:
        embeddings = model.encode_text(tokenizer(captions).to(device)).float()  # (M, D)
        weights.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    return torch.stack(weights)  # (C, D)


@torch.no_grad()
def encode_images(model, images, device, batch_size=1000):
    """(N, 1, 28, 28) images -> (N, D) unit embeddings, in batches."""
    return torch.cat([model.encode_image(images[i:i + batch_size].to(device)).float()
                      for i in range(0, len(images), batch_size)])


def zero_shot_predict(image_features, class_weights):
    """Sec. 3.1.2: the predicted class is the caption embedding most similar to the image's."""
    return (image_features @ class_weights.t()).argmax(dim=1)


def precision_at_k(image_features, labels, query_features, query_labels, k=10):
    """Text -> image search: the share of each query's top-k images that have the query's class."""
    top = (query_features @ image_features.t()).topk(k, dim=1).indices  # (Q, k)
    return (labels[top] == query_labels[:, None]).float().mean().item()


# -------------------------------------------------------------------------------------------------
# Speed machinery, not the paper: what training adds to the plain computation above.


def unique_captions(tokens):
    """Each distinct caption of a batch once, cut after the batch's longest [EOS].

    Captions repeat within a batch (10 classes, a few templates: a batch of 128 holds about 88
    distinct ones), so encoding each once skips about a third of the rows, and the cut skips the
    padding after the longest caption. Neither changes the result, beyond float rounding: attention
    is causal and features are computed per row, so
        model.encode_text(unique)[inverse] == model.encode_text(tokens)
    (test_unique_captions_encode_like_the_plain_batch). tokens (B, T) -> (U, T'), inverse (B,).
    """
    length = int((tokens == EOT).int().argmax(dim=1).max()) + 1
    return torch.unique(tokens[:, :length], dim=0, return_inverse=True)
