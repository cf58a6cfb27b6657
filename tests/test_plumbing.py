"""plumbing.py, the file that is the same in every folder: each promise of it, checked once here.

test_structure.py proves the ten copies are byte-identical, so testing ppo's copy tests them all.
"""

import dataclasses
import importlib.util
import os
import signal
import time
import urllib.error
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("plumbing_under_test", ROOT / "ppo" / "plumbing.py")
plumbing = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plumbing)


@dataclasses.dataclass
class Config:
    """A demo configuration."""

    dataset: Literal["mnist", "fashion_mnist", "cifar10"] = "mnist"  # which dataset
    lr: float = 3e-3  # peak learning rate (100% at the end of warmup)
    steps: int = 100  # optimiser steps
    shift: float = 0.0  # a knob that may be negative
    resume: str | None = None  # continue from this checkpoint
    compile: bool = False  # torch.compile the model
    widths: tuple[int, ...] = (32, 64)  # channels per level
    dropout: float = 0.0  # dropout probability
    impls: tuple[Literal["sparse", "dense"], ...] = ("sparse",)  # implementations to time
    signed = ("shift",)
    aliases = {"steps": "-n"}

    def __post_init__(self):
        plumbing.require(self.dropout < 1, f"--dropout must be below 1, got {self.dropout}")


PRESETS = {"cpu": {"steps": 5}, "gpu": {"mnist": {"lr": 1.0}, "cifar10": {"lr": 2.0}}}


def parse(*argv):
    return plumbing.parse_config(Config, list(argv), PRESETS)


def one_line_error(excinfo):
    message = str(excinfo.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


# ----------------------------------------------------------------------------------- parse_config
def test_every_field_is_a_flag_with_its_comment_as_help(capsys):
    with pytest.raises(SystemExit) as excinfo:
        parse("--help")
    assert excinfo.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in [
        "--lr LR peak learning rate (100% at the end of warmup) (default: 0.003)",
        "--compile, --no-compile",
        "{mnist,fashion_mnist,cifar10}",
        "--widths [WIDTHS ...]",
        "--preset {cpu,gpu}",
        "continue from this checkpoint",
    ]:
        assert text in out


def test_types_and_defaults():
    assert parse() == Config()
    cfg = parse(
        "--lr",
        "0.5",
        "--compile",
        "--widths",
        "8",
        "16",
        "32",
        "--shift",
        "-1",
        "--resume",
        "a.pt",
        "--dataset",
        "cifar10",
    )
    assert (cfg.lr, cfg.compile, cfg.widths, cfg.shift, cfg.resume) == (
        0.5,
        True,
        (8, 16, 32),
        -1.0,
        "a.pt",
    )
    assert plumbing.config_dict(cfg)["widths"] == [8, 16, 32]  # plain data for a checkpoint


def test_tuple_of_choices_and_default_preset(capsys):
    assert parse("--impls", "dense", "sparse").impls == ("dense", "sparse")
    assert parse("--impls").impls == ()
    with pytest.raises(SystemExit):
        parse("--impls", "pyg")
    assert "invalid choice" in capsys.readouterr().err
    assert plumbing.parse_config(Config, [], PRESETS, default_preset="cpu").steps == 5
    assert (
        plumbing.parse_config(Config, ["--preset", "gpu"], PRESETS, default_preset="cpu").steps
        == 100
    )


def test_presets_apply_before_explicit_flags():
    assert parse("--preset", "cpu").steps == 5
    assert parse("-n", "8").steps == 8
    assert parse("--preset", "cpu", "--steps", "7").steps == 7
    assert parse("--preset", "gpu").lr == 1.0  # per dataset
    assert parse("--preset", "gpu", "--dataset", "cifar10").lr == 2.0
    assert parse("--preset", "gpu", "--dataset", "cifar10", "--lr", "3").lr == 3.0


@pytest.mark.parametrize(
    "argv",
    [
        ["--lr", "nan"],
        ["--lr", "inf"],
        ["--lr", "-1"],
        ["--steps", "-2"],
        ["--widths", "8", "-1"],
        ["--dropout", "1"],
        ["--dataset", "fashion"],
        ["--steps", "1.5"],
    ],
)
def test_bad_values_end_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as excinfo:
        parse(*argv)
    assert excinfo.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1, error_lines


# ------------------------------------------------------------------------------------ checkpoints
def save_good(path, **extra):
    plumbing.save_checkpoint(
        path, {"folder": "demo", "config": {}, "model": {"w": torch.ones(2)}, **extra}
    )


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_good(path, step=3)
    ckpt = plumbing.load_checkpoint(path, "demo", keys=["model", "step"])
    assert ckpt["step"] == 3 and torch.equal(ckpt["model"]["w"], torch.ones(2))
    assert list(tmp_path.iterdir()) == [path]  # no .tmp left behind


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_good(path, step=1)

    def dies_half_way(obj, f):
        Path(f).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(plumbing.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_good(path, step=2)
    monkeypatch.undo()
    assert plumbing.load_checkpoint(path, "demo")["step"] == 1  # the old one, intact


@pytest.mark.parametrize(
    "case, expected",
    [
        ("absent", "not found"),
        ("folder", "is a folder, not a file"),
        ("unsafe", "holds objects that are not allowed to load"),
        ("truncated", "truncated or corrupt"),
        ("garbage", "truncated or corrupt"),
        ("foreign", "was not written by demo/ (it says 'other')"),
        ("not a dict", "was not written by demo/"),
        ("missing key", "lacks the key(s) 'model'"),
        ("sha256", "does not match its recorded sha256"),
    ],
)
def test_bad_checkpoints_end_in_one_line(tmp_path, case, expected):
    path = tmp_path / "ckpt.pt"
    save_good(path)
    sha = None
    if case == "absent":
        path = tmp_path / "nothing.pt"
    elif case == "folder":
        path = tmp_path
    elif case == "unsafe":
        torch.save({"folder": "demo", "config": {}, "model": Config()}, path)
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif case == "garbage":
        path.write_bytes(b"not a checkpoint")
    elif case == "foreign":
        torch.save({"folder": "other", "config": {}, "model": {}}, path)
    elif case == "not a dict":
        torch.save([1, 2], path)
    elif case == "missing key":
        torch.save({"folder": "demo", "config": {}}, path)
    elif case == "sha256":
        sha = "0" * 64
    with pytest.raises(SystemExit) as excinfo:
        plumbing.load_checkpoint(path, "demo", expected_sha256=sha)
    assert expected in one_line_error(excinfo)


def test_config_from_checkpoint():
    ckpt = {"config": {"lr": 0.1, "widths": [1, 2]}}
    assert plumbing.config_from_checkpoint(Config, ckpt, steps=9) == Config(
        lr=0.1, widths=[1, 2], steps=9
    )
    for bad in [{"nonsense": 1}, {"dropout": 2.0}]:
        with pytest.raises(SystemExit) as excinfo:
            plumbing.config_from_checkpoint(Config, {"config": bad}, "x.pt")
        one_line_error(excinfo)


def test_out_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as excinfo:
        plumbing.make_out_dir(tmp_path / "file")
    assert "is a file" in one_line_error(excinfo)
    assert plumbing.make_out_dir(tmp_path / "a" / "b").is_dir()


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    generator = torch.Generator().manual_seed(5)
    plumbing.seed_everything(0)
    torch.save(plumbing.rng_state(generator), tmp_path / "rng.pt")
    first = (
        np.random.rand(),
        torch.rand(3),
        torch.rand(2, generator=generator),
        __import__("random").random(),
    )
    plumbing.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), generator)
    second = (
        np.random.rand(),
        torch.rand(3),
        torch.rand(2, generator=generator),
        __import__("random").random(),
    )
    assert first[0] == second[0] and first[3] == second[3]
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])


