"""Everything a training script needs that is not the paper. The same file sits in every folder.

Plain functions, in the order a train.py uses them; skip this file to read the method:

    cfg = parse_config(Config, argv, PRESETS)  # the dataclass atop train.py -> flags and --help
    ddp, rank, world, device = setup(cfg)       # threads, seeds, device; DDP under torchrun
    images, labels, classes = load_image_dataset("mnist", cfg.data_dir, train=True)
    clock = Clock(cfg.max_minutes)              # wall-clock budget; Ctrl-C ends the run cleanly
    log = MetricsLog(out_dir, ["step", "loss"], resume=False, wandb_config=None)
    save_checkpoint(path, {...}); ckpt = load_checkpoint(path, "gpt", keys=["model"])
    ckpt = load_checkpoint(cfg.checkpoint, "gpt", shipped="gpt_cpu.pt")  # "" -> pretrained/
    teardown(ddp)

tests/test_structure.py checks that every folder's copy is byte-identical.
"""
import argparse
import csv
import dataclasses
import hashlib
import inspect
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import threading
import time
import typing
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


# ---------------------------------------------------------------------------------- configuration
def require(condition, message):
    """For a Config's __post_init__: a check that ends in one line (parser.error) when it fails."""
    if not condition:
        raise ValueError(message)


def flag(name):
    return "--" + name.replace("_", "-")


def field_comments(cls):
    """{field: its trailing `# comment`} from the dataclass source: each flag's one-line help."""
    comments = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for match in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", source, re.MULTILINE):
            comments[match.group(1)] = match.group(2).strip()
    return comments


def add_field(parser, field, help_text, alias=None):
    """One flag for one dataclass field: its type, its choices (a Literal) and its default."""
    kind = field.type
    if isinstance(kind, str):
        raise TypeError(f"{field.name}: the Config needs real types, not `from __future__ import "
                        f"annotations`")
    args = typing.get_args(kind)
    if type(None) in args:  # `int | None`: the flag may be left out
        kind = next(a for a in args if a is not type(None))
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    options = dict(default=default, help=help_text.replace("%", "%%"))  # argparse %-formats help
    if kind is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is typing.Literal:
        options.update(choices=typing.get_args(kind), type=type(typing.get_args(kind)[0]))
    elif typing.get_origin(kind) in (list, tuple):
        item = typing.get_args(kind)[0]
        options["nargs"] = "*"  # `--flag` alone: empty
        if typing.get_origin(item) is typing.Literal:
            options.update(choices=typing.get_args(item), type=type(typing.get_args(item)[0]))
        else:
            options["type"] = item
    else:
        options["type"] = kind
    parser.add_argument(*([alias] if alias else []), flag(field.name), **options)


