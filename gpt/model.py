"""A character-level GPT: the decoder-only Transformer of Vaswani et al. (2017), as used by GPT
(Radford et al., 2018).

Read bottom-up, in the paper's order: scaled dot-product attention (Eq. 1), multi-head causal
self-attention, the position-wise feed-forward network (Eq. 2), the pre-LayerNorm block, then the
model with its embeddings and weight tying (GPT's Eq. 2), its loss (GPT's Eq. 1) and
key/value-cached generation. A tiny character tokenizer sits at the
end. The module names are nanoGPT's (wte, wpe, h, ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc,
mlp.c_proj, ln_f, lm_head).
Shapes: B batch, T time (characters), C channels (n_embd), H heads, D = C / H per head,
V vocabulary.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 65     # number of distinct characters
    block_size: int = 256    # longest context the model sees (learned position embeddings)
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.2     # on the embeddings and on each residual branch's output
    attn_dropout: float = 0.2  # on the attention weights (on a CPU: attention about 3x slower)
    bias: bool = False       # biases in Linear and LayerNorm (GPT-2 has them; they barely matter)


def causal_mask(t_query, t_key, device=None):
    """(t_query, t_key) booleans, True where query i may attend to key j: the queries are the last
    t_query positions of a sequence of t_key, so query i sits at position t_key - t_query + i and
    sees the keys up to it."""
    ones = torch.ones(t_query, t_key, dtype=torch.bool, device=device)
    return ones.tril(diagonal=t_key - t_query)


def explicit_attention(q, k, v, mask=None, dropout_p=0.0):
    """Eq. 1 of Vaswani et al., written out: softmax(Q K^T / sqrt(d_k) + mask) V.
    The reference that the fused path is tested against."""
    att = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))           # (B, H, Tq, Tk), Eq. 1
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))  # a future key gets weight exp(-inf) = 0
    att = F.softmax(att, dim=-1)
    att = F.dropout(att, p=dropout_p, training=dropout_p > 0)
    return att @ v                                                  # (B, H, Tq, D)


class CausalSelfAttention(nn.Module):
    """MultiHead(x) = Concat(head_1..head_H) W^O, head_h = Attention(x W^Q_h, x W^K_h, x W^V_h),
    masked causally."""

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.n_head = config.n_head
        # W^Q, W^K, W^V of all heads in one matrix, then W^O
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.attn_dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        # True: F.scaled_dot_product_attention (flash kernels); False: explicit_attention
        self.fused = True

    def forward(self, x, cache=None, start=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for z in (q, k, v))                                # (B, H, T, D)
        if cache is not None:
            # Key/value cache: keys and values of positions < start were computed by earlier calls;
            # store ours at [start, start + T) of preallocated (B, H, block_size, D) buffers and
            # attend over all of them.
            if start == 0:
                cache["k"] = k.new_empty(B, self.n_head, cache["block_size"], C // self.n_head)
                cache["v"] = torch.empty_like(cache["k"])
            cache["k"][:, :, start:start + T] = k
            cache["v"][:, :, start:start + T] = v
            k, v = cache["k"][:, :, :start + T], cache["v"][:, :, :start + T]
        dropout_p = self.dropout if self.training else 0.0
        if self.fused:
            if T == k.size(2):  # no cached past: the plain causal mask, built by the flash kernels
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p,
                                                   is_causal=True)  # Eq. 1, fused
            else:  # one new query sees every cached key; several need the shifted mask
                mask = None if T == 1 else causal_mask(T, k.size(2), x.device)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        else:
            y = explicit_attention(q, k, v, causal_mask(T, k.size(2), x.device), dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # concatenate the heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """FFN(x) = GELU(x W_1 + b_1) W_2 + b_2, applied to each position, inner width 4C
    (GPT uses GELU, not ReLU)."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))  # Eq. 2 of Vaswani et al.