# ------------------------------------------------------------------------------- logging, budget
def test_metrics_log_writes_and_appends(tmp_path):
    log = plumbing.MetricsLog(tmp_path, ["step", "loss"])
    log.log(step=1, loss=0.5)
    log.close()
    log = plumbing.MetricsLog(tmp_path, ["step", "loss"], resume=True)
    log.log(step=2, loss="0.2500")
    log.close()
    assert (tmp_path / "metrics.csv").read_text().split() == ["step,loss", "1,0.5", "2,0.2500"]


def test_clock_budget_and_ctrl_c():
    assert not plumbing.Clock(0).done()  # no budget
    clock = plumbing.Clock(max_minutes=100.5 / 60, seconds=100.0)  # a resumed run: 0.5 s left
    assert clock.seconds >= 100.0 and not clock.done()
    assert clock.done(reserve=1.0)  # a last evaluation of 1 s would not fit
    time.sleep(0.6)
    assert clock.done() and clock.fraction() == 1.0
    handler_before = signal.getsignal(signal.SIGINT)
    clock = plumbing.Clock(max_minutes=10)
    os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C ends the run at the next check
    time.sleep(0.05)
    assert clock.interrupted and clock.done()
    assert signal.getsignal(signal.SIGINT) == handler_before  # restored once the run ends


