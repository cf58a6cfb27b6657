"""Language Modeling Is Compression (Deletang, Ruoss et al., ICLR 2024, arXiv:2309.10668).

A language model predicts p(x_t | x_<t); an arithmetic coder turns those predictions into a code
of length  sum_t -log2 p(x_t | x_<t) + O(1)  bits (Sec. 2 of the paper). This file holds, in order:

  1. the byte-level Transformer we train ourselves (with a key/value cache, so that coding steps one
     byte at a time),
  2. a wrapper that gives any Hugging Face causal LM the same small interface,
  3. the quantisation of probabilities to integer frequencies,
  4. an exact integer arithmetic coder (32-bit range, carry handled by "pending" bits),
  5. chunked coding: the input is split into chunks coded with independent contexts, batched through
     the model, and the exact same computation is replayed by the decoder,
  6. speed machinery for large models: a key/value cache allocated once (tested against the model's
     own cache).

Interface shared by both models ("a language model for the coder"):
    lm.vocab_size   number of symbols it predicts     lm.bos_id   symbol fed before the first one
    lm.block_size   most symbols it can attend to     lm.new_cache(capacity) -> an empty cache
    lm(idx, cache, last_only) -> (logits (B, T, V), or (B, 1, V) with last_only; the grown cache)
where `cache` is None or new_cache()'s for a fresh context (idx is then the whole prefix), and
otherwise what the previous call returned (idx is then (B, 1)).
Shape letters: B streams (chunks) stepped together, T positions, C channels, V symbols.
"""
import hashlib
import inspect
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# --------------------------------------------------------------------------------------------------
# 1. The byte-level Transformer (nanoGPT's parts and names, pre-LayerNorm)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, dropout):
        super().__init__()
        assert n_embd % n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.dropout = dropout

    def forward(self, x, kv=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in (q, k, v))  # (B, H, T, hd)
        if kv is not None:  # one new token attends to every cached one: no mask needed
            k, v = torch.cat([kv[0], k], dim=2), torch.cat([kv[1], v], dim=2)  # (B, H, L+1, hd)
        # softmax(q k^T / sqrt(d)) v, causal (Vaswani et al. Eq. 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=kv is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y), (k, v)


class MLP(nn.Module):
    def __init__(self, n_embd, dropout):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, dropout):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x, kv=None):
        a, kv = self.attn(self.ln_1(x), kv)
        x = x + a
        return x + self.mlp(self.ln_2(x)), kv


