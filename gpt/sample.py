"""Generate text from a checkpoint of gpt/train.py, streaming characters to the terminal as they come.

    python gpt/sample.py -p "QUEEN" -n 500 --num-samples 5 --top-k 40 --temperature 0.8 --seed 0
    python gpt/sample.py --out gpt/generated.txt            # also write all samples to a file
    python gpt/sample.py --benchmark                        # tokens/s with and without the key/value cache
    python gpt/sample.py --plot runs/gpt                    # loss curves -> images/gpt_loss.png
"""
import argparse
import csv
import os
import sys
import time
from pathlib import Path

import torch

from model import GPT, CharTokenizer, GPTConfig
from train import load_checkpoint, pick_device

IMAGES = Path(__file__).resolve().parent.parent / "images"
# nanoGPT's CPU "baby" config (4 layers, 4 heads, 128 wide, block 64, batch 12) measured on our 2-core machine
# when it was quiet (issue 4): validation loss after 86 s and after 8 minutes. Reference points on the loss plot.
NANOGPT_BABY_CPU = [(86, 1.886), (480, 1.499)]


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="runs/gpt/best.pt", help="checkpoint written by train.py")
    p.add_argument("-p", "--prompt", default="\n", help="text the samples continue (every character must be in the vocabulary)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=500, help="characters to generate per sample")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples, generated as one batch")
    p.add_argument("--temperature", type=float, default=0.8, help="divide the logits by this; 0 means greedy")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely characters (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set with this much probability (1: off)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context at every step instead of using the key/value cache")
    p.add_argument("--out", help="also write the samples to this file, each under a '################ SAMPLE k ################' line")
    p.add_argument("--benchmark", action="store_true", help="time greedy generation of -n characters with and without the cache, check they agree, and exit")
    p.add_argument("--plot", nargs="+", metavar="RUN_DIR", help="instead of sampling, plot the loss curves in these run folders' metrics.csv and exit")
    p.add_argument("--plot-out", default=str(IMAGES / "gpt_loss.png"), help="where --plot writes its picture")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto: cuda, then mps, then cpu")
    p.add_argument("--seed", type=int, default=0, help="seeds torch's sampler")
    return p


def load_model(path, device):
    """Rebuild the model and the tokenizer from the checkpoint alone."""
    ckpt = load_checkpoint(path, map_location=device)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), CharTokenizer(ckpt["vocab"])


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def benchmark(model, prompt, n):
    """Greedy decoding of n characters with and without the key/value cache: tokens/s of each, and equality."""
    results = {}
    for use_cache in (True, False):
        model.generate(prompt, 8, temperature=0, use_cache=use_cache)  # warm-up: kernels, allocator, CUDA context
        synchronize(prompt.device)
        start = time.perf_counter()
        out = model.generate(prompt, n, temperature=0, use_cache=use_cache)
        synchronize(prompt.device)  # a GPU runs behind the Python loop: wait for it before reading the clock
        results[use_cache] = (out, n * prompt.size(0) / (time.perf_counter() - start))
    same = torch.equal(results[True][0], results[False][0])
    print(f"{n} new characters, greedy: cache {results[True][1]:,.0f} tokens/s, no cache {results[False][1]:,.0f} tokens/s, "
          f"speed-up {results[True][1] / results[False][1]:.1f}x, identical outputs: {same}")
    return results[True][1], results[False][1], same


def plot_runs(run_dirs, out):
    """Validation (solid) and training (dotted) loss against seconds of training, one colour per run."""
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
        line, = ax.plot(seconds, [float(r["val_loss"]) for r in rows], label=f"{Path(run_dir).name} val")
        ax.plot(seconds, [float(r["train_loss"]) for r in rows], ":", color=line.get_color(), label=f"{Path(run_dir).name} train")
    ax.plot(*zip(*NANOGPT_BABY_CPU), "k*", markersize=10, label="nanoGPT baby config, val (issue 4, quiet machine)")
    ax.set(xlabel="training seconds (evaluation excluded)", ylabel="loss (nats / character)", ylim=(1.0, 3.0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or args.num_samples < 1:
        parser.error("--max-new-tokens and --num-samples must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        parser.error("--temperature must be >= 0, --top-p in (0, 1], --top-k >= 0")
    if args.plot:
        return plot_runs(args.plot, args.plot_out)
    device = pick_device(args.device)
    model, tokenizer = load_model(args.ckpt, device)
    unknown = tokenizer.unknown(args.prompt)
    if unknown:
        sys.exit(f"error: the prompt has characters that are not in the model's vocabulary: {''.join(unknown)!r}")
    if not args.prompt:
        parser.error("--prompt must not be empty")
    torch.manual_seed(args.seed)
    prompt = torch.tensor([tokenizer.encode(args.prompt)] * args.num_samples, device=device)
    if args.benchmark:
        return benchmark(model, prompt, args.max_new_tokens)

    # Stream the first sample to the terminal while the batch is generated; print the others when done.
    generated = []
    print("################ SAMPLE 1 ################\n" + args.prompt, end="", flush=True)
    for next_ids in model.stream(prompt, args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k or None, top_p=args.top_p, use_cache=not args.no_cache):
        generated.append(next_ids)
        print(tokenizer.decode(next_ids[0].tolist()), end="", flush=True)
    ids = torch.cat(generated, dim=1).tolist()
    samples = [args.prompt + tokenizer.decode(row) for row in ids]
    for k, sample in enumerate(samples[1:], start=2):
        print(f"\n################ SAMPLE {k} ################\n{sample}", end="")
    print()
    if args.out:
        text = "".join(f"################ SAMPLE {k} ################\n{s}\n" for k, s in enumerate(samples, start=1))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".tmp").write_text(text, encoding="utf-8")
        os.replace(args.out + ".tmp", args.out)
    return samples


if __name__ == "__main__":
    main()
