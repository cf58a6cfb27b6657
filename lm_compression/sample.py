"""Compress and decompress files with a language model, and compare with gzip, bzip2, xz and PNG.

    python sample.py compress input.txt -o input.lmz   # the shipped model (pretrained/)
    python sample.py decompress input.lmz -o input.txt
    python sample.py bench heldout.txt book.txt        # ours vs gzip -9, bzip2 -9, xz -9e, PNG
    python sample.py curve runs/lm_compression/ckpt_step*.pt --file heldout.txt  # rate vs training
    python sample.py --hf-model ~/smollm2 compress input.txt -o input.lmz        # any causal LM
    python sample.py images --dataset mnist --count 128   # test images as raw bytes, to bench
    python sample.py --hf-model ~/smollm2 --hf-bytes bench runs/lm_compression/mnist_test_128.bin
    python sample.py crossover input.txt --file heldout.txt   # rate vs data size (bench.csv)
    python sample.py --to-float "The quick brown fox jumps over the lazy dog"

A compressed file is either stored (the input, raw, after a 10-byte header: the model's code was
not smaller) or coded: a header naming the model and the sha256 of its weights, every setting that
shapes the model's arithmetic (device, dtype, CPU threads, chunk size, batch size, window, the torch
and transformers versions, the CPU instruction set or GPU), the lengths and CRC32s, then the
arithmetic code. The decoder replays the encoder's computation with those settings, so both see
bit-identical probabilities, and it refuses a file whose settings it cannot reproduce.
"""
import bz2
import csv
import gzip
import io
import lzma
import math
import os
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import torch

import model as lm_model
from plumbing import load_checkpoint, load_image_dataset, make_out_dir, parse_config, require, setup

FOLDER = "lm_compression"
MAGIC, VERSION = b"LMZ\x1a", 2
STORED, CODED = 0, 1
STORED_HEADER = 10  # magic, version, mode, CRC32 of the data
SHIPPED = "byte_model.pt"  # pretrained/: the model of the README's table, sha256 in its manifest


@dataclass
class Config:
    """Lossless compression with a language model and arithmetic coding."""
    checkpoint: str = ""  # the folder's own model: "" is the shipped pretrained/byte_model.pt
    hf_model: str | None = None  # a Hugging Face causal LM instead: a local folder or a Hub name
    hf_bytes: bool = False  # code raw bytes via the HF model's 256 byte tokens (any file)
    start_token: str | None = None  # token starting every HF context (default: its BOS, else EOS)
    model_note: str | None = None  # licence and origin of --hf-model, for bench's table
    chunk_size: int = 2048  # bytes per chunk coded with its own context (0: one long context)
    batch_size: int = 64  # chunks stepped through the model together, one forward per step
    window: int = 0  # context window in symbols (0: the model's maximum)
    dtype: Literal["float32", "bfloat16"] = "float32"  # the model's weights and arithmetic
    stored_fallback: bool = True  # store the input raw when the model's code is not smaller
    device: Literal["auto", "cpu", "cuda", "mps"] = "cpu"  # decompress on the same kind
    threads: int = 1  # CPU threads while compressing (decompress uses the file's)
    seed: int = 0  # seeds Python, NumPy and torch (coding itself is deterministic)
    data_dir: str = os.environ.get("DATA_DIR", "data")  # MNIST/, FashionMNIST/ for `images`
    out_dir: str = "runs/lm_compression"  # bench.csv, pictures, image bytes go here
    to_float: str | None = None  # print this text's code as one exact binary fraction

    def __post_init__(self):
        require(self.batch_size >= 1, "--batch-size must be at least 1")
        require(self.threads >= 1, "--threads must be at least 1")
        require(self.window != 1, "--window must be 0 (the model's) or at least 2")


