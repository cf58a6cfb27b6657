"""Compress and decompress files with a language model, and compare with gzip, bzip2 and xz.

    python sample.py compress input.txt -o input.lmz          # the folder's own model (train.py's checkpoint)
    python sample.py decompress input.lmz -o input.txt
    python sample.py bench heldout.txt book.txt               # table: ours vs gzip -9, bzip2 -9, xz -9
    python sample.py curve runs/lm_compression/ckpt_step*.pt --file heldout.txt   # rate vs training time
    python sample.py --hf-model EleutherAI/pythia-160m compress input.txt -o input.lmz
    python sample.py --to-float "The quick brown fox jumps over the lazy dog"

A compressed file is a header followed by the arithmetic code. The header names the model and the sha256
of its weights, every setting that shapes the model's computation (device type, CPU threads, chunk size,
batch size, window), the original length and its CRC32, the payload length, and its own CRC32. The
decoder replays the encoder's computation with those settings, so both see bit-identical probabilities.
"""
import argparse
import bz2
import csv
import gzip
import lzma
import math
import os
import struct
import sys
import time
import zlib
from fractions import Fraction
from pathlib import Path

import torch

import model as lm_model
from train import load_checkpoint, model_from_checkpoint

MAGIC, VERSION = b"LMZ\x1a", 1
DEFAULT_CHECKPOINT = os.path.join("runs", "lm_compression", "ckpt.pt")
IMAGES = Path(__file__).resolve().parent.parent / "images"


class CompressionError(Exception):
    """Anything wrong with a compressed file or a model: reported as one line, never a traceback."""


# ----------------------------------------------------------------------------------------------------
# Models and their tokenisers: bytes <-> symbol ids


class ByteTokenizer:
    """The folder's own model codes raw bytes: any file, every byte value."""

    def encode(self, data):
        return list(data)

    def decode(self, ids):
        return bytes(ids)