def test_validation_split_is_fixed_and_disjoint():
    train, val = plumbing.split_validation(100, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert sorted(torch.cat([train, val]).tolist()) == list(range(100))
    assert torch.equal(val, plumbing.split_validation(100, 0.1, seed=3)[1])
    assert torch.equal(val, plumbing.split_validation(100, 10, seed=3)[1])  # a count


# ------------------------------------------------------------------------------------------ data
def test_absent_dataset_offline_writes_nothing(tmp_path, monkeypatch):
    import torchvision

    def offline(self):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    data_dir = tmp_path / "data"
    with pytest.raises(SystemExit) as excinfo:
        plumbing.load_image_dataset("mnist", data_dir, train=True)
    message = one_line_error(excinfo)
    assert "MNIST is not in" in message and str(data_dir) in message and "--data-dir" in message
    assert not data_dir.exists()


def write_idx(path, array, magic):
    header = bytes([0, 0, magic, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("truncate", [False, True])
def test_dataset_files_present_are_read_or_reported_corrupt(tmp_path, truncate):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    for split in ["train", "t10k"]:
        write_idx(raw / f"{split}-images-idx3-ubyte", images, 8)
        write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(5), 8)
    if not truncate:
        x, y, classes = plumbing.load_image_dataset("mnist", tmp_path, train=True)
        assert x.shape == (5, 1, 28, 28) and x.dtype == torch.uint8 and y.tolist() == list(range(5))
        assert len(classes) == 10
        return
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(SystemExit) as excinfo:
        plumbing.load_image_dataset("mnist", tmp_path, train=True)
    assert "present but corrupt" in one_line_error(excinfo)


# ---------------------------------------------------------------------------------- shipped models
def test_export_drops_training_state_and_casts_weights(tmp_path):
    src, dst = tmp_path / "ckpt.pt", tmp_path / "pretrained" / "small.pt"
    weights = {"w": torch.randn(64, 64), "count": torch.tensor([3])}
    save_good(src, model=weights, optimizer={"state": {0: torch.randn(64, 64)}},
              rng={"torch": torch.get_rng_state()}, step=7)
    size, digest = plumbing.export_checkpoint(src, dst, "bfloat16")
    assert size == dst.stat().st_size < src.stat().st_size and digest == plumbing.sha256(dst)
    small = plumbing.load_checkpoint(dst, "demo", keys=["model", "step"])
    assert "optimizer" not in small and "rng" not in small and small["step"] == 7
    assert small["model"]["w"].dtype == torch.bfloat16
    assert small["model"]["count"].dtype == torch.long  # integers stay as they are
    layer = torch.nn.Linear(64, 64, bias=False)  # loading casts back to the model's float32
    layer.load_state_dict({"weight": small["model"]["w"]})
    assert layer.weight.dtype == torch.float32
    assert torch.equal(layer.weight, weights["w"].to(torch.bfloat16).float())


def ship(tmp_path, monkeypatch, entry=None):
    """A fake folder whose pretrained/ holds m.pt and its manifest."""
    pretrained = tmp_path / "demo" / "pretrained"
    pretrained.mkdir(parents=True)
    save_good(pretrained / "m.pt", step=5)
    fields = {key: "x" for key in plumbing.MANIFEST_KEYS}
    fields.update(sha256=plumbing.sha256(pretrained / "m.pt"), **(entry or {}))
    (pretrained / "manifest.json").write_text(plumbing.json.dumps({"m.pt": fields}))
    monkeypatch.setattr(plumbing, "PRETRAINED", pretrained)
    return pretrained


def test_no_checkpoint_flag_loads_the_shipped_model_and_says_so(tmp_path, monkeypatch, capsys):
    ship(tmp_path, monkeypatch)
    assert plumbing.load_checkpoint("", "demo", shipped="m.pt")["step"] == 5
    assert "using the shipped model demo/pretrained/m.pt" in capsys.readouterr().err
    save_good(tmp_path / "mine.pt", step=9)  # --checkpoint still wins
    assert plumbing.load_checkpoint(tmp_path / "mine.pt", "demo", shipped="m.pt")["step"] == 9


@pytest.mark.parametrize(
    "case, expected",
    [
        ("flipped byte", "does not match its recorded sha256"),
        ("not listed", "other.pt is not listed in"),
        ("no manifest", "cannot read the shipped models' manifest"),
        ("bad manifest", "cannot read the shipped models' manifest"),
        ("missing field", "lacks fields for ['m.pt']"),
    ],
)
def test_bad_shipped_models_end_in_one_line(tmp_path, monkeypatch, case, expected):
    pretrained = ship(tmp_path, monkeypatch)
    name = "m.pt"
    if case == "flipped byte":
        data = bytearray((pretrained / "m.pt").read_bytes())
        data[len(data) // 2] ^= 1
        (pretrained / "m.pt").write_bytes(bytes(data))
    elif case == "not listed":
        name = "other.pt"
    elif case == "no manifest":
        (pretrained / "manifest.json").unlink()
    elif case == "bad manifest":
        (pretrained / "manifest.json").write_text("{not json")
    elif case == "missing field":
        manifest = plumbing.json.loads((pretrained / "manifest.json").read_text())
        del manifest["m.pt"]["score"]
        (pretrained / "manifest.json").write_text(plumbing.json.dumps(manifest))
    with pytest.raises(SystemExit) as excinfo:
        plumbing.load_checkpoint("", "demo", shipped=name)
    assert expected in one_line_error(excinfo)
