"""Checks of RealNVP's claims against autograd and closed forms. Run: python -m pytest (in nf/)."""
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import model
import plumbing
import sample
import train

HERE = os.path.dirname(os.path.abspath(__file__))


def randomise(module, seed=0):
    """Flows start as the identity (zero-initialised outputs); give all parameters random values."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return module


def tiny_layers():
    flat_mask = torch.tensor([[1.0, 0, 1, 0, 1, 0, 1, 0] * 4])
    return {
        "checkerboard coupling":
            model.AffineCoupling(model.checkerboard_mask(4, 4, 1), model.ResNet(2, 4, 4, 1), 2),
        "channel coupling":
            model.AffineCoupling(model.channel_mask(2, 0), model.ResNet(2, 4, 4, 1), 2),
        "actnorm": model.ActNorm(2),
        "flat coupling": model.AffineCoupling(flat_mask, model.MLP(32, 8), 32),
    }


def layer_input(name):
    return torch.randn(3, 32) if name == "flat coupling" else torch.randn(3, 2, 4, 4)


@pytest.mark.parametrize("name", list(tiny_layers()))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_every_layer_inverts(name, mode):
    layer = randomise(tiny_layers()[name])
    getattr(layer, mode)()
    x = layer_input(name)
    y, _ = layer(x)
    assert not torch.allclose(y, x), "an identity layer proves nothing"
    torch.testing.assert_close(layer.inverse(y), x, atol=1e-4, rtol=0)


def jacobian_of(flow, x):
    """The full Jacobian of flow(x)[0] for one sample, (D, D), by autograd."""
    jacobian = torch.autograd.functional.jacobian(lambda v: flow(v.unsqueeze(0))[0].flatten(), x)
    return jacobian.reshape(x.numel(), x.numel())


@pytest.mark.parametrize("name", list(tiny_layers()))
def test_layer_logdet_equals_autograd_jacobian(name):
    layer = randomise(tiny_layers()[name]).double().eval()
    x = layer_input(name).double()
    _, logdet = layer(x)
    for i in range(len(x)):  # brute force: the full Jacobian of one sample, then its log|det|
        jacobian = jacobian_of(layer, x[i])
        assert logdet[i].item() == pytest.approx(torch.linalg.slogdet(jacobian)[1].item(), abs=1e-8)


@pytest.mark.parametrize("flow", ["multiscale", "flat"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_whole_flow_inverts_and_its_logdet_equals_autograd(flow, mode):
    if flow == "multiscale":
        net = model.RealNVP(channels=1, size=4, num_scales=2, hidden=4)
    else:
        net = model.FlatRealNVP(channels=1, size=4, num_couplings=4, hidden=8)
    net = randomise(net).double()
    getattr(net, mode)()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    z, logdet = net(x)
    assert z.shape == (2, 16)
    torch.testing.assert_close(net.inverse(z), x, atol=1e-4, rtol=0)
    net.eval()
    jacobian = jacobian_of(net, x[0])
    assert net(x)[1][0].item() == pytest.approx(torch.linalg.slogdet(jacobian)[1].item(), abs=1e-8)


def test_preprocessing_logdet_equals_autograd():
    x = torch.randint(0, 256, (1, 1, 3, 3))
    noise = torch.rand(1, 1, 3, 3, dtype=torch.float64)
    _, logdet = model.preprocess(x, noise)
    # l as a function of y = (x + noise) / 256 is element-wise: the Jacobian is diagonal
    derivative = torch.autograd.functional.jacobian(
        lambda y: model.preprocess(256 * y, torch.zeros_like(y))[0].flatten(), ((x + noise) / 256))
    expected = torch.log(torch.diagonal(derivative.reshape(9, 9))).sum()
    assert logdet.item() == pytest.approx(expected.item(), rel=1e-6)


def test_squeeze_is_a_permutation_and_unsqueeze_undoes_it():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    y = model.squeeze(x)
    assert y.shape == (2, 12, 2, 3)
    assert torch.equal(y.flatten().sort().values, x.flatten())
    assert torch.equal(model.unsqueeze(y), x)
    assert torch.equal(y[0, :4, 0, 0], torch.tensor([0.0, 1, 6, 7]))  # channel 0's top-left patch


def test_bits_per_dim_on_known_densities():
    # the uniform density on [0, 1]^D (log p = 0) is exactly 8 bits per 8-bit pixel
    assert model.bits_per_dim(torch.tensor(0.0), 784).item() == pytest.approx(8.0)
    # a standard normal's mean negative log-density is its entropy, 0.5 log2(2 pi e) bits per dim
    torch.manual_seed(0)
    z = torch.randn(20000, 16, dtype=torch.float64)
    nll_bits = -model.standard_normal_log_prob(z).mean() / (16 * math.log(2))
    assert nll_bits.item() == pytest.approx(0.5 * math.log2(2 * math.pi * math.e), abs=0.01)


def test_temperature_zero_returns_the_mode_path():
    net = randomise(model.RealNVP(channels=1, size=4, num_scales=2, hidden=4)).eval()
    images, log_p = sample.sample(net, 3, 0.0, "cpu")
    expected = model.postprocess(net.inverse(torch.zeros(1, 16)))
    for image in images:
        torch.testing.assert_close(image, expected[0])
    assert torch.allclose(log_p, log_p[0])


def write_fake_mnist(root, n_train=256, n_test=64, seed=0):
    """A stand-in for MNIST in torchvision's raw idx layout: blurry bars on a dark background."""
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw)
    for split, n in [("train", n_train), ("t10k", n_test)]:
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 30, (n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            images[i, 4:24, 2 * k + 4 : 2 * k + 8] = 220
        with open(os.path.join(raw, f"{split}-images-idx3-ubyte"), "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with open(os.path.join(raw, f"{split}-labels-idx1-ubyte"), "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.tobytes())


TINY = ["--hidden", "8", "--batch-size", "16", "--device", "cpu", "--eval-examples", "64"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("nf_data")
    write_fake_mnist(root)
    return str(root)


def metrics(out):
    lines = (out / "metrics.csv").read_text().splitlines()
    return [dict(zip(lines[0].split(","), line.split(","))) for line in lines[1:]]


def test_tiny_flow_learns_and_checkpoint_reproduces_its_report(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(["--data-dir", data_dir, "--out-dir", str(out), "--steps", "40",
                "--eval-every", "20", "--lr", "3e-3", *TINY])
    rows = metrics(out)
    first, last = float(rows[0]["val_bpd"]), float(rows[-1]["val_bpd"])
    assert last < first < 8.0, "validation bits/dim must fall"
    assert rows[0]["test_bpd"] == "", "the test set is scored once, after the last step"
    test_bpd = float(rows[-1]["test_bpd"])
    ckpt = str(out / "ckpt.pt")
    sample.main(["--checkpoint", ckpt, "--data-dir", data_dir, "--eval", "--device", "cpu"])
    assert f"test bits/dim: {test_bpd:.4f}" in capsys.readouterr().out
    sample.main(["--checkpoint", ckpt, "--data-dir", data_dir, "--eval", "--eval-examples", "32"])
    assert "32 test images" in capsys.readouterr().out  # not the checkpoint's 64
    sample.main(["--checkpoint", ckpt, "--num-samples", "8", "--out-dir", str(tmp_path),
                 "--device", "cpu"])
    assert (tmp_path / "nf_samples.png").stat().st_size > 100
    sample.main(["--checkpoint", ckpt, "--interpolate", "--out-dir", str(tmp_path),
                 "--data-dir", data_dir, "--device", "cpu"])
    assert (tmp_path / "nf_interpolation.png").stat().st_size > 100


def test_validation_is_carved_from_the_training_images(data_dir):
    cfg = train.Config(data_dir=data_dir, val_fraction=0.25)
    x_train, x_val, x_test = train.load_data(cfg, "cpu")
    assert (len(x_train), len(x_val), len(x_test)) == (192, 64, 64)
    every = torch.cat([x_train, x_val]).flatten(1)
    assert len(every.unique(dim=0)) == 256, "no image is in both the training and validation sets"
    full, no_val, _ = train.load_data(train.Config(data_dir=data_dir, val_fraction=0), "cpu")
    every_image = train.load_image_dataset("mnist", data_dir, train=True)[0]
    assert len(no_val) == 0 and torch.equal(full, every_image), "0: all, in their order"


class Anything:
    def __eq__(self, other):
        return True


ANY = Anything()


class StopAfter(train.Clock):
    """A Clock that is interrupted (as by Ctrl-C) after `checks` calls of done()."""

    checks = 0

    def done(self):
        StopAfter.checks -= 1
        self.interrupted = self.interrupted or StopAfter.checks < 0
        return super().done()


def test_resume_continues_exactly(data_dir, tmp_path, monkeypatch):
    run = ["--data-dir", data_dir, "--steps", "6", "--eval-every", "2", *TINY]
    train.main([*run, "--out-dir", str(tmp_path / "whole")])
    monkeypatch.setattr(train, "Clock", StopAfter)
    StopAfter.checks = 3  # stop between two evaluations, as --max-minutes or Ctrl-C would
    train.main([*run, "--out-dir", str(tmp_path / "a")])
    stopped = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    assert stopped["step"] == 3
    stopped["seconds"] = 1000.0  # as if the first three steps had taken 1000 s
    torch.save(stopped, tmp_path / "a" / "ckpt.pt")
    StopAfter.checks = 10**9
    train.main(["--resume", str(tmp_path / "a" / "ckpt.pt"), "--steps", "6", "--out-dir",
                str(tmp_path / "a"), "--data-dir", data_dir, "--device", "cpu"])
    whole = torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=True)
    resumed = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    for name in whole["model"]:
        assert torch.equal(whole["model"][name], resumed["model"][name]), name
    assert resumed["seconds"] >= 1000.0  # the clock goes on from the checkpoint's
    whole_rows = [dict(row, seconds=ANY) for row in metrics(tmp_path / "whole")]
    assert metrics(tmp_path / "a") == whole_rows, "the same rows but for the seconds"


def test_max_minutes_stops_with_a_checkpoint(data_dir, tmp_path, capsys):
    train.main(["--data-dir", data_dir, "--out-dir", str(tmp_path), "--steps", "100000",
                "--max-minutes", "0.01", *TINY])
    stopped = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert 0 < stopped["step"] < 100000 and stopped["seconds"] >= 0.6
    assert "go on with --resume" in capsys.readouterr().out


def test_resume_keeps_the_learning_rate_unless_given(data_dir, tmp_path):
    train.main(["--data-dir", data_dir, "--out-dir", str(tmp_path / "a"), "--steps", "2",
                "--lr", "2e-3", *TINY])
    for extra, lr in [([], 2e-3), (["--lr", "1e-4"], 1e-4)]:  # a last phase at a lower lr
        out = tmp_path / f"b{lr}"
        train.main(["--resume", str(tmp_path / "a" / "ckpt.pt"), "--steps", "3", "--out-dir",
                    str(out), "--data-dir", data_dir, "--device", "cpu", *extra])
        resumed = torch.load(out / "ckpt.pt", weights_only=True)
        assert resumed["config"]["lr"] == lr
        assert all(group["lr"] == lr for group in resumed["optimizer"]["param_groups"])


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(data_dir, tmp_path,
                                                                   monkeypatch):
    calls = []

    def poisoned(flow, x, noise):  # the 4th training batch produces NaN
        result = model.log_likelihood(flow, x, noise)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 4:
                result = result * float("nan")
        return result

    monkeypatch.setattr(train, "log_likelihood", poisoned)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="loss became nan at step 3.*last good checkpoint"):
        train.main(["--data-dir", data_dir, "--out-dir", str(out), "--steps", "10",
                    "--eval-every", "2", *TINY])
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2


def test_two_process_ddp_run(data_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "train.py", "--data-dir", data_dir, "--out-dir", str(tmp_path), "--steps", "3",
         "--eval-every", "3", *TINY],
        cwd=HERE, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr  # all of it: a failing rank's message comes first
    assert "2 process(es)" in result.stdout
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3
    rank0, rank1 = (state["torch"] for state in ckpt["rng"])
    assert not torch.equal(rank0, rank1), "each rank's own random numbers, for an exact resume"


def run_script(*args):
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True,
                          env=dict(os.environ, DATA_DIR=""))