class HFTokenizer:
    """A Hugging Face tokenizer, used only where it maps the text to ids and back exactly."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, data):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise CompressionError("a --hf-model codes UTF-8 text and this file is not UTF-8; "
                                   "use the folder's byte-level model (--checkpoint) for binary data")
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if self.decode(ids) != data:
            raise CompressionError("this tokenizer does not reproduce the text exactly; "
                                   "use the folder's byte-level model (--checkpoint)")
        return ids

    def decode(self, ids):
        return self.tokenizer.decode(ids, clean_up_tokenization_spaces=False).encode("utf-8")


def load_model(args):
    """(lm, tokenizer, model_id) from --hf-model or --checkpoint, on args.device, in eval mode."""
    if args.hf_model:
        import transformers
        transformers.logging.set_verbosity_error()
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(args.hf_model)
            hf = transformers.AutoModelForCausalLM.from_pretrained(args.hf_model, dtype=torch.float32)
        except Exception as e:
            raise CompressionError(f"cannot load Hugging Face model {args.hf_model!r} from the local cache or "
                                   f"the Hub ({type(e).__name__}); check the name or your network")
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if bos is None:
            raise CompressionError(f"{args.hf_model} has neither a BOS nor an EOS token to start a context with")
        lm = lm_model.HFModel(hf, bos, args.window or None)
        return lm.to(args.device), HFTokenizer(tokenizer), f"hf:{args.hf_model}"
    ckpt = load_checkpoint(args.checkpoint)
    lm = model_from_checkpoint(ckpt)
    if args.window:
        lm.block_size = min(args.window, lm.block_size)
    return lm.to(args.device), ByteTokenizer(), f"lm_compression:{os.path.basename(args.checkpoint)}"


# ----------------------------------------------------------------------------------------------------
# The container: header + payload

HEADER = struct.Struct("<4sB32sH8sHIIIQQIQI")  # magic, version, weights sha256, id length, device, threads,
# chunk size, batch size, window, tokens, original length, original CRC32, payload length, payload CRC32;
# then the model id (utf-8) and the CRC32 of everything before it


def pack(model_id, weights, settings, n_tokens, original, payload):
    mid = model_id.encode("utf-8")
    head = HEADER.pack(MAGIC, VERSION, weights, len(mid), settings["device"].encode().ljust(8, b"\0"),
                       settings["threads"], settings["chunk_size"], settings["batch_size"], settings["window"],
                       n_tokens, len(original), zlib.crc32(original), len(payload), zlib.crc32(payload)) + mid
    return head + struct.pack("<I", zlib.crc32(head)) + payload


def unpack(blob):
    """Header fields and payload of a compressed file; CompressionError if it is not one, or is damaged."""
    if len(blob) < 5 or blob[:4] != MAGIC:
        raise CompressionError("not an lm_compression file (bad magic number)")
    if blob[4] != VERSION:
        raise CompressionError(f"unsupported format version {blob[4]} (this tool reads version {VERSION})")
    if len(blob) < HEADER.size:
        raise CompressionError("file is truncated (incomplete header)")
    (_, _, weights, id_len, device, threads, chunk_size, batch_size, window, n_tokens, length, crc,
     payload_len, payload_crc) = HEADER.unpack_from(blob)
    end = HEADER.size + id_len
    if len(blob) < end + 4:
        raise CompressionError("file is truncated (incomplete header)")
    if struct.unpack_from("<I", blob, end)[0] != zlib.crc32(blob[:end]):
        raise CompressionError("header is corrupted (header checksum mismatch)")
    payload = blob[end + 4:]
    if len(payload) != payload_len:
        raise CompressionError(f"file is truncated or has trailing bytes (payload {len(payload)} bytes, "
                               f"header says {payload_len})")
    if zlib.crc32(payload) != payload_crc:
        raise CompressionError("payload is corrupted (payload checksum mismatch)")
    settings = {"device": device.rstrip(b"\0").decode(), "threads": threads, "chunk_size": chunk_size,
                "batch_size": batch_size, "window": window}
    return {"model_id": blob[HEADER.size:end].decode("utf-8", "replace"), "weights": weights,
            "settings": settings, "n_tokens": n_tokens, "length": length, "crc": crc, "payload": payload}


def compress(data, lm, tokenizer, model_id, chunk_size=2048, batch_size=64):
    tokens = tokenizer.encode(data)
    settings = {"device": lm_model.device_of(lm).type, "threads": torch.get_num_threads(),
                "chunk_size": chunk_size, "batch_size": batch_size, "window": lm.block_size}
    payload = lm_model.encode(lm, tokens, chunk_size, batch_size)
    return pack(model_id, lm_model.weights_hash(lm), settings, len(tokens), data, payload)


def decompress(blob, lm, tokenizer, model_id):
    h = unpack(blob)
    if h["weights"] != lm_model.weights_hash(lm):
        raise CompressionError(f"this file was compressed with a different model ({h['model_id']}, weights "
                               f"sha256 {h['weights'].hex()[:12]}...), not {model_id}")
    s = h["settings"]
    if s["device"] != lm_model.device_of(lm).type:
        raise CompressionError(f"this file was compressed on {s['device']}; decompress with --device {s['device']}")
    if s["window"] != lm.block_size:
        raise CompressionError(f"this file was compressed with --window {s['window']}; pass the same")
    threads = torch.get_num_threads()
    torch.set_num_threads(s["threads"])  # the encoder's thread count: same reduction order in every kernel
    try:
        tokens = lm_model.decode(lm, h["payload"], h["n_tokens"], s["chunk_size"], s["batch_size"])
    finally:
        torch.set_num_threads(threads)
    try:
        data = tokenizer.decode(tokens)
    except Exception:  # e.g. an id the tokenizer does not know: only a damaged payload decodes to one
        raise CompressionError("payload is corrupted (decoded symbols the tokenizer cannot map back)")
    if len(data) != h["length"] or zlib.crc32(data) != h["crc"]:
        raise CompressionError("payload is corrupted (checksum of the decoded data does not match); nothing written")
    return data


def write_atomic(path, data):
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def read_file(path):
    if not os.path.isfile(path):
        raise CompressionError(f"input file {path} does not exist")
    return open(path, "rb").read()


# ----------------------------------------------------------------------------------------------------
# The seed's demonstration, done right: a whole sentence as one exact binary fraction in [0, 1)


def to_float(text, lm, tokenizer):
    tokens = tokenizer.encode(text.encode("utf-8"))
    code = lm_model.encode(lm, tokens, chunk_size=0, batch_size=1)
    bits = "".join(f"{b:08b}" for b in code).rstrip("0")
    fraction = Fraction(int(bits or "0", 2), 2 ** len(bits))
    back = tokenizer.decode(lm_model.decode(lm, code, len(tokens), chunk_size=0, batch_size=1))
    decimal = f"{fraction.numerator * 10 ** len(bits) // fraction.denominator:0{len(bits)}d}".rstrip("0") or "0"
    print(f"text:      {text!r} ({len(text.encode())} bytes, {len(tokens)} symbols)")
    print(f"binary:    0.{bits or '0'}  ({len(bits)} bits = {len(bits) / max(1, len(text.encode())):.2f} bits/byte)")
    print(f"decimal:   0.{decimal}  (exact: the fraction is dyadic)")
    print(f"decoded:   {back.decode('utf-8', 'replace')!r}")
    print(f"round trip exact: {back == text.encode('utf-8')}")
    return fraction, back


# ----------------------------------------------------------------------------------------------------


def bench(paths, lm, tokenizer, model_id, args):
    rows = []
    for path in paths:
        data = read_file(path)
        tick = time.time()
        blob = compress(data, lm, tokenizer, model_id, args.chunk_size, args.batch_size)
        encode_s, tick = time.time() - tick, time.time()
        exact = decompress(blob, lm, tokenizer, model_id) == data
        decode_s = time.time() - tick
        n = max(1, len(data))
        rows.append([os.path.basename(path), len(data), len(blob), f"{len(blob) / n:.3f}",
                     f"{8 * len(blob) / n:.2f}", f"{(len(blob) + lm_model.model_bytes(lm)) / n:.2f}",
                     f"{len(gzip.compress(data, 9)) / n:.3f}", f"{len(bz2.compress(data, 9)) / n:.3f}",
                     f"{len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / n:.3f}",
                     f"{len(data) / encode_s:,.0f}", f"{len(data) / decode_s:,.0f}", "yes" if exact else "NO"])
    head = ["file", "raw bytes", "ours bytes", "ours rate", "bits/byte", "adjusted rate", "gzip -9", "bzip2 -9",
            "xz -9e", "encode B/s", "decode B/s", "exact"]
    print(f"model: {model_id} ({lm_model.model_bytes(lm):,} bytes of parameters), chunk {args.chunk_size}, "
          f"batch {args.batch_size}, window {lm.block_size}, device {args.device}, threads {torch.get_num_threads()}")
    print("| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    return rows


def curve(checkpoints, path, args):
    """Coded rate of one file under each checkpoint, against that checkpoint's training time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data, points = read_file(path), []
    for ckpt_path in checkpoints:
        ckpt = load_checkpoint(ckpt_path)
        lm = model_from_checkpoint(ckpt).to(args.device)
        code = lm_model.encode(lm, list(data), args.chunk_size, args.batch_size)
        points.append((ckpt["train_seconds"] / 60, ckpt["step"], 8 * len(code) / max(1, len(data))))
        print(f"{ckpt_path}: step {ckpt['step']}, {ckpt['train_seconds'] / 60:.1f} min of training -> "
              f"{points[-1][2]:.3f} bits/byte ({len(code):,} bytes)")
    points.sort()
    plt.figure(figsize=(6, 4))
    plt.plot([p[0] for p in points], [p[2] for p in points], "o-", label="ours: coded size of the file")
    log = os.path.join(os.path.dirname(checkpoints[0]), "log.csv")  # train.py's held-out loss, if beside it
    if os.path.isfile(log):
        rows = list(csv.DictReader(open(log)))
        plt.plot([float(r["train_seconds"]) / 60 for r in rows], [float(r["val_bits_per_byte"]) for r in rows],
                 ".:", label="held-out loss during training (bits/byte)")
    for name, size in [("gzip -9", len(gzip.compress(data, 9))), ("bzip2 -9", len(bz2.compress(data, 9))),
                       ("xz -9e", len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)))]:
        plt.axhline(8 * size / max(1, len(data)), linestyle="--", color={"gzip -9": "tab:red", "bzip2 -9": "tab:green",
                    "xz -9e": "tab:purple"}[name], label=name, linewidth=1)
    plt.xlabel("training time (minutes, 2-core CPU)")
    plt.ylabel("bits per byte")
    plt.title(f"{os.path.basename(path)}: compressed size vs training time")
    plt.legend(fontsize=8)
    plt.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
    plt.savefig(args.plot, dpi=100)
    print(f"wrote {args.plot}")
    return points


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Lossless compression with a language model and arithmetic coding.")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="the folder's own model (from train.py)")
    p.add_argument("--hf-model", default=None, help="use this Hugging Face causal LM instead (name or local folder)")
    p.add_argument("--chunk-size", type=int, default=2048, help="symbols per independently coded chunk (0: one long context)")
    p.add_argument("--batch-size", type=int, default=64, help="chunks stepped through the model together")
    p.add_argument("--window", type=int, default=0, help="context window in symbols (0: the model's maximum)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"],
                   help="where the model runs; decompress on the same device type as compress")
    p.add_argument("--threads", type=int, default=1, help="CPU threads while compressing (decompress uses the file's)")
    p.add_argument("--seed", type=int, default=0, help="seeds torch (coding itself is deterministic)")
    p.add_argument("--to-float", default=None, metavar="TEXT", help="print TEXT's code as one exact binary fraction")
    sub = p.add_subparsers(dest="command")
    c = sub.add_parser("compress", help="compress a file")
    c.add_argument("input", help="file to compress")
    c.add_argument("-o", "--output", required=True, help="compressed file to write")
    d = sub.add_parser("decompress", help="decompress a file")
    d.add_argument("input", help="file to decompress")
    d.add_argument("-o", "--output", required=True, help="file to write")
    b = sub.add_parser("bench", help="compare with gzip, bzip2, xz on some files")
    b.add_argument("files", nargs="+", help="files to compress")
    cv = sub.add_parser("curve", help="coded rate of a file vs the training time of several checkpoints")
    cv.add_argument("checkpoints", nargs="+", help="checkpoints of one training run")
    cv.add_argument("--file", required=True, help="the file to compress (e.g. the held-out 10%%)")
    cv.add_argument("--plot", default=str(IMAGES / "lm_compression_rate_vs_time.png"), help="picture to write")
    args = p.parse_args(argv)
    if args.command is None and args.to_float is None:
        p.error("give a command (compress, decompress, bench, curve) or --to-float TEXT")
    if args.chunk_size < 0 or args.batch_size < 1 or args.window < 0 or args.threads < 1:
        p.error("--chunk-size and --window must be >= 0, --batch-size and --threads >= 1")
    if args.window == 1:
        p.error("--window must be at least 2")
    return args


def main(argv=None):
    args = get_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        if args.command == "curve":
            curve(args.checkpoints, args.file, args)
            return
        lm, tokenizer, model_id = load_model(args)
        if args.to_float is not None:
            to_float(args.to_float, lm, tokenizer)
        if args.command == "compress":
            data = read_file(args.input)
            blob = compress(data, lm, tokenizer, model_id, args.chunk_size, args.batch_size)
            write_atomic(args.output, blob)
            print(f"{args.input}: {len(data):,} -> {len(blob):,} bytes ({8 * len(blob) / max(1, len(data)):.3f} bits/byte)")
        elif args.command == "decompress":
            data = decompress(read_file(args.input), lm, tokenizer, model_id)
            write_atomic(args.output, data)
            print(f"{args.input}: -> {len(data):,} bytes, checksum ok")
        elif args.command == "bench":
            bench(args.files, lm, tokenizer, model_id, args)
    except CompressionError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