def add_commands(parser):
    sub = parser.add_subparsers(dest="command")
    for name, text in [("compress", "compress a file"), ("decompress", "decompress a file")]:
        command = sub.add_parser(name, help=text)
        command.add_argument("input", help="file to read")
        command.add_argument("-o", "--output", required=True, help="file to write")
    bench = sub.add_parser("bench", help="ours vs gzip, bzip2, xz and PNG; speeds; exactness")
    bench.add_argument("files", nargs="+", help="files to compress")
    bench.add_argument("--png-width", type=int, default=0,
                       help="PNG rows of this many bytes (0: as square as possible, the paper's)")
    curve = sub.add_parser("curve", help="coded rate of a file vs the training time of checkpoints")
    curve.add_argument("checkpoints", nargs="+", help="checkpoints of one training run")
    curve.add_argument("--file", required=True, help="the file to compress (the held-out 10%%)")
    images = sub.add_parser("images", help="write test images as raw bytes, one after another")
    images.add_argument("--dataset", choices=["mnist", "fashion_mnist"], default="mnist")
    images.add_argument("--count", type=int, default=128, help="the first COUNT test images")
    cross = sub.add_parser("crossover", help="rate vs data size: where the adjusted rate crosses")
    cross.add_argument("text", help="classical compressors are measured on prefixes of this file")
    cross.add_argument("--file", required=True, help="plot bench.csv's model rows for this file")
    cross.add_argument("--bench", default=None, help="bench.csv to read (default: in --out-dir)")


class CompressionError(Exception):
    """Anything wrong with a compressed file or a model: reported as one line, never a traceback."""


# --------------------------------------------------------------------------------------------------
# Models and their tokenisers: bytes <-> chunks of symbols


def split_bytes(data, chunk_size, whole_characters=False):
    """Chunks of chunk_size bytes (0: one chunk); with whole_characters each boundary moves back to
    the start of a UTF-8 character, so that every chunk is text on its own."""
    if chunk_size <= 0 or len(data) <= chunk_size:
        return [data] if data else []
    chunks, start = [], 0
    while start < len(data):
        end = min(start + chunk_size, len(data))
        while whole_characters and start < end < len(data) and data[end] & 0xC0 == 0x80:
            end -= 1  # a continuation byte: the character began before it
        while end == start or whole_characters and end < len(data) and data[end] & 0xC0 == 0x80:
            end += 1  # a character longer than chunk_size: the chunk holds it whole
        chunks.append(data[start:end])
        start = end
    return chunks


class ByteTokenizer:
    """Raw bytes are the symbols (the folder's own model, and --hf-bytes): any file."""
    text = False

    def encode(self, data):
        return list(data)

    def decode(self, ids):
        return bytes(ids)


class HFTokenizer:
    """A Hugging Face tokenizer, used only where it maps the text to ids and back exactly."""
    text = True

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, data):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise CompressionError("a --hf-model codes UTF-8 text and this file is not UTF-8; "
                                   "use --hf-bytes or the folder's byte-level model (--checkpoint)")
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if self.decode(ids) != data:
            raise CompressionError("this tokenizer does not reproduce the text exactly (its decode "
                                   "of its encode differs); use --hf-bytes or --checkpoint")
        return ids

    def decode(self, ids):
        return self.tokenizer.decode(ids, clean_up_tokenization_spaces=False).encode("utf-8")


