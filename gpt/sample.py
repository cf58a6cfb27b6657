"""Generate text from a checkpoint of gpt/train.py, streaming characters to the terminal as they
come.

    python gpt/sample.py --prompt "QUEEN" --max-new-tokens 500 --num-samples 5 --seed 0
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
from train import load_weights

# nanoGPT's CPU "baby" config (4 layers, 4 heads, 128 wide, block 64, batch 12) measured on our
# 2-core machine when it was quiet (issue 4): validation loss after 86 s and after 8 minutes.
# Reference points on the loss plot.
NANOGPT_BABY_CPU = [(86, 1.886), (480, 1.499)]


@dataclass
class Config:
    """Generate text from a checkpoint of gpt/train.py (or, with --plot, draw loss curves)."""
    checkpoint: str = "runs/gpt/best.pt"  # checkpoint written by train.py
    prompt: str = "\n"  # text the samples continue (a newline); its characters must be known
    max_new_tokens: int = 500  # characters to generate per sample
    num_samples: int = 1  # independent samples, generated as one batch
    temperature: float = 0.8  # divide the logits by this; 0 means greedy
    top_k: int = 40  # sample among the k most likely characters (0: all)
    top_p: float = 1.0  # nucleus sampling: smallest set with this much probability (1: off)
    cache: bool = True  # key/value cache (--no-cache: recompute the whole context every step)
    out: str | None = None  # also write the samples to this file, each under a SAMPLE k line
    benchmark: bool = False  # time greedy generation with and without the cache, compare, exit
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
    """Rebuild the model and the tokenizer from the checkpoint alone."""
    ckpt = load_checkpoint(path, "gpt", keys=["model_config", "vocab", "model"],
                           map_location=device)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    load_weights(model, ckpt["model"], path)
    return model.to(device).eval(), CharTokenizer(ckpt["vocab"])


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
        name = Path(run_dir).name
        line, = ax.plot(seconds, [float(r["val_loss"]) for r in rows], label=f"{name} val")
        ax.plot(seconds, [float(r["train_loss"]) for r in rows], ":", color=line.get_color(),
                label=f"{name} train")
    ax.plot(*zip(*NANOGPT_BABY_CPU), "k*", markersize=10,
            label="nanoGPT baby config, val (issue 4, quiet machine)")
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
    model, tokenizer = load_model(cfg.checkpoint, device)
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