class Block(nn.Module):
    """Pre-LayerNorm residual block (GPT-2): x + Attention(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, start=0):
        x = x + self.attn(self.ln_1(x), cache, start)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)   # token embedding
        self.wpe = nn.Embedding(config.block_size, config.n_embd)   # learned position embedding
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying (Press & Wolf, 2017): one matrix embeds and un-embeds
        self.lm_head.weight = self.wte.weight
        # GPT-2 initialisation: N(0, 0.02), and the projections that write into the residual stream
        # scaled by 1/sqrt(2 n_layer), so that the sum of 2 n_layer residual branches keeps unit
        # scale at init.
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                residual = name.endswith("c_proj.weight")
                std = 0.02 / math.sqrt(2 * config.n_layer) if residual else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def num_params(self):
        return sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()

    def forward(self, idx, targets=None, cache=None, start=0):
        """idx: (B, T) character ids at positions start..start+T-1. Returns logits (B, T, V) and the
        mean cross-entropy of predicting targets (B, T) (None without targets)."""
        B, T = idx.shape
        assert start + T <= self.config.block_size, f"position {start + T - 1} >= block_size"
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))                # h_0 (B, T, C), GPT Eq. 2
        for i, block in enumerate(self.h):
            x = block(x, None if cache is None else cache[i], start)
        logits = self.lm_head(self.ln_f(x))      # (B, T, V), GPT Eq. 2: h_n W_e^T, tied
        if targets is None:
            return logits, None
        # GPT Eq. 1: minus the mean log-likelihood of each next character (nats)
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def configure_optimizer(self, weight_decay, lr, betas, device_type):
        """AdamW with weight decay on the matrices (embeddings, Linear weights) only, not on biases
        and gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        # the fused kernel does the whole update in one pass over memory (CUDA; CPU since torch 2.4)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type in ("cuda", "cpu"))

    @torch.inference_mode()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
               generator=None):
        """Yield (B, 1) new character ids one at a time, continuing the (B, T) prompts idx.

        The context is a window of at most block_size characters. When it is full it is cut to its
        newest half and run through the model again (the position embeddings only go up to
        block_size), so a cache is rebuilt every block_size / 2 steps; in between, each step feeds
        one character against the cached keys and values. use_cache=False recomputes the whole
        window every step: same context, same logits. temperature 0 means greedy decoding.
        """
        block_size = self.config.block_size
        ctx = idx[:, -block_size:]
        cache = [{"block_size": block_size} for _ in self.h] if use_cache else None
        logits, _ = self(ctx, cache=cache)
        for _ in range(max_new_tokens):
            next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            yield next_id
            ctx = torch.cat([ctx, next_id], dim=1)
            if ctx.size(1) > block_size:
                ctx = ctx[:, -max(1, block_size // 2):]
                logits, _ = self(ctx, cache=cache)
            elif use_cache:
                logits, _ = self(next_id, cache=cache, start=ctx.size(1) - 1)
            else:
                logits, _ = self(ctx)

    def generate(self, idx, max_new_tokens, **kwargs):
        """The prompts idx (B, T) followed by max_new_tokens generated characters:
        (B, T + max_new_tokens)."""
        return torch.cat([idx, *self.stream(idx, max_new_tokens, **kwargs)], dim=1)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Draw one id per row of logits (B, V): greedy if temperature is 0, else from
    softmax(logits / temperature) restricted to the top_k most likely ids and to the smallest set
    whose probability reaches top_p (nucleus)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop an id when the mass before it already reaches top_p
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)


class CharTokenizer:
    """Characters <-> integers: the vocabulary is the sorted set of characters of the training
    text."""

    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text)))

    def __len__(self):
        return len(self.chars)

    def unknown(self, text):
        """The characters of text that are not in the vocabulary, in order of first appearance."""
        return list(dict.fromkeys(ch for ch in text if ch not in self.stoi))

    def encode(self, text):
        return [self.stoi[ch] for ch in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)
