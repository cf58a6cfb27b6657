"""Language Modeling Is Compression (Deletang, Ruoss et al., ICLR 2024, arXiv:2309.10668).

A language model predicts p(x_t | x_<t); an arithmetic coder turns those predictions into a code of
length  sum_t -log2 p(x_t | x_<t) + O(1)  bits (Sec. 2 of the paper). This file holds, in that order:

  1. the byte-level Transformer we train ourselves (with a key/value cache, so that coding steps one
     byte at a time),
  2. a wrapper that gives any Hugging Face causal LM the same small interface,
  3. the quantisation of probabilities to integer frequencies,
  4. an exact integer arithmetic coder (32-bit range, carry handled by "pending" bits),
  5. chunked coding: the input is split into chunks coded with independent contexts, batched through
     the model, and the exact same computation is replayed by the decoder.

Interface shared by both models ("a language model for the coder"):
    lm.vocab_size   number of symbols it predicts       lm.bos_id     token fed before the first symbol
    lm.block_size   most tokens it can attend to        lm(idx, cache) -> (logits (B, T, V), cache)
where `cache=None` starts a fresh context (idx is then the whole prefix) and otherwise idx is (B, 1).
"""
import hashlib
import inspect
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------
# 1. The byte-level Transformer (nanoGPT-style, pre-LayerNorm)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, dropout):
        super().__init__()
        assert n_embd % n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.dropout = dropout

    def forward(self, x, kv=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        if kv is not None:  # one new token attends to every cached one: no mask needed
            k, v = torch.cat([kv[0], k], dim=2), torch.cat([kv[1], v], dim=2)  # (B, H, L+1, hd)
        # softmax(q k^T / sqrt(d)) v, causal (Vaswani et al. Eq. 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=kv is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y), (k, v)


class Block(nn.Module):
    def __init__(self, n_embd, n_head, dropout):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd),
                                 nn.Dropout(dropout))

    def forward(self, x, kv=None):
        a, kv = self.attn(self.ln1(x), kv)
        x = x + a
        return x + self.mlp(self.ln2(x)), kv


class ByteTransformer(nn.Module):
    """Predicts the next byte (256 symbols). Input ids 0..255 are bytes, 256 is BOS (start of a context)."""

    def __init__(self, block_size=256, n_layer=4, n_head=4, n_embd=256, dropout=0.0):
        super().__init__()
        self.vocab_size, self.bos_id, self.block_size = 256, 256, block_size
        self.tok_emb = nn.Embedding(257, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, 256, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx, cache=None):
        """idx (B, T) -> logits (B, T, 256); with a cache, idx is (B, 1) and continues the cached context."""
        start = 0 if cache is None else cache[0][0].shape[2]
        assert start + idx.shape[1] <= self.block_size, "context longer than block_size"
        pos = torch.arange(start, start + idx.shape[1], device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if cache is None else cache[i])
            new_cache.append(kv)
        return self.head(self.ln_f(x)), new_cache


# ----------------------------------------------------------------------------------------------------
# 2. Any Hugging Face causal language model behind the same interface


class HFModel(nn.Module):
    """Wraps `transformers.AutoModelForCausalLM`: logits over its token vocabulary, its own KV cache."""

    def __init__(self, hf_model, bos_id, block_size=None):
        super().__init__()
        self.hf = hf_model.eval()
        self.vocab_size = hf_model.get_output_embeddings().weight.shape[0]
        self.bos_id = bos_id
        max_positions = getattr(hf_model.config, "max_position_embeddings", None) or getattr(
            hf_model.config, "n_positions", 2048)
        self.block_size = min(block_size or max_positions, max_positions)
        # transformers >= 5.x names the KV cache `cache`, older versions `past_key_values`
        self.cache_arg = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"

    def forward(self, idx, cache=None):
        out = self.hf(input_ids=idx, use_cache=True, **{self.cache_arg: cache})
        return out.logits.float(), out[self.cache_arg]