def gpt2_byte_characters():
    """GPT-2's byte-level BPE spells byte b as a printable character (its bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return [table[b] for b in range(256)]


def byte_tokens(tokenizer):
    """Ids of 256 distinct tokens for the 256 byte values: each byte's own single-byte token
    (byte-level BPE, or byte fallback). A byte the vocabulary has no token for (SmolLM2 lacks 21,
    bytes that are rare or impossible in UTF-8 text) borrows one of the last ordinary tokens."""
    vocab, special = tokenizer.get_vocab(), set(tokenizer.all_special_ids)
    for names in [gpt2_byte_characters(), [f"<0x{b:02X}>" for b in range(256)]]:
        ids = [vocab.get(name) for name in names]
        if ids.count(None) <= 32:  # a byte-level vocabulary, perhaps with a few gaps
            spare = (i for i in sorted(vocab.values(), reverse=True)
                     if i not in special and i not in ids)
            return [i if i is not None else next(spare) for i in ids]
    raise CompressionError("--hf-bytes needs a tokenizer with a token for (nearly) each of the 256 "
                           "bytes (byte-level BPE or byte fallback); this one has none")


def load_model(cfg, device):
    """(lm, tokenizer, model_id, note) from --hf-model or --checkpoint, on `device`, eval mode."""
    if device.type == "cuda" and cfg.dtype == "bfloat16":  # an H200 round trip came back wrong
        raise CompressionError("--dtype bfloat16 is refused on CUDA: its kernels do not give the "
                               "decoder the encoder's logits; use --dtype float32 on a GPU")
    dtype = getattr(torch, cfg.dtype)
    if cfg.hf_model:
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.hf_model)
            hf = transformers.AutoModelForCausalLM.from_pretrained(cfg.hf_model).to(dtype)
        except Exception as e:
            raise CompressionError(f"cannot load Hugging Face model {cfg.hf_model!r} from a local "
                                   f"folder, the cache or the Hub ({type(e).__name__}); check the "
                                   f"name or your network")
        start = (tokenizer.get_vocab().get(cfg.start_token) if cfg.start_token else
                 tokenizer.bos_token_id if tokenizer.bos_token_id is not None else
                 tokenizer.eos_token_id)
        if start is None:
            raise CompressionError(f"{cfg.hf_model} has no token {cfg.start_token!r}" if
                                   cfg.start_token else f"{cfg.hf_model} has neither a BOS nor an "
                                   f"EOS token to start a context with; name one: --start-token")
        tokens = byte_tokens(tokenizer) if cfg.hf_bytes else None
        lm = lm_model.HFModel(hf, start, cfg.window or None, tokens)
        note = cfg.model_note or model_card_licence(cfg.hf_model)
        mode = ":bytes" if cfg.hf_bytes else ""
        return (lm.to(device), ByteTokenizer() if cfg.hf_bytes else HFTokenizer(tokenizer),
                f"hf:{cfg.hf_model}{mode}", note)
    if cfg.hf_bytes:
        raise CompressionError("--hf-bytes goes with --hf-model (the folder's model codes bytes)")
    ckpt = load_checkpoint(cfg.checkpoint, FOLDER, keys=["config", "model"], shipped=SHIPPED)
    lm = model_from_checkpoint(ckpt)
    if cfg.window:
        lm.block_size = min(cfg.window, lm.block_size)
    note = "trained by train.py on Tiny Shakespeare's first 90% (MIT, this repository)"
    return (lm.to(device=device, dtype=dtype), ByteTokenizer(),
            f"{FOLDER}:{os.path.basename(cfg.checkpoint or SHIPPED)}", note)


def model_from_checkpoint(ckpt):
    c = ckpt["config"]
    model = lm_model.ByteTransformer(c["block_size"], c["n_layer"], c["n_head"], c["n_embd"], 0.0)
    model.load_state_dict(ckpt["model"])
    return model.eval()


def model_card_licence(name):
    """The `license:` line and the first line of text of a local model folder's README.md (its
    model card: the README's conversion of SmolLM2 writes one), if it has them."""
    card = Path(name) / "README.md"
    lines = card.read_text(errors="replace").splitlines() if card.is_file() else []
    licence = next((x.split(":", 1)[1].strip() for x in lines if x.lower().startswith("license:")),
                   None)
    origin = next((x.strip() for x in lines if x.strip() and x.strip() != "---" and ":" not in x
                   and not x.startswith("#")), "")
    if licence:
        return f"licence {licence} (its model card)" + (f"; {origin}" if origin else "")
    return "licence and origin not stated in the model folder (say them with --model-note)"


# --------------------------------------------------------------------------------------------------
# The container: a stored file, or a header and the arithmetic code


def environment(lm, device):
    """What besides the settings decides the rounding: versions, instruction set or GPU."""
    env = [f"torch {torch.__version__}"]
    if device.type == "cuda":
        env.append(torch.cuda.get_device_name(device))
    elif device.type == "cpu":
        env.append(torch.backends.cpu.get_cpu_capability())
    if isinstance(lm, lm_model.HFModel):
        import transformers
        env += [f"transformers {transformers.__version__}", lm.hf.config._attn_implementation]
    return ", ".join(env)