def parse_config(cls, argv=None, presets=None, description=None, extra=None, default_preset=None):
    """Flags from the dataclass `cls`, one per field with its comment as help; returns a `cls`.

    presets: {"name": {field: value}}, applied before explicit flags; a preset may hold one such
    dict per dataset instead ({"cpu": {"mnist": {...}}}), chosen by the `dataset` field. Every
    number must be finite and, unless its field is named in `cls.signed`, not negative; the
    Config's own __post_init__ checks the rest with `require`; `cls.aliases` ({"prompt": "-p"})
    gives fields short flags. `extra(parser)` may add positional
    arguments (a subcommand); then (cfg, {their values}) is returned. default_preset: the preset
    used when --preset is not given."""
    parser = argparse.ArgumentParser(description=description or cls.__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if extra:
        extra(parser)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=default_preset,
                            help="a named set of overrides (PRESETS in train.py); explicit flags "
                                 "still win")
    comments = field_comments(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    aliases = getattr(cls, "aliases", {})  # short flags: {"prompt": "-p"}
    for field in fields:
        add_field(parser, field, comments.get(field.name, ""), aliases.get(field.name))
    known = parser.parse_known_args(argv)[0]
    if presets and known.preset:
        overrides = presets[known.preset]
        if getattr(known, "dataset", None) in overrides:
            overrides = overrides[known.dataset]
        parser.set_defaults(**overrides)
    namespace = parser.parse_args(argv)
    signed = getattr(cls, "signed", ())
    for field in fields:
        value = getattr(namespace, field.name)
        for number in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(number, float) and not math.isfinite(number):
                parser.error(f"{flag(field.name)} must be a finite number, got {number}")
            if isinstance(number, (int, float)) and not isinstance(number, bool) and number < 0 \
                    and field.name not in signed:
                parser.error(f"{flag(field.name)} cannot be negative, got {number}")
    values = {f.name: getattr(namespace, f.name) for f in fields}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        cfg = cls(**values)
    except ValueError as e:
        parser.error(str(e))
    extras = {k: v for k, v in vars(namespace).items() if k not in {f.name for f in fields}}
    return (cfg, extras) if extra else cfg


def config_dict(cfg):
    """The config as plain data for a checkpoint (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


# ------------------------------------------------------------------------------- device, seeds, DDP
def pick_device(name, mps=True):
    """'auto' picks CUDA, then Apple's MPS (unless mps=False), then the CPU; an unavailable device
    ends in one line."""
    cuda, mps = torch.cuda.is_available(), mps and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    if name == "cuda" and not cuda or name == "mps" and not mps:
        sys.exit(f"error: --device {name} is not available on this machine")
    return torch.device(name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(cfg, mps=True):
    """Threads, seeds, device and DDP (nanoGPT's recipe: torchrun sets RANK; NCCL on CUDA, gloo on
    the CPU). Returns (ddp, rank, world_size, device). Every rank gets the same seed, hence the same
    initial weights; draw data per rank with a generator seeded by seed + rank, or a
    DistributedSampler."""
    if getattr(cfg, "threads", 0):
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if "RANK" not in os.environ:
        return False, 0, 1, pick_device(cfg.device, mps)
    cuda = cfg.device in ("auto", "cuda") and torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


def teardown(ddp):
    if ddp:
        dist.barrier()  # no rank tears down its connections while another still reads from them
        dist.destroy_process_group()


def autocast(device, enabled=True):
    """bf16 autocast on CUDA (where it pays), nothing elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def rng_state(*generators):
    """Python, NumPy, torch (and CUDA) RNG states and any torch.Generators, as plain data."""
    python = random.getstate()
    numpy = np.random.get_state()
    return {"python": [python[0], list(python[1]), python[2]],
            "numpy": [numpy[1].tolist(), *numpy[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "generators": [g.get_state() for g in generators]}


def set_rng_state(state, *generators):
    """Undo rng_state(): the run continues with exactly the random numbers it would have drawn."""
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    keys = np.array(state["numpy"][0], dtype=np.uint32)
    np.random.set_state(("MT19937", keys, *state["numpy"][1:]))
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    for generator, saved in zip(generators, state["generators"]):
        generator.set_state(saved)


# ------------------------------------------------------------------------------------- checkpoints
def make_out_dir(path):
    """The run folder, created if needed; a file in its place ends in one line."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        sys.exit(f"error: --out-dir {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        sys.exit(f"error: cannot create --out-dir {path} ({e.strerror})")
    return path


def save_checkpoint(path, checkpoint):
    """torch.save to PATH.tmp, then an atomic rename: a killed run never leaves half a file."""
    tmp = f"{path}.tmp"
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path, folder, keys=("config", "model"), map_location="cpu",
                    expected_sha256=None, shipped=None):
    """A checkpoint written by `folder`'s scripts, loaded as plain data (weights_only=True), or
    one line saying what is wrong: absent, a folder, unsafe, truncated, foreign or incomplete.
    With no `path` and a `shipped` name: the model committed in pretrained/, checked against the
    sha256 in pretrained/manifest.json."""
    if not path and shipped:
        path, expected_sha256 = shipped_checkpoint(shipped)
        print(f"using the shipped model {Path(folder) / 'pretrained' / shipped} "
              f"(--checkpoint PATH for your own)", file=sys.stderr)
    path = Path(path)
    if path.is_dir():
        sys.exit(f"error: checkpoint {path} is a folder, not a file")
    if not path.is_file():
        sys.exit(f"error: checkpoint {path} not found")
    if expected_sha256 and sha256(path) != expected_sha256:
        sys.exit(f"error: checkpoint {path} does not match its recorded sha256 (corrupt or "
                 f"replaced)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # a class that weights_only refuses to build
            sys.exit(f"error: checkpoint {path} holds objects that are not allowed to load "
                     f"(only tensors and plain data are)")
        sys.exit(f"error: checkpoint {path} is truncated or corrupt ({type(e).__name__})")
    except Exception as e:
        sys.exit(f"error: checkpoint {path} is truncated or corrupt ({type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("folder") != folder:
        found = ckpt.get("folder") if isinstance(ckpt, dict) else type(ckpt).__name__
        sys.exit(f"error: checkpoint {path} was not written by {folder}/ (it says {found!r})")
    missing = [key for key in keys if key not in ckpt]
    if missing:
        sys.exit(f"error: checkpoint {path} lacks the key(s) {', '.join(map(repr, missing))}")
    return ckpt


def config_from_checkpoint(cls, ckpt, path="checkpoint", **overrides):
    """The Config stored in a checkpoint (plus overrides); unknown or bad fields end in one line."""
    names = {f.name for f in dataclasses.fields(cls)}
    stored = ckpt["config"] if isinstance(ckpt["config"], dict) else {}
    unknown = sorted(set(stored) - names)
    if unknown:
        sys.exit(f"error: checkpoint {path} has config fields this code does not know: {unknown}")
    try:
        return cls(**{**stored, **overrides})
    except (TypeError, ValueError) as e:
        sys.exit(f"error: checkpoint {path} holds a config this code cannot use ({e})")


# ---------------------------------------------------------------------------------- shipped models
PRETRAINED = Path(__file__).resolve().parent / "pretrained"  # the folder's committed checkpoints
MANIFEST_KEYS = ("sha256", "bytes", "dtype", "command", "export", "commit", "data", "hardware",
                 "training_time", "score")


def read_manifest(folder_dir=None):
    """pretrained/manifest.json: {file name: {sha256, bytes, dtype, command, ..., score}}."""
    path = Path(folder_dir or PRETRAINED.parent) / "pretrained" / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot read the shipped models' manifest {path} ({type(e).__name__})")
    bad = [name for name, entry in manifest.items()
           if not isinstance(entry, dict) or set(MANIFEST_KEYS) - set(entry)]
    if bad:
        sys.exit(f"error: {path} lacks fields for {bad}; each entry needs {list(MANIFEST_KEYS)}")
    return manifest


def shipped_checkpoint(name):
    """The path of pretrained/NAME and the sha256 its manifest records for it."""
    manifest = read_manifest()
    if name not in manifest:
        sys.exit(f"error: {name} is not listed in {PRETRAINED / 'manifest.json'}")
    return PRETRAINED / name, manifest[name]["sha256"]


def export_checkpoint(src, dst, dtype="bfloat16", drop=("optimizer", "rng")):
    """A run's checkpoint made small enough to commit: the training state (optimizer, RNG) dropped
    and every floating-point tensor stored as `dtype`. Loading casts the weights back."""
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:
        sys.exit(f"error: checkpoint {src} cannot be loaded ({type(e).__name__})")
    cast = getattr(torch, dtype)

    def convert(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(cast)
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(convert(v) for v in value)
        return value

    small = {k: convert(v) for k, v in ckpt.items() if k not in drop}
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(dst, small)
    return Path(dst).stat().st_size, sha256(dst)


# ------------------------------------------------------------------------------------------ logging
class MetricsLog:
    """metrics.csv in the run folder (appended to on --resume), and W&B when asked for."""

    def __init__(self, out_dir, columns, resume=False, wandb_config=None, project=None,
                 enabled=True, filename="metrics.csv", run_name=None):
        self.columns, self.enabled, self.wandb = list(columns), enabled, None
        if not enabled:
            return
        path = Path(out_dir) / filename
        append = resume and path.exists()
        self.file = open(path, "a" if append else "w", newline="")
        self.writer = csv.writer(self.file)
        if not append:
            self.writer.writerow(self.columns)
        if wandb_config is not None:
            import wandb  # imported only when asked for
            self.wandb = wandb.init(project=project, config=wandb_config, name=run_name,
                                    dir=out_dir)

    def log(self, **row):
        if not self.enabled:
            return
        self.writer.writerow([fmt(row.get(column, "")) for column in self.columns])
        self.file.flush()
        if self.wandb:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row.get("step"))

    def close(self):
        if self.enabled:
            self.file.close()
            if self.wandb:
                self.wandb.finish()


def fmt(value):
    """Floats to six significant digits; anything else (a string the script formatted) as is."""
    return f"{value:.6g}" if isinstance(value, float) else value


# ------------------------------------------------------------------------------------------- data
# key -> (torchvision class, image size, channels, per-channel mean and std of the training set)
IMAGE_DATASETS = {
    "mnist": ("MNIST", 28, 1, (0.1307,), (0.3081,)),
    "fashion_mnist": ("FashionMNIST", 28, 1, (0.2860,), (0.3530,)),
    "cifar10": ("CIFAR10", 32, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def load_image_dataset(name, data_dir, train):
    """One split of MNIST, FashionMNIST or CIFAR-10 through torchvision, as tensors:
    images uint8 (N, C, H, W), labels int64 (N,), class names.

    Reads the files when they are there; downloads them when they are not; when it cannot, removes
    what it created and ends in one line that names the dataset, the path and what to do."""
    import torchvision  # only the image folders need it

    dataset_class = getattr(torchvision.datasets, IMAGE_DATASETS[name][0])
    data_dir = os.path.abspath(data_dir)
    try:
        dataset = dataset_class(data_dir, train=train)
    except RuntimeError as e:
        if "not found" not in str(e):
            sys.exit(f"error: {dataset_class.__name__} in {data_dir} is present but corrupt ({e}); "
                     f"replace its files with torchvision's")
        dataset = download_image_dataset(dataset_class, data_dir, train)
    except Exception as e:
        sys.exit(f"error: {dataset_class.__name__} in {data_dir} is present but corrupt "
                 f"({type(e).__name__}); replace its files with torchvision's")
    images = torch.as_tensor(np.asarray(dataset.data))
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # (N, C, H, W)
    labels = torch.as_tensor(dataset.targets, dtype=torch.long)
    return images.contiguous(), labels, list(dataset.classes)


def download_image_dataset(dataset_class, data_dir, train):
    # what a download writes: MNIST/, FashionMNIST/, or cifar-10-batches-py/ and its .tar.gz
    entries = [dataset_class.__name__, getattr(dataset_class, "base_folder", ""),
               getattr(dataset_class, "filename", "")]
    written = [os.path.join(data_dir, entry) for entry in entries if entry]
    if os.path.isdir(data_dir):
        created = [path for path in written if not os.path.exists(path)]
    else:
        created = [data_dir]
    try:
        return dataset_class(data_dir, train=train, download=True)
    except Exception as e:
        for path in created:  # leave nothing behind but what was there before
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        sys.exit(f"error: {dataset_class.__name__} is not in {data_dir} (or is incomplete) and "
                 f"could not be downloaded ({type(e).__name__}); put torchvision's files there or "
                 f"point --data-dir / DATA_DIR at them")


def normalize(images, name):
    """uint8 (B, C, H, W) -> float, zero mean and unit variance per channel (training-set stats)."""
    _, _, _, mean, std = IMAGE_DATASETS[name]
    mean = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std


def split_validation(n, size, seed=0):
    """Indices (train, validation) of a fixed random split of n training examples, `size` of them
    (a count, or a fraction when a float below 1) for validation: models are selected on the
    validation part, never on the test set."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * size)) if isinstance(size, float) and size < 1 else int(size)
    return order[n_val:], order[:n_val]


# ---------------------------------------------------------------------------------- time budget
class Clock:
    """Wall-clock budget of a run (--max-minutes, 0: none), counting from `seconds` already spent
    (a resumed run) and including evaluation. The first Ctrl-C also ends the run at the next check,
    so the loop can save a resumable checkpoint; a second Ctrl-C stops at once. Under DDP all ranks
    agree."""

    def __init__(self, max_minutes=0.0, seconds=0.0):
        self.budget, self.before, self.start = max_minutes * 60, seconds, time.perf_counter()
        self.interrupted = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self.on_interrupt)

    def on_interrupt(self, signum, frame):
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        print("\ninterrupted: stopping at the next step with a checkpoint (Ctrl-C again to quit "
              "at once)", file=sys.stderr)

    @property
    def seconds(self):
        """Seconds of this run, those before a --resume included."""
        return self.before + time.perf_counter() - self.start

    def fraction(self):
        """How much of the budget is spent, 0 to 1 (0 when there is no budget); under DDP rank 0's
        value, so that a schedule driven by the clock is the same on every rank."""
        value = min(self.seconds / self.budget, 1.0) if self.budget else 0.0
        return agree(value, lambda t: dist.broadcast(t, 0))

    def done(self, reserve=0.0):
        """True once the budget, less `reserve` seconds kept for a last evaluation, is spent, or
        after a Ctrl-C; under DDP, True on every rank as soon as it is on one."""
        stop = self.interrupted or bool(self.budget) and self.seconds + reserve >= self.budget
        stop = bool(agree(float(stop), lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX)))
        if stop:
            self.close()
        return stop

    def close(self):
        """The run ends: Ctrl-C means again what it meant before."""
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def agree(value, collective):
    """A float that every DDP rank agrees on through `collective` (no-op without DDP)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    collective(tensor)
    return tensor.item()


if __name__ == "__main__":  # python FOLDER/plumbing.py export RUN/ckpt.pt FOLDER/pretrained/NAME.pt
    cli = argparse.ArgumentParser(description="Export a run's checkpoint for shipping: no "
                                  "optimizer or RNG state, floating-point tensors in --dtype.")
    cli.add_argument("command", choices=["export"])
    cli.add_argument("src", help="the run's checkpoint")
    cli.add_argument("dst", help="where to write the small copy (e.g. FOLDER/pretrained/NAME.pt)")
    cli.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    cli.add_argument("--drop", nargs="*", default=[],
                     help="keys left out besides optimizer and rng")
    args = cli.parse_args()
    if not Path(args.src).is_file():
        cli.error(f"{args.src} is not a file")
    drop = ["optimizer", "rng", *args.drop]
    size, digest = export_checkpoint(args.src, args.dst, args.dtype, drop)
    print(f"{args.dst}: {size:,} bytes, {args.dtype}, sha256 {digest}")