def weights_hash(model):
    """sha256 of every tensor (name, dtype, shape, bytes) in name order: identifies the exact weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


def model_bytes(model):
    """Size of the parameters as stored (what the paper's 'adjusted' rate adds to the compressed size)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------
# 3. Probabilities -> integer frequencies. Encoder and decoder must build bit-identical tables, so this
# is a pure function of the logits: float64 softmax, floor, +1 so that no symbol is ever impossible,
# and the rounding remainder goes to the most probable symbol (the first one on ties).

FREQ_BITS = 24
TOTAL = 1 << FREQ_BITS


def quantize(logits):
    """logits (B, V) -> frequencies (B, V) int64, each >= 1, each row summing to TOTAL."""
    probs = torch.softmax(logits.double(), dim=-1)
    V = probs.shape[-1]
    freqs = torch.floor(probs * (TOTAL - V)).long() + 1
    top = freqs.argmax(dim=-1, keepdim=True)
    freqs.scatter_add_(1, top, TOTAL - freqs.sum(dim=-1, keepdim=True))
    return freqs


def cumulative(freqs):
    """(B, V) -> (B, V+1): cum[s] = sum of freqs below s, so symbol s owns [cum[s], cum[s+1])."""
    return F.pad(freqs.cumsum(dim=-1), (1, 0))


# ----------------------------------------------------------------------------------------------------
# 4. Arithmetic coding with integers (Witten, Neal & Cleary 1987). The interval [low, high] of 32-bit
# integers narrows to the symbol's share cum[s]/TOTAL..cum[s+1]/TOTAL; whenever its leading bit is
# decided it is shifted out. When the interval straddles the middle but lies in the middle half
# (underflow), the next bit is not decided yet: we count it as "pending" and emit it, inverted, after
# the next decided bit. All arithmetic is exact (Python ints), so there is no precision to lose.

PRECISION = 32
FULL, HALF, QUARTER = 1 << PRECISION, 1 << (PRECISION - 1), 1 << (PRECISION - 2)
assert FREQ_BITS <= PRECISION - 2, "every symbol needs a non-empty interval: TOTAL <= QUARTER"


class ArithmeticEncoder:
    def __init__(self):
        self.low, self.high, self.pending, self.bits = 0, FULL - 1, 0, []

    def _emit(self, bit):
        self.bits.append(bit)
        self.bits.extend([1 - bit] * self.pending)
        self.pending = 0

    def encode(self, cum_lo, cum_hi, total=TOTAL):
        width = self.high - self.low + 1
        self.high = self.low + width * cum_hi // total - 1
        self.low = self.low + width * cum_lo // total
        while True:
            if self.high < HALF:
                self._emit(0)
            elif self.low >= HALF:
                self._emit(1)
                self.low, self.high = self.low - HALF, self.high - HALF
            elif self.low >= QUARTER and self.high < 3 * QUARTER:
                self.pending += 1
                self.low, self.high = self.low - QUARTER, self.high - QUARTER
            else:
                break
            self.low, self.high = 2 * self.low, 2 * self.high + 1

    def finish(self):
        """Two more bits pick a point inside the final interval; the decoder reads zeros after the end."""
        self.pending += 1
        self._emit(0 if self.low < QUARTER else 1)
        bits = self.bits + [0] * (-len(self.bits) % 8)
        return np.packbits(np.array(bits, dtype=np.uint8)).tobytes().rstrip(b"\0")


class ArithmeticDecoder:
    def __init__(self, data):
        self.bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8)).tolist()
        self.pos, self.low, self.high, self.value = 0, 0, FULL - 1, 0
        for _ in range(PRECISION):
            self.value = 2 * self.value + self._next_bit()

    def _next_bit(self):
        self.pos += 1
        return self.bits[self.pos - 1] if self.pos <= len(self.bits) else 0

    def decode(self, cum, total=TOTAL):
        """cum: the row of cumulative frequencies (numpy, V+1); returns the symbol."""
        width = self.high - self.low + 1
        target = ((self.value - self.low + 1) * total - 1) // width
        s = int(np.searchsorted(cum, target, side="right")) - 1
        self.high = self.low + width * int(cum[s + 1]) // total - 1
        self.low = self.low + width * int(cum[s]) // total
        while True:
            if self.high < HALF:
                pass
            elif self.low >= HALF:
                self.value, self.low, self.high = self.value - HALF, self.low - HALF, self.high - HALF
            elif self.low >= QUARTER and self.high < 3 * QUARTER:
                self.value, self.low, self.high = self.value - QUARTER, self.low - QUARTER, self.high - QUARTER
            else:
                break
            self.low, self.high = 2 * self.low, 2 * self.high + 1
            self.value = 2 * self.value + self._next_bit()
        return s


# ----------------------------------------------------------------------------------------------------
# 5. Chunked coding (Sec. 3 of the paper: chunks of 2048 bytes, each with its own fresh context).
# The chunks of a group are stepped through the model together, one symbol per step, always with the
# same batch shape, the same KV-cache path and the same dtype, in encoder and decoder alike; the decoder
# feeds back the symbols it has just decoded, which are the symbols the encoder fed. So both sides
# compute bit-identical logits, hence identical frequency tables. When a context fills the model's
# block_size, it restarts from BOS + the last half-window of symbols (a strided sliding window).