def test_bad_inputs_give_one_line_errors(tmp_path):
    empty = tmp_path / "nothing_here"
    for args, message in [
        (["train.py", "--num-scales", "4"], "--num-scales 4 needs an image size divisible by 8"),
        (["train.py", "--steps", "0"], "--steps must be positive"),
        (["train.py", "--val-fraction", "1"], "--val-fraction must be below 1"),
        (["train.py", "--data-dir", str(empty), "--out-dir", str(tmp_path / "run")],
         "could not be downloaded"),
        (["sample.py", "--checkpoint", str(tmp_path / "missing.pt")], "not found"),
    ]:
        result = run_script(*args)
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        assert message in result.stderr.strip().splitlines()[-1]
    assert not empty.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("lr", ["nan", "inf", "-1", "0"])
def test_bad_learning_rates_stop_before_training(lr, capsys):
    with pytest.raises(SystemExit) as stop:
        train.main(["--lr", lr])
    assert stop.value.code == 2
    assert "--lr" in capsys.readouterr().err.strip().splitlines()[-1]


def test_out_dir_that_is_a_file_is_refused(data_dir, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        train.main(["--data-dir", data_dir, "--out-dir", str(a_file), "--steps", "1", *TINY])


class Payload:
    """Not plain data: a weights-only load must refuse it (a pickle could run code through it)."""


def test_bad_checkpoints_are_refused_in_one_line(tmp_path):
    foreign, corrupt = tmp_path / "foreign.pt", tmp_path / "corrupt.pt"
    no_model, unsafe = tmp_path / "no_model.pt", tmp_path / "unsafe.pt"
    torch.save({"folder": "gpt"}, foreign)
    corrupt.write_bytes(b"not a checkpoint")
    torch.save({"folder": "nf", "config": {}, "step": 0}, no_model)
    torch.save({"folder": "nf", "model": Payload()}, unsafe)
    for path, message in [(foreign, "not written by nf"), (corrupt, "truncated or corrupt"),
                          (no_model, "lacks the key.*'model'"), (tmp_path, "is a folder"),
                          (unsafe, "objects that are not allowed to load")]:
        with pytest.raises(SystemExit, match=message):
            sample.main(["--checkpoint", str(path)])
        with pytest.raises(SystemExit, match=message):
            train.main(["--resume", str(path)])


# ---------------------------------------------------------------- the shipped model, pretrained/
MNIST_DIR = os.environ.get("DATA_DIR", "data")
HAS_MNIST = (Path(MNIST_DIR) / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()
# `python nf/sample.py --eval --eval-examples 500` on pretrained/nf_mnist.pt (fp32) gave
# SHIPPED_BPD on these 500 images (the first of the test set). The number is deterministic
# (fixed dequantisation noise), so only float rounding across machines moves it, by < 1e-4;
# 0.01 bits/dim is far below what a broken loader, preprocessing or flow costs.
SHIPPED_BPD = 1.6868
BPD_TOLERANCE = 0.01
# 16 samples at temperature 0.7, seed 0: the mean bits/dim of the rounded 8-bit images was
# SAMPLES_BPD; the latents are the same on every machine (torch's CPU generator), so 0.05 is
# loose for rounding, tight for a sampler that no longer inverts the flow.
SAMPLES_BPD = 1.5742
SAMPLES_TOLERANCE = 0.05


def shipped_score(capsys, *args):
    sample.main(["--device", "cpu", *args])
    return capsys.readouterr()


@pytest.mark.skipif(not HAS_MNIST, reason=f"MNIST is not in DATA_DIR={MNIST_DIR}")
def test_shipped_model_keeps_its_test_bits_per_dim(capsys):
    out = shipped_score(capsys, "--eval", "--eval-examples", "500", "--data-dir", MNIST_DIR)
    assert "using the shipped model" in out.err
    bpd = float(re.search(r"test bits/dim: ([0-9.]+)", out.out).group(1))
    assert bpd == pytest.approx(SHIPPED_BPD, abs=BPD_TOLERANCE), out.out


def test_shipped_model_samples_need_no_data(tmp_path, capsys):
    out = shipped_score(capsys, "-n", "4", "--out-dir", str(tmp_path), "--data-dir", "absent")
    assert "using the shipped model" in out.err and "wrote" in out.out
    assert (tmp_path / "nf_samples.png").stat().st_size > 100


def test_shipped_samples_keep_their_likelihood():
    ckpt = plumbing.load_checkpoint("", "nf", shipped="nf_mnist.pt")
    net = train.build_model(plumbing.config_from_checkpoint(train.Config, ckpt))
    net.load_state_dict(ckpt["model"])
    torch.manual_seed(0)
    images, log_p = sample.sample(net.eval(), 16, 0.7, "cpu")
    bpd = model.bits_per_dim(log_p, images[0].numel()).mean().item()
    assert bpd == pytest.approx(SAMPLES_BPD, abs=SAMPLES_TOLERANCE)


def test_a_corrupted_shipped_model_is_refused_in_one_line(tmp_path, monkeypatch):
    copy = tmp_path / "pretrained"
    copy.mkdir()
    shutil.copy(plumbing.PRETRAINED / "manifest.json", copy)
    data = bytearray((plumbing.PRETRAINED / "nf_mnist.pt").read_bytes())
    data[len(data) // 2] ^= 1  # one bit flipped
    (copy / "nf_mnist.pt").write_bytes(data)
    monkeypatch.setattr(plumbing, "PRETRAINED", copy)
    with pytest.raises(SystemExit, match="does not match its recorded sha256") as stop:
        sample.main(["--device", "cpu"])
    assert "\n" not in str(stop.value.code)


def test_manifest_lists_the_shipped_file():
    manifest = json.loads((plumbing.PRETRAINED / "manifest.json").read_text())
    entry = manifest["nf_mnist.pt"]
    path = plumbing.PRETRAINED / "nf_mnist.pt"
    assert entry["sha256"] == plumbing.sha256(path) and entry["bytes"] == path.stat().st_size
    ckpt = torch.load(path, weights_only=True)
    assert all(t.dtype == torch.float32 for t in ckpt["model"].values() if t.is_floating_point())
    assert "optimizer" not in ckpt and "rng" not in ckpt