def coding_settings(lm, chunk_size, batch_size):
    """Every setting that shapes the arithmetic of encoding (the decoder must use the same)."""
    device = lm_model.device_of(lm)
    return {"device": device.type, "dtype": str(next(lm.parameters()).dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "chunk_size": chunk_size, "batch_size": batch_size,
            "window": lm.block_size, "vocab": lm.vocab_size, "start": lm.start_token,
            "environment": environment(lm, device)}


def uniform_lengths(n, chunk_size):
    return [len(c) for c in split_bytes(bytes(n), chunk_size)]


def pack_stored(data):
    return MAGIC + bytes([VERSION, STORED]) + struct.pack("<I", zlib.crc32(data)) + data


# weights (the first 16 bytes of their sha256), device, dtype, threads, chunk size, batch size,
# window, vocabulary, start token, original length and CRC32, payload length and CRC32; then the
# model id and the environment (each a byte of length, then UTF-8), the number of chunk lengths
# (0: the uniform split) and the lengths (LEB128), and the CRC32 of all that
FIELDS = ["weights", "device", "dtype", "threads", "chunk_size", "batch_size", "window", "vocab",
          "start", "length", "crc", "payload_length", "payload_crc"]
HEADER = struct.Struct("<16s8s8sHIIIIIQIQI")


def leb128(numbers):
    out = bytearray()
    for n in numbers:
        while n >= 0x80:
            out.append(n & 0x7F | 0x80)
            n >>= 7
        out.append(n)
    return bytes(out)


def unleb128(blob, start, count):
    numbers, n, shift, i = [], 0, 0, start
    while len(numbers) < count:
        n, shift, i = n | (blob[i] & 0x7F) << shift, shift + 7, i + 1
        if blob[i - 1] < 0x80:
            numbers.append(n)
            n, shift = 0, 0
    return numbers, i


def pack_coded(model_id, weights, settings, lengths, data, payload):
    values = {**settings, "weights": weights[:16], "length": len(data), "crc": zlib.crc32(data),
              "payload_length": len(payload), "payload_crc": zlib.crc32(payload)}
    values["device"], values["dtype"] = values["device"].encode(), values["dtype"].encode()
    listed = [] if lengths == uniform_lengths(sum(lengths), settings["chunk_size"]) else lengths
    texts = [model_id.encode()[:255], settings["environment"].encode()[:255]]
    head = (MAGIC + bytes([VERSION, CODED]) + HEADER.pack(*(values[f] for f in FIELDS))
            + b"".join(bytes([len(t)]) + t for t in texts)
            + struct.pack("<I", len(listed)) + leb128(listed or [sum(lengths)]))
    return head + struct.pack("<I", zlib.crc32(head)) + payload


def unpack(blob):
    """The header (a dict) and payload of a compressed file; CompressionError if it is not one,
    or is damaged. A stored file: the header {"mode": "stored", "crc": ...}, the data as payload."""
    if len(blob) < 6 or blob[:4] != MAGIC:
        raise CompressionError("not an lm_compression file (bad magic number)")
    if blob[4] != VERSION:
        raise CompressionError(f"unsupported format version {blob[4]} (this tool reads version "
                               f"{VERSION})")
    if blob[5] not in (STORED, CODED):
        raise CompressionError("header is corrupted (unknown mode)")
    if blob[5] == STORED:
        if len(blob) < STORED_HEADER:
            raise CompressionError("file is truncated (incomplete header)")
        header, payload = {"mode": "stored", "crc": struct.unpack_from("<I", blob, 6)[0]}, blob[10:]
        if zlib.crc32(payload) != header["crc"]:
            raise CompressionError("stored data is corrupted or truncated (checksum mismatch)")
        return header, payload
    try:
        h = dict(zip(FIELDS, HEADER.unpack_from(blob, 6)), mode="coded")
        i = 6 + HEADER.size
        (h["model"], h["environment"]), i = read_texts(blob, i, 2)
        n_listed, i = struct.unpack_from("<I", blob, i)[0], i + 4
        numbers, end = unleb128(blob, i, max(1, n_listed))
        crc = struct.unpack_from("<I", blob, end)[0]
    except (struct.error, IndexError, UnicodeDecodeError):
        raise CompressionError("file is truncated (incomplete header)")
    if crc != zlib.crc32(blob[:end]):
        raise CompressionError("header is corrupted (header checksum mismatch)")
    h["weights"], h["device"], h["dtype"] = (h["weights"].hex(), h["device"].rstrip(b"\0").decode(),
                                             h["dtype"].rstrip(b"\0").decode())
    h["symbols"], h["chunk_lengths"] = sum(numbers), numbers if n_listed else None
    payload = blob[end + 4:]
    if len(payload) != h["payload_length"]:
        raise CompressionError(f"file is truncated or has trailing bytes (payload {len(payload)} "
                               f"bytes, header says {h['payload_length']})")
    if zlib.crc32(payload) != h["payload_crc"]:
        raise CompressionError("payload is corrupted (payload checksum mismatch)")
    return h, payload


def read_texts(blob, i, count):
    texts = []
    for _ in range(count):
        n = blob[i]
        texts.append(blob[i + 1:i + 1 + n].decode())
        i += 1 + n
    return texts, i


def compress(data, lm, tokenizer, model_id, chunk_size=2048, batch_size=64, stored_fallback=True):
    """The compressed file: coded, or stored when coding would not make it smaller."""
    chunks = [tokenizer.encode(c) for c in split_bytes(data, chunk_size, tokenizer.text)]  # checked
    settings = coding_settings(lm, chunk_size, batch_size)
    payload = lm_model.encode(lm, chunks, batch_size, limit=len(data) if stored_fallback else None,
                              progress=sys.stderr.isatty())
    if payload is None:  # the code outgrew the input: give up early
        return pack_stored(data)
    blob = pack_coded(model_id, lm_model.weights_hash(lm), settings, [len(c) for c in chunks],
                      data, payload)
    return pack_stored(data) if stored_fallback and len(blob) > len(data) + STORED_HEADER else blob


def check_settings(h, lm, model_id):
    """Refuse, before decoding, a file whose arithmetic this model and machine would not repeat."""
    ours = coding_settings(lm, h["chunk_size"], h["batch_size"])
    flags = {"device": "--device", "dtype": "--dtype", "window": "--window", "vocab": "--hf-bytes",
             "start": "--start-token"}
    for key, flag in flags.items():
        if h[key] != ours[key]:
            raise CompressionError(f"this file was compressed with other {flag} ({key} {h[key]}, "
                                   f"here {ours[key]}); pass the same to decode it")
    if h["weights"] != lm_model.weights_hash(lm)[:16].hex():
        raise CompressionError(f"this file was compressed with a different model ({h['model']}, "
                               f"weights sha256 {h['weights'][:12]}...), not {model_id}")
    if h["environment"] != ours["environment"]:
        raise CompressionError(f"this file was compressed where the model's arithmetic may differ "
                               f"({h['environment']}; here {ours['environment']}); decode it with "
                               f"those versions on that kind of machine")


def decompress(blob, lm, tokenizer, model_id):
    h, payload = unpack(blob)
    if h["mode"] == "stored":
        return payload
    check_settings(h, lm, model_id)
    lengths = h["chunk_lengths"] or uniform_lengths(h["symbols"], h["chunk_size"])
    threads = torch.get_num_threads()
    torch.set_num_threads(h["threads"])  # the encoder's: the same reduction order in every kernel
    try:
        chunks = lm_model.decode(lm, payload, lengths, h["batch_size"],
                                 progress=sys.stderr.isatty())
    finally:
        torch.set_num_threads(threads)
    try:
        data = b"".join(tokenizer.decode(c) for c in chunks)
    except Exception:  # e.g. an id the tokenizer does not know: only a damaged payload gives one
        raise CompressionError("payload is corrupted (decoded symbols the tokenizer cannot read)")
    if len(data) != h["length"] or zlib.crc32(data) != h["crc"]:
        raise CompressionError("the decoded data's checksum does not match: the payload is "
                               "corrupted, or this CPU's kernels round differently from the "
                               "encoder's; nothing written")
    return data


def write_atomic(path, data):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(f"{path}.tmp", "wb") as f:
        f.write(data)
    os.replace(f"{path}.tmp", path)


def read_file(path):
    if not os.path.isfile(path):
        raise CompressionError(f"input file {path} does not exist")
    return open(path, "rb").read()


# --------------------------------------------------------------------------------------------------
# The seed's demonstration, done right: a whole sentence as one exact binary fraction in [0, 1)


def to_float(text, lm, tokenizer):
    tokens = tokenizer.encode(text.encode("utf-8"))
    code = lm_model.encode(lm, [tokens], batch_size=1)
    bits = "".join(f"{b:08b}" for b in code).rstrip("0")
    fraction = Fraction(int(bits or "0", 2), 2 ** len(bits))
    back = tokenizer.decode(lm_model.decode(lm, code, [len(tokens)], batch_size=1)[0])
    decimal = f"{fraction.numerator * 10 ** len(bits) // fraction.denominator:0{len(bits)}d}"
    n = len(text.encode())
    print(f"text:      {text!r} ({n} bytes, {len(tokens)} symbols)")
    print(f"binary:    0.{bits or '0'}  ({len(bits)} bits = {len(bits) / max(1, n):.2f} bits/byte)")
    print(f"decimal:   0.{decimal.rstrip('0') or '0'}  (exact: the fraction is dyadic)")
    print(f"decoded:   {back.decode('utf-8', 'replace')!r}")
    print(f"round trip exact: {back == text.encode('utf-8')}")
    return fraction, back


# --------------------------------------------------------------------------------------------------
# Measurements: the paper's table, rate vs training time, rate vs data size


def png_bytes(data, width=0):
    """The data as 8-bit grey PNG rows (optimize=True); width 0: as square as possible, as in the
    paper's PNG baseline."""
    from PIL import Image
    if width <= 0 or len(data) % width:
        width = max(w for w in range(1, math.isqrt(max(1, len(data))) + 1) if len(data) % w == 0)
    buffer = io.BytesIO()
    image = Image.frombytes("L", (width, len(data) // width), data)
    image.save(buffer, format="PNG", optimize=True)
    return len(buffer.getvalue())


def classical_sizes(data, png_width=0):
    return {"gzip -9": len(gzip.compress(data, 9)), "bzip2 -9": len(bz2.compress(data, 9)),
            "xz -9e": len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)),
            "PNG": png_bytes(data, png_width) if data else 0}


BENCH_COLUMNS = ["model", "note", "file", "raw_bytes", "ours_bytes", "stored", "model_bytes",
                 "chunk_size", "window", "dtype", "device", "threads", "batch_size", "encode_s",
                 "decode_s", "exact", "load", "gzip -9", "bzip2 -9", "xz -9e", "PNG"]


def bench(paths, lm, tokenizer, model_id, note, cfg, png_width=0):
    """The paper's table for each file; rows also appended to OUT_DIR/bench.csv."""
    rows, size = [], lm_model.model_bytes(lm)
    for path in paths:
        data, load = read_file(path), os.getloadavg()[0]
        tick = time.perf_counter()
        blob = compress(data, lm, tokenizer, model_id, cfg.chunk_size, cfg.batch_size,
                        cfg.stored_fallback)
        encode_s, tick = time.perf_counter() - tick, time.perf_counter()
        try:
            exact = decompress(blob, lm, tokenizer, model_id) == data
        except CompressionError as e:
            print(f"{path}: {e}")
            exact = False
        decode_s = time.perf_counter() - tick
        rows.append({"model": model_id, "note": note, "file": os.path.basename(path),
                     "raw_bytes": len(data), "ours_bytes": len(blob),
                     "stored": "yes" if blob[5] == STORED else "no", "model_bytes": size,
                     "chunk_size": cfg.chunk_size, "window": lm.block_size, "dtype": cfg.dtype,
                     "device": lm_model.device_of(lm).type, "threads": torch.get_num_threads(),
                     "batch_size": cfg.batch_size, "encode_s": round(encode_s, 4),
                     "decode_s": round(decode_s, 4), "exact": "yes" if exact else "NO",
                     "load": round(max(load, os.getloadavg()[0]), 2),
                     **classical_sizes(data, png_width)})
    print_table(rows)
    path = make_out_dir(cfg.out_dir) / "bench.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, BENCH_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    print(f"appended to {path}")
    return rows


def print_table(rows):
    r = rows[0]
    print(f"model: {r['model']} ({r['model_bytes']:,} bytes of parameters); {r['note']}")
    print(f"chunk {r['chunk_size']} bytes, batch {r['batch_size']}, window {r['window']}, "
          f"{r['dtype']}, device {r['device']}, threads {r['threads']}")
    head = ["file", "raw bytes", "ours bytes", "rate", "bits/byte", "adjusted rate", "gzip -9",
            "bzip2 -9", "xz -9e", "PNG", "encode B/s", "decode B/s", "exact", "load"]
    print("| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for r in rows:
        n = max(1, r["raw_bytes"])
        cells = [r["file"] + (" (stored)" if r["stored"] == "yes" else ""), r["raw_bytes"],
                 r["ours_bytes"], f"{r['ours_bytes'] / n:.3f}", f"{8 * r['ours_bytes'] / n:.2f}",
                 f"{(r['ours_bytes'] + r['model_bytes']) / n:.1f}",
                 *(f"{r[k] / n:.3f}" for k in ["gzip -9", "bzip2 -9", "xz -9e", "PNG"]),
                 *(f"{r['raw_bytes'] / max(r[k], 1e-4):,.0f}" for k in ["encode_s", "decode_s"]),
                 r["exact"], r["load"]]
        print("| " + " | ".join(str(c) for c in cells) + " |")


def curve(checkpoints, path, cfg, device):
    """Coded rate of one file under each checkpoint, against that checkpoint's training time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data, points = read_file(path), []
    for ckpt_path in checkpoints:
        ckpt = load_checkpoint(ckpt_path, FOLDER, keys=["config", "model", "step", "train_seconds"])
        lm = model_from_checkpoint(ckpt).to(device)
        code = lm_model.encode(lm, [list(c) for c in split_bytes(data, cfg.chunk_size)],
                               cfg.batch_size)
        points.append((ckpt["train_seconds"] / 60, ckpt["step"], 8 * len(code) / max(1, len(data))))
        print(f"{ckpt_path}: step {ckpt['step']}, {ckpt['train_seconds'] / 60:.1f} min of training "
              f"-> {points[-1][2]:.3f} bits/byte ({len(code):,} bytes)")
    points.sort()
    plt.figure(figsize=(6, 4))
    plt.plot([p[0] for p in points], [p[2] for p in points], "o-",
             label="ours: coded size of the file")
    log = os.path.join(os.path.dirname(checkpoints[0]), "metrics.csv")  # train.py's, if beside them
    if os.path.isfile(log):
        rows = list(csv.DictReader(open(log)))
        plt.plot([float(r["train_seconds"]) / 60 for r in rows],
                 [float(r["val_bits_per_byte"]) for r in rows], ".:",
                 label="held-out loss during training (bits/byte)")
    colors = {"gzip -9": "tab:red", "bzip2 -9": "tab:green", "xz -9e": "tab:purple"}
    for name, size in classical_sizes(data).items():
        if name in colors:
            plt.axhline(8 * size / max(1, len(data)), linestyle="--", color=colors[name],
                        label=name, linewidth=1)
    plt.xlabel("training time (minutes, 2-core CPU)")
    plt.ylabel("bits per byte")
    plt.title(f"{os.path.basename(path)}: compressed size vs training time")
    plt.legend(fontsize=8)
    plt.tight_layout()
    out = make_out_dir(cfg.out_dir) / "lm_compression_rate_vs_time.png"
    plt.savefig(out, dpi=100)
    print(f"wrote {out}")
    return points


def write_images(dataset, count, cfg):
    """The first `count` test images of MNIST or FashionMNIST, 28x28 bytes each, row by row, one
    image after the other (the paper's other-modality data, as bytes)."""
    images, _, _ = load_image_dataset(dataset, cfg.data_dir, train=False)
    if not 1 <= count <= len(images):
        raise CompressionError(f"--count must be between 1 and {len(images)}")
    path = make_out_dir(cfg.out_dir) / f"{dataset}_test_{count}.bin"
    write_atomic(path, images[:count].numpy().tobytes())
    print(f"wrote {path}: {count} images of 28x28 bytes ({28 * 28 * count:,} bytes)")
    return path


def crossover(text_path, file_name, bench_path, cfg):
    """Rate against data size N: each model's raw rate (bench.csv's rows for `file_name`, this
    --chunk-size and --dtype) and adjusted rate (rate + model size / N), beside the classical
    compressors measured on prefixes of `text_path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not os.path.isfile(bench_path):
        raise CompressionError(f"{bench_path} not found: run bench first")
    rows = [r for r in csv.DictReader(open(bench_path)) if r["file"] == file_name and
            int(r["chunk_size"]) == cfg.chunk_size and r["dtype"] == cfg.dtype]
    if not rows:
        raise CompressionError(f"{bench_path} has no rows for {file_name} with --chunk-size "
                               f"{cfg.chunk_size} and --dtype {cfg.dtype}")
    text = read_file(text_path)
    sizes = [n for n in (2 ** k for k in range(11, 40)) if n < len(text)] + [len(text)]
    measured = {name: [classical_sizes(text[:n])[name] / n for n in sizes]
                for name in ["gzip -9", "bzip2 -9", "xz -9e"]}
    far = 1e12
    plt.figure(figsize=(7, 4.5))
    for name, rates in measured.items():
        label = f"{name} (prefixes of {os.path.basename(text_path)})"
        line, = plt.plot(sizes, rates, lw=1.2, label=label)
        plt.plot([sizes[-1], far], [rates[-1]] * 2, ":", color=line.get_color(), lw=1)
    best = min(rates[-1] for rates in measured.values())
    grid = [10 ** (k / 10) for k in range(30, 121)]
    for r in {r["model"]: r for r in rows}.values():  # the last row of each model
        rate, size = int(r["ours_bytes"]) / int(r["raw_bytes"]), int(r["model_bytes"])
        name = ("our byte model" if r["model"].startswith(FOLDER) else
                r["model"].removeprefix("hf:").rstrip("/").split("/")[-1])
        label = f"{name}, chunks of {r['chunk_size']}" if cfg.chunk_size else f"{name}, one context"
        line, = plt.plot(grid, [rate] * len(grid), "--", lw=1, label=f"{label}: rate")
        plt.plot(grid, [rate + size / n for n in grid], "-", lw=2, color=line.get_color(),
                 label=f"{label}: adjusted ({size / 1e6:,.1f} MB of parameters)")
        if rate < best:
            n = size / (best - rate)  # rate + size / n = best
            plt.plot([n], [best], "o", color=line.get_color())
            plt.annotate(f"{n / 1e6:,.0f} MB", (n, best), textcoords="offset points", xytext=(4, 6),
                         fontsize=8)
            print(f"{label}: adjusted rate reaches the best classical ({best:.3f}) at "
                  f"{n:,.0f} bytes")
    plt.xscale("log")
    plt.yscale("log")
    plt.ylim(0.15, 10)
    ticks = [0.2, 0.3, 0.5, 1, 2, 5, 10]
    plt.yticks(ticks, [str(t) for t in ticks])
    plt.xlim(1e3, far)
    plt.xlabel("data size (bytes); dotted: extrapolated flat from the largest measurement")
    plt.ylabel("compressed size / raw size")
    plt.title("raw and adjusted (+ model size) rate against data size")
    plt.legend(fontsize=6.5, loc="upper right")
    plt.tight_layout()
    out = make_out_dir(cfg.out_dir) / "lm_compression_rate_vs_size.png"
    plt.savefig(out, dpi=100)
    print(f"wrote {out}")
    return out


# --------------------------------------------------------------------------------------------------


def main(argv=None):
    cfg, args = parse_config(Config, argv, extra=add_commands)
    if args["command"] is None and cfg.to_float is None:
        sys.exit("error: give a command (compress, decompress, bench, curve, images, crossover) "
                 "or --to-float TEXT")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS on CUDA
    _, _, _, device = setup(cfg)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        if args["command"] == "curve":
            curve(args["checkpoints"], args["file"], cfg, device)
        elif args["command"] == "images":
            write_images(args["dataset"], args["count"], cfg)
        elif args["command"] == "crossover":
            crossover(args["text"], args["file"],
                      args["bench"] or str(Path(cfg.out_dir) / "bench.csv"), cfg)
        else:
            run_model_command(cfg, args, device)
    except CompressionError as e:
        sys.exit(f"error: {e}")


def run_model_command(cfg, args, device):
    blob = read_file(args["input"]) if args["command"] == "decompress" else None
    if blob is not None and unpack(blob)[0]["mode"] == "stored":  # no model needed
        write_atomic(args["output"], unpack(blob)[1])
        print(f"{args['input']}: stored -> {len(blob) - STORED_HEADER:,} bytes, checksum ok")
        return
    lm, tokenizer, model_id, note = load_model(cfg, device)
    if cfg.to_float is not None:
        to_float(cfg.to_float, lm, tokenizer)
    if args["command"] == "compress":
        data = read_file(args["input"])
        blob = compress(data, lm, tokenizer, model_id, cfg.chunk_size, cfg.batch_size,
                        cfg.stored_fallback)
        write_atomic(args["output"], blob)
        kind = "stored" if blob[5] == STORED else "coded"
        print(f"{args['input']}: {len(data):,} -> {len(blob):,} bytes ({kind}, "
              f"{8 * len(blob) / max(1, len(data)):.3f} bits/byte)")
    elif args["command"] == "decompress":
        data = decompress(blob, lm, tokenizer, model_id)
        write_atomic(args["output"], data)
        print(f"{args['input']}: -> {len(data):,} bytes, checksum ok")
    elif args["command"] == "bench":
        bench(args["files"], lm, tokenizer, model_id, note, cfg, args["png_width"])


if __name__ == "__main__":
    main()