class Stepper:
    """Feeds B streams to the model in lock-step and returns the next-symbol logits of each."""

    def __init__(self, lm, batch_size, device):
        self.lm, self.device = lm, device
        self.history = torch.zeros(batch_size, 0, dtype=torch.long, device=device)  # symbols so far
        self.cache, self.length = None, 0

    def _restart(self):
        keep = self.lm.block_size // 2 - 1
        tail = self.history[:, self.history.shape[1] - min(keep, self.history.shape[1]):]
        bos = torch.full((tail.shape[0], 1), self.lm.bos_id, dtype=torch.long, device=self.device)
        logits, self.cache = self.lm(torch.cat([bos, tail], dim=1), None)
        self.length = 1 + tail.shape[1]
        return logits[:, -1]

    @torch.no_grad()
    def first(self):
        return self._restart()

    @torch.no_grad()
    def next(self, symbols):
        """symbols: (B,) long, the symbols just coded; returns logits (B, V) for the following ones."""
        self.history = torch.cat([self.history, symbols[:, None]], dim=1)[:, -self.lm.block_size:]
        if self.length >= self.lm.block_size:
            return self._restart()
        logits, self.cache = self.lm(symbols[:, None], self.cache)
        self.length += 1
        return logits[:, -1]


def chunk_groups(n, chunk_size, batch_size):
    """Split positions 0..n-1 into chunks (chunk_size <= 0: one chunk), then into groups of chunks."""
    chunk_size = n if chunk_size <= 0 else chunk_size
    chunks = [(s, min(s + chunk_size, n)) for s in range(0, n, max(chunk_size, 1))]
    return [chunks[i:i + batch_size] for i in range(0, len(chunks), batch_size)]


def device_of(lm):
    return next(lm.parameters()).device


@torch.no_grad()
def encode(lm, tokens, chunk_size=2048, batch_size=64):
    """tokens: list of ints < lm.vocab_size -> the arithmetic code (bytes)."""
    device, coder = device_of(lm), ArithmeticEncoder()
    for group in chunk_groups(len(tokens), chunk_size, batch_size):
        steps = max(e - s for s, e in group)
        rows = torch.zeros(len(group), steps, dtype=torch.long)  # symbols, 0-padded past a chunk's end
        for b, (s, e) in enumerate(group):
            rows[b, :e - s] = torch.tensor(tokens[s:e], dtype=torch.long)
        rows = rows.to(device)
        stepper, arange = Stepper(lm, len(group), device), torch.arange(len(group), device=device)
        logits = stepper.first()
        for t in range(steps):
            cum = cumulative(quantize(logits))
            lo, hi = cum[arange, rows[:, t]].tolist(), cum[arange, rows[:, t] + 1].tolist()
            for b, (s, e) in enumerate(group):
                if t < e - s:
                    coder.encode(lo[b], hi[b])
            if t + 1 < steps:
                logits = stepper.next(rows[:, t])
    return coder.finish()


@torch.no_grad()
def decode(lm, data, n, chunk_size=2048, batch_size=64):
    """The inverse of `encode`: replays its computation, feeding back the decoded symbols."""
    device, coder, out = device_of(lm), ArithmeticDecoder(data), [0] * n
    for group in chunk_groups(n, chunk_size, batch_size):
        steps = max(e - s for s, e in group)
        stepper = Stepper(lm, len(group), device)
        logits = stepper.first()
        for t in range(steps):
            cum = cumulative(quantize(logits)).cpu().numpy()
            symbols = [0] * len(group)
            for b, (s, e) in enumerate(group):
                if t < e - s:
                    symbols[b] = out[s + t] = coder.decode(cum[b])
            if t + 1 < steps:
                logits = stepper.next(torch.tensor(symbols, dtype=torch.long, device=device))
    return out


@torch.no_grad()
def code_length_bits(lm, tokens, chunk_size=2048, batch_size=64):
    """sum_t -log2 q(x_t) under the quantised frequencies q, computed without the coder."""
    device, total = device_of(lm), 0.0
    for group in chunk_groups(len(tokens), chunk_size, batch_size):
        steps = max(e - s for s, e in group)
        rows = torch.zeros(len(group), steps, dtype=torch.long)
        for b, (s, e) in enumerate(group):
            rows[b, :e - s] = torch.tensor(tokens[s:e], dtype=torch.long)
        stepper = Stepper(lm, len(group), device)
        logits = stepper.first()
        for t in range(steps):
            freqs = quantize(logits).cpu()
            for b, (s, e) in enumerate(group):
                if t < e - s:
                    total -= math.log2(freqs[b, rows[b, t]].item() / TOTAL)
            if t + 1 < steps:
                logits = stepper.next(rows[:, t].to(device))
    return total