class ByteTransformer(nn.Module):
    """Predicts the next byte (256 symbols). Input ids 0..255 are bytes, 256 is BOS (a context's
    start)."""

    def __init__(self, block_size=256, n_layer=4, n_head=4, n_embd=256, dropout=0.0):
        super().__init__()
        self.vocab_size, self.bos_id, self.block_size = 256, 256, block_size
        self.start_token = self.bos_id  # what the coded file's header records
        self.wte = nn.Embedding(257, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, 256, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def new_cache(self, capacity):
        return None  # a small model: its cache grows by concatenation (CausalSelfAttention)

    def forward(self, idx, cache=None, last_only=False):
        """idx (B, T) -> logits (B, T, 256); with a cache, idx is (B, 1) and continues the cached
        context. last_only: the logits of the last position only, (B, 1, 256)."""
        start = 0 if cache is None else cache[0][0].shape[2]
        assert start + idx.shape[1] <= self.block_size, "context longer than block_size"
        pos = torch.arange(start, start + idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        new_cache = []
        for i, block in enumerate(self.h):
            x, kv = block(x, None if cache is None else cache[i])
            new_cache.append(kv)
        x = x[:, -1:] if last_only else x
        return self.lm_head(self.ln_f(x)), new_cache


# --------------------------------------------------------------------------------------------------
# 2. Any Hugging Face causal language model behind the same interface


class HFModel(nn.Module):
    """Wraps `transformers.AutoModelForCausalLM`: its logits and its own key/value cache.

    byte_tokens: None to code the model's tokens (text through its tokenizer), or the ids of its
    256 byte tokens in byte order, to code raw bytes: byte b is fed as token byte_tokens[b], the
    prediction is renormalised over those 256 tokens, and symbol 256 stands for `bos_id` (any file,
    no tokenizer)."""

    def __init__(self, hf_model, bos_id, block_size=None, byte_tokens=None):
        super().__init__()
        self.hf = hf_model.eval()
        config = hf_model.config
        max_positions = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", 2048)
        self.block_size = min(block_size or max_positions, max_positions)
        self.start_token = bos_id  # a token id of the model, whatever the symbols are
        if byte_tokens is None:
            self.vocab_size, self.bos_id = hf_model.get_output_embeddings().weight.shape[0], bos_id
            self.register_buffer("token_ids", None, persistent=False)
        else:  # symbols 0..255 are bytes, 256 the start token
            self.vocab_size, self.bos_id = 256, 256
            token_ids = torch.tensor([*byte_tokens, bos_id])
            self.register_buffer("token_ids", token_ids, persistent=False)
        # transformers >= 5 names the key/value cache `cache`, older versions `past_key_values`;
        # `logits_to_keep` (>= 4.50) spares the output layer at every position but the last
        arguments = inspect.signature(hf_model.forward).parameters
        self.cache_arg = "cache" if "cache" in arguments else "past_key_values"
        self.keep_arg = next((a for a in ("logits_to_keep", "num_logits_to_keep")
                              if a in arguments), None)

    def new_cache(self, capacity):
        return preallocated_cache(self.hf.config, capacity)

    def forward(self, idx, cache=None, last_only=False):
        if self.token_ids is not None:
            idx = self.token_ids[idx]  # symbols -> the model's token ids
        keep = {self.keep_arg: 1} if last_only and self.keep_arg else {}
        out = self.hf(input_ids=idx, use_cache=True, **{self.cache_arg: cache}, **keep)
        logits = out.logits[:, -1:] if last_only else out.logits
        if self.token_ids is not None:
            logits = logits[..., self.token_ids[:256]]  # the bytes' share, renormalised by softmax
        return logits.float(), out[self.cache_arg]


def weights_hash(model):
    """sha256 of every tensor (name, dtype, shape, bytes) in name order: the exact weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


def model_bytes(model):
    """Size of the parameters as stored (what the paper's 'adjusted' rate adds to the compressed
    size); tied weights (one tensor used twice) are counted once."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# 3. Probabilities -> integer frequencies. Encoder and decoder must build bit-identical tables, so
# this is a pure function of the logits: float64 softmax, floor, +1 so that no symbol is ever
# impossible, and the rounding remainder goes to the most probable symbol (the first one on ties).

FREQ_BITS = 24
TOTAL = 1 << FREQ_BITS


def quantize(logits):
    """logits (B, V) -> frequencies (B, V) int32, each >= 1, each row summing to TOTAL."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float64)
    V = probs.shape[-1]
    freqs = probs.mul_(TOTAL - V).floor_().to(torch.int32).add_(1)  # in place: (B, V) is large
    top = logits.argmax(dim=-1, keepdim=True)
    freqs.scatter_add_(1, top, TOTAL - freqs.sum(dim=-1, keepdim=True, dtype=torch.int32))
    return freqs


def cumulative(freqs):
    """(B, V) -> (B, V): cum[s] = sum of freqs up to and including s, so symbol s owns
    [cum[s] - freqs[s], cum[s])."""
    return freqs.cumsum(dim=-1, dtype=torch.int32)


# --------------------------------------------------------------------------------------------------
# 4. Arithmetic coding with integers (Witten, Neal & Cleary 1987). The interval [low, high] of
# 32-bit integers narrows to the symbol's share lo/TOTAL..hi/TOTAL; whenever its leading bit is
# decided it is shifted out. When the interval straddles the middle but lies in the middle half
# (underflow), the next bit is not decided yet: we count it as "pending" and emit it, inverted,
# after the next decided bit. All arithmetic is exact (Python ints): no precision to lose.

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
        """Two more bits pick a point inside the final interval; the decoder reads zeros after the
        end."""
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
        """cum: one row of cumulative frequencies (numpy, V); returns the symbol."""
        width = self.high - self.low + 1
        target = ((self.value - self.low + 1) * total - 1) // width
        s = int(np.searchsorted(cum, target, side="right"))  # the first symbol with cum[s] > target
        cum_lo, cum_hi = (int(cum[s - 1]) if s else 0), int(cum[s])
        self.high = self.low + width * cum_hi // total - 1
        self.low = self.low + width * cum_lo // total
        while True:
            if self.high < HALF:
                pass
            elif self.low >= HALF:
                self.value -= HALF
                self.low, self.high = self.low - HALF, self.high - HALF
            elif self.low >= QUARTER and self.high < 3 * QUARTER:
                self.value -= QUARTER
                self.low, self.high = self.low - QUARTER, self.high - QUARTER
            else:
                break
            self.low, self.high = 2 * self.low, 2 * self.high + 1
            self.value = 2 * self.value + self._next_bit()
        return s


# --------------------------------------------------------------------------------------------------
# 5. Chunked coding (Sec. 3 of the paper: chunks of 2048 bytes, each with its own fresh context).
# The chunks of a group are stepped through the model together, one symbol per step and one forward
# call per step for all of them, always with the same batch shape, the same KV-cache path and the
# same dtype, in encoder and decoder alike; the decoder feeds back the symbols it has just decoded,
# which are the symbols the encoder fed. So both sides compute bit-identical logits, hence identical
# frequency tables. When a context fills the model's block_size, it restarts from BOS + the last
# half-window of symbols (a strided sliding window).


class Stepper:
    """Feeds B streams to the model in lock-step and returns the next-symbol logits of each."""

    def __init__(self, lm, batch_size, steps, device):
        self.lm, self.device = lm, device
        self.capacity = min(lm.block_size, steps + 1)  # the longest context these steps build
        self.history = torch.zeros(batch_size, 0, dtype=torch.long, device=device)  # symbols so far
        self.cache, self.length = None, 0

    def _restart(self):
        keep = self.lm.block_size // 2 - 1
        tail = self.history[:, self.history.shape[1] - min(keep, self.history.shape[1]):]
        bos = torch.full((tail.shape[0], 1), self.lm.bos_id, dtype=torch.long, device=self.device)
        cache = self.lm.new_cache(self.capacity)
        logits, self.cache = self.lm(torch.cat([bos, tail], dim=1), cache, last_only=True)
        self.length = 1 + tail.shape[1]
        return logits[:, -1]

    @torch.no_grad()
    def first(self):
        return self._restart()

    @torch.no_grad()
    def next(self, symbols):
        """symbols: (B,) long, the symbols just coded; returns logits (B, V) for the next ones."""
        self.history = torch.cat([self.history, symbols[:, None]], dim=1)[:, -self.lm.block_size:]
        if self.length >= self.lm.block_size:
            return self._restart()
        logits, self.cache = self.lm(symbols[:, None], self.cache, last_only=True)
        self.length += 1
        return logits[:, -1]


def chunk_groups(lengths, batch_size):
    """Indices of the chunks, in groups of batch_size stepped together."""
    return [list(range(i, min(i + batch_size, len(lengths))))
            for i in range(0, len(lengths), batch_size)]


def padded_rows(chunks, group, device):
    """The group's chunks as one (b, steps) tensor of symbols, 0-padded past a chunk's end."""
    steps = max(len(chunks[i]) for i in group)
    rows = torch.zeros(len(group), steps, dtype=torch.long)
    for b, i in enumerate(group):
        rows[b, :len(chunks[i])] = torch.tensor(chunks[i], dtype=torch.long)
    return rows.to(device)


def device_of(lm):
    return next(lm.parameters()).device


@torch.no_grad()
def encode(lm, chunks, batch_size=64, limit=None, progress=False):
    """chunks: lists of symbols < lm.vocab_size, each coded with its own context -> the arithmetic
    code (bytes), or None as soon as it is longer than `limit` bytes. progress: a tqdm bar."""
    device, coder = device_of(lm), ArithmeticEncoder()
    bar = tqdm(total=sum(map(len, chunks)), desc="compress", unit="sym", disable=not progress,
               leave=False)
    for group in chunk_groups([len(c) for c in chunks], batch_size):
        rows = padded_rows(chunks, group, device)
        steps, arange = rows.shape[1], torch.arange(len(group), device=device)
        stepper = Stepper(lm, len(group), steps, device)
        logits = stepper.first()
        for t in range(steps):
            freqs = quantize(logits)
            cum_hi = cumulative(freqs)[arange, rows[:, t]]
            lo, hi = (cum_hi - freqs[arange, rows[:, t]]).tolist(), cum_hi.tolist()
            for b, i in enumerate(group):
                if t < len(chunks[i]):
                    coder.encode(lo[b], hi[b])
            bar.update(sum(t < len(chunks[i]) for i in group))
            if limit is not None and len(coder.bits) > 8 * limit:
                bar.close()
                return None
            if t + 1 < steps:
                logits = stepper.next(rows[:, t])
    bar.close()
    return coder.finish()


@torch.no_grad()
def decode(lm, data, lengths, batch_size=64, progress=False):
    """The inverse of `encode`: replays its computation, feeding back the decoded symbols.
    lengths: the number of symbols of each chunk. Returns the chunks (lists of symbols)."""
    device, coder = device_of(lm), ArithmeticDecoder(data)
    chunks = [[] for _ in lengths]
    bar = tqdm(total=sum(lengths), desc="decompress", unit="sym", disable=not progress, leave=False)
    for group in chunk_groups(lengths, batch_size):
        steps = max(lengths[i] for i in group)
        stepper = Stepper(lm, len(group), steps, device)
        logits = stepper.first()
        for t in range(steps):
            cum = cumulative(quantize(logits)).cpu().numpy()
            symbols = [0] * len(group)
            for b, i in enumerate(group):
                if t < lengths[i]:
                    symbols[b] = coder.decode(cum[b])
                    chunks[i].append(symbols[b])
            bar.update(sum(t < lengths[i] for i in group))
            if t + 1 < steps:
                logits = stepper.next(torch.tensor(symbols, dtype=torch.long, device=device))
    bar.close()
    return chunks


@torch.no_grad()
def code_length_bits(lm, chunks, batch_size=64):
    """sum_t -log2 q(x_t) of each chunk under the quantised frequencies q, without the coder."""
    device, bits = device_of(lm), [0.0] * len(chunks)
    for group in chunk_groups([len(c) for c in chunks], batch_size):
        rows = padded_rows(chunks, group, device)
        steps, arange = rows.shape[1], torch.arange(len(group), device=device)
        stepper = Stepper(lm, len(group), steps, device)
        logits = stepper.first()
        for t in range(steps):
            q = quantize(logits)[arange, rows[:, t]].tolist()
            for b, i in enumerate(group):
                if t < len(chunks[i]):
                    bits[i] -= math.log2(q[b] / TOTAL)
            if t + 1 < steps:
                logits = stepper.next(rows[:, t])
    return bits


# --------------------------------------------------------------------------------------------------
# 6. Speed: a key/value cache allocated once. A Hugging Face model's default cache grows by
# torch.cat, which copies every cached key and value at every step: with 55 chunks of 700 tokens in
# a 30-layer model that is gigabytes per step, as much memory traffic as the model's weights. This
# cache writes each step's keys and values into buffers sized for the whole group and hands the
# attention a view of the filled part: same values, same attention kernel
# (test_preallocated_cache_matches_the_models_own).


def preallocated_cache(config, capacity):
    """An empty cache for `config`'s model that holds `capacity` positions without ever copying
    them, or None (the model's own cache) when this version of transformers or the model's layer
    kinds (sliding windows, linear attention, ...) do not allow it."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:  # transformers < 4.56: the model keeps its own cache
        return None

    class PreallocatedLayer(DynamicLayer):
        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states, value_states)
            B, H, _, D = key_states.shape
            self.key_buffer = key_states.new_empty(B, H, capacity, D)
            self.value_buffer = value_states.new_empty(B, H, capacity, value_states.shape[-1])
            self.length = 0

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start, self.length = self.length, self.length + key_states.shape[-2]
            self.key_buffer[:, :, start:self.length] = key_states
            self.value_buffer[:, :, start:self.length] = value_states
            self.keys = self.key_buffer[:, :, :self.length]  # (B, H, L, D) views: nothing copied
            self.values = self.value_buffer[:, :, :self.length]
            return self.keys, self.values

    cache = DynamicCache(config=config)
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [PreallocatedLayer() for _ in cache.layers]
    return cache
