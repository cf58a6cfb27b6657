"""Generate text from a checkpoint of gpt/train.py (by default the shipped model,
pretrained/shakespeare_cpu.pt), streaming characters to the terminal as they come.

    python gpt/sample.py -p "ROMEO:"                      # the shipped model, no dataset needed
    python gpt/sample.py --prompt "QUEEN" --max-new-tokens 500 --num-samples 5 --seed 0
    python gpt/sample.py --checkpoint runs/gpt/best.pt    # your own run
    python gpt/sample.py --val-loss                       # loss on the validation split (DATA_DIR)
    python gpt/sample.py --out gpt/generated.txt          # also write all samples to a file
    python gpt/sample.py --benchmark                      # tokens/s with and without the KV cache
    python gpt/sample.py --plot runs/gpt --out-dir images # loss curves -> images/gpt_loss.png
"""
import csv
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from model import GPT, CharTokenizer, GPTConfig
from plumbing import load_checkpoint, make_out_dir, parse_config, pick_device, require
from train import Config as TrainConfig
from train import load_data, load_weights

SHIPPED = "shakespeare_cpu.pt"  # in pretrained/, listed with its sha256 in pretrained/manifest.json


@dataclass
class Config:
    """Generate text from a checkpoint of gpt/train.py (or, with --plot, draw loss curves)."""
    checkpoint: str = ""  # checkpoint written by train.py ("": the shipped model)
    prompt: str = "\n"  # text the samples continue (a newline); its characters must be known
    max_new_tokens: int = 500  # characters to generate per sample
    num_samples: int = 1  # independent samples, generated as one batch
    temperature: float = 0.8  # divide the logits by this; 0 means greedy
    top_k: int = 40  # sample among the k most likely characters (0: all)
    top_p: float = 1.0  # nucleus sampling: smallest set with this much probability (1: off)
    cache: bool = True  # key/value cache (--no-cache: recompute the whole context every step)
    out: str | None = None  # also write the samples to this file, each under a SAMPLE k line
    benchmark: bool = False  # time greedy generation with and without the cache, compare, exit
    val_loss: bool = False  # instead of sampling, print the loss on the validation split, exit
    data_dir: str = os.environ.get("DATA_DIR", "data")  # --val-loss: holds tinyshakespeare/
    plot: tuple[str, ...] | None = None  # instead of sampling, plot these run folders' metrics.csv
    out_dir: str = "runs/gpt"  # where --plot writes gpt_loss.png (--out-dir images: the README's)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: cuda, then mps, then cpu
    seed: int = 0  # seeds torch's sampler
    aliases = {"prompt": "-p", "max_new_tokens": "-n"}  # short flags

    def __post_init__(self):
        require(self.max_new_tokens >= 1 and self.num_samples >= 1,
                "--max-new-tokens and --num-samples must be at least 1")
        require(0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")
        require(self.prompt != "", "--prompt must not be empty")
        require(self.plot != (), "--plot needs at least one run folder")


def load_model(path, device):
    """Rebuild the model and the tokenizer from the checkpoint alone ("": the shipped one, checked
    against its sha256); also the training config, which names the text."""
    ckpt = load_checkpoint(path, "gpt", keys=["config", "model_config", "vocab", "model"],
                           map_location=device, shipped=SHIPPED)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    load_weights(model, ckpt["model"], path or SHIPPED)  # a bf16 file loads into fp32 weights
    return model.to(device).eval(), CharTokenizer(ckpt["vocab"]), ckpt["config"]


@torch.no_grad()
def validation_loss(model, tokenizer, text_file, data_dir, windows=None, batch_size=64):
    """Mean cross-entropy (nats per character) on the validation split of the model's text (the
    last 10%, split as train.py splits it), cut into consecutive windows of block_size characters
    each predicting its next characters; only the first `windows` windows when given."""
    block = model.config.block_size
    cfg = TrainConfig(text_file=text_file, data_dir=data_dir, block_size=block)
    val = load_data(cfg, tokenizer.chars)[2]["val"]
    n = (len(val) - 1) // block if windows is None else min(windows, (len(val) - 1) // block)
    x = val[:n * block].view(n, block)                             # (N, T)
    y = val[1:n * block + 1].view(n, block)                        # x shifted left by one
    device = next(model.parameters()).device
    total = 0.0
    for i in range(0, n, batch_size):
        _, loss = model(x[i:i + batch_size].to(device), y[i:i + batch_size].to(device))
        total += loss.item() * len(x[i:i + batch_size])
    return total / n


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def benchmark(model, prompt, n):
    """Greedy decoding of n characters with and without the key/value cache: tokens/s of each, and
    whether they agree."""
    results = {}
    for use_cache in (True, False):
        model.generate(prompt, 8, temperature=0, use_cache=use_cache)  # warm-up: kernels, allocator
        synchronize(prompt.device)
        start = time.perf_counter()
        out = model.generate(prompt, n, temperature=0, use_cache=use_cache)
        synchronize(prompt.device)  # a GPU runs behind the Python loop: wait for it
        results[use_cache] = (out, n * prompt.size(0) / (time.perf_counter() - start))
    same = torch.equal(results[True][0], results[False][0])
    cached, recomputed = results[True][1], results[False][1]
    print(f"{n} new characters, greedy: cache {cached:,.0f} tokens/s, no cache {recomputed:,.0f} "
          f"tokens/s, speed-up {cached / recomputed:.1f}x, identical outputs: {same}")
    return cached, recomputed, same


def plot_runs(run_dirs, out_dir):
    """Validation (solid) and training (dotted) loss against seconds of training, one colour per
    run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run_dir in run_dirs:
        path = Path(run_dir) / "metrics.csv"
        if not path.is_file():
            sys.exit(f"error: no metrics.csv in {run_dir}")
        with open(path) as f:
            rows = list(csv.DictReader(f))
        seconds = [float(r["train_seconds"]) for r in rows]
        name = f"{Path(run_dir).resolve().name}: " if len(run_dirs) > 1 else ""
        line, = ax.plot(seconds, [float(r["val_loss"]) for r in rows], label=f"{name}validation")
        ax.plot(seconds, [float(r["train_loss"]) for r in rows], ":", color=line.get_color(),
                label=f"{name}training")
    ax.set(xlabel="training seconds (evaluation excluded)", ylabel="loss (nats / character)",
           ylim=(1.0, 3.0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = make_out_dir(out_dir) / "gpt_loss.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv=None):
    cfg = parse_config(Config, argv)
    if cfg.plot:
        return plot_runs(cfg.plot, cfg.out_dir)
    device = pick_device(cfg.device)
    model, tokenizer, train_config = load_model(cfg.checkpoint, device)
    if cfg.val_loss:
        loss = validation_loss(model, tokenizer, train_config.get("text_file"), cfg.data_dir)
        print(f"validation loss {loss:.4f} nats per character")
        return loss
    unknown = tokenizer.unknown(cfg.prompt)
    if unknown:
        sys.exit(f"error: the prompt has characters that are not in the model's vocabulary: "
                 f"{''.join(unknown)!r}")
    torch.manual_seed(cfg.seed)
    prompt = torch.tensor([tokenizer.encode(cfg.prompt)] * cfg.num_samples, device=device)
    if cfg.benchmark:
        return benchmark(model, prompt, cfg.max_new_tokens)

    # Stream the first sample to the terminal while the batch is generated; the others come after.
    generated = []
    print("################ SAMPLE 1 ################\n" + cfg.prompt, end="", flush=True)
    for next_ids in model.stream(prompt, cfg.max_new_tokens, temperature=cfg.temperature,
                                 top_k=cfg.top_k or None, top_p=cfg.top_p, use_cache=cfg.cache):
        generated.append(next_ids)
        print(tokenizer.decode(next_ids[0].tolist()), end="", flush=True)
    samples = [cfg.prompt + tokenizer.decode(row) for row in torch.cat(generated, dim=1).tolist()]
    for k, text in enumerate(samples[1:], start=2):
        print(f"\n################ SAMPLE {k} ################\n{text}", end="")
    print()
    if cfg.out:
        text = "".join(f"################ SAMPLE {k} ################\n{s}\n"
                       for k, s in enumerate(samples, start=1))
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out + ".tmp").write_text(text, encoding="utf-8")
        os.replace(cfg.out + ".tmp", cfg.out)
    return samples


if __name__ == "__main__":
    main()
