"""The ViT paper's pieces, each checked against an independent reference, and the scripts end to end on
small fake datasets written here in torchvision's own file layouts."""
import csv
import os
import pickle
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import model
import sample
import train

torch.set_num_threads(1)  # tiny models: one thread is as fast, and robust on a busy machine
HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--dim", "16", "--depth", "1", "--num-heads", "2", "--mlp-dim", "32", "--patch-size", "7",
        "--batch-size", "32", "--lr", "3e-3", "--warmup-epochs", "0", "--device", "cpu",
        "--crop-padding", "0"]  # no crops: DDP ranks draw other crops than one process would
RANDOM = ["--dropout", "0.05"]  # so that resuming must restore the random generator


# ----------------------------------------------------------------------------- fake datasets

def fake_images(n, size, channels, seed):
    """Images whose class is a bright square at one of ten places, plus noise: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 60, (n, size, size, channels))
    for image, label in zip(images, labels):
        row, col = divmod(int(label), 5)
        image[4 + 10 * row:12 + 10 * row, 1 + 5 * col:6 + 5 * col] = 255
    return images.astype(np.uint8), labels.astype(np.uint8)


def write_idx(path, array):
    """torchvision's MNIST raw format: magic (0, 0x08 = uint8, ndim), big-endian sizes, then the bytes."""
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.tobytes())


def fake_mnist(root, folder="MNIST", n_train=640, n_test=200):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for prefix, n, seed in [("train", n_train, 0), ("t10k", n_test, 1)]:
        images, labels = fake_images(n, 28, 1, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[..., 0])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def fake_cifar10(root, n_per_batch=64):
    """torchvision's cifar-10-batches-py: pickled dicts of (n, 3072) uint8 rows and label lists."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        images, labels = fake_images(n_per_batch, 32, 3, seed=i)
        entry = {"data": images.transpose(0, 3, 1, 2).reshape(n_per_batch, -1), "labels": labels.tolist()}
        (folder / name).write_bytes(pickle.dumps(entry))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return root


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    """One tiny MNIST training run shared by the end-to-end tests: (data dir, out dir, best accuracy).
    The checkpoint after each epoch is also copied aside, to test resuming."""
    root = tmp_path_factory.mktemp("run")
    data = fake_mnist(root / "data")
    saved = train.save_checkpoint

    def save_and_keep(obj, path):
        saved(obj, path)
        if path.endswith("last.pt"):
            saved(obj, path.replace("last.pt", f"epoch{obj['epoch']}.pt"))

    train.save_checkpoint = save_and_keep
    try:
        best = train.main(["--data-dir", str(data), "--out-dir", str(root / "out"), "--epochs", "3", *TINY, *RANDOM])
    finally:
        train.save_checkpoint = saved
    return data, root / "out", best


def read_metrics(out_dir):
    with open(out_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def state(path):
    return torch.load(path, weights_only=True)["model"]


# ----------------------------------------------------------------------------- the model, piece by piece

def test_patchify_matches_a_loop_over_patches_and_unpatchify_inverts_it():
    images = torch.randn(2, 3, 12, 8)
    patches = model.patchify(images, 4)
    assert patches.shape == (2, 6, 4 * 4 * 3)
    for b in range(2):
        for n in range(6):  # row-major patch order, each flattened as (row, col, channel) like an HWC image
            row, col = divmod(n, 2)
            expected = images[b, :, 4 * row:4 * row + 4, 4 * col:4 * col + 4].permute(1, 2, 0).reshape(-1)
            assert torch.equal(patches[b, n], expected)
    assert torch.equal(model.unpatchify(patches, 4, 3, 12, 8), images)


def test_attention_equals_torch_multihead_attention_with_the_same_weights():
    torch.manual_seed(0)
    ours = model.MultiHeadSelfAttention(dim=32, num_heads=4).eval()
    reference = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    with torch.no_grad():
        reference.in_proj_weight.copy_(ours.qkv.weight)
        reference.in_proj_bias.copy_(ours.qkv.bias)
        reference.out_proj.weight.copy_(ours.proj.weight)
        reference.out_proj.bias.copy_(ours.proj.bias)
    z = torch.randn(3, 10, 32)
    expected, expected_weights = reference(z, z, z, need_weights=True, average_attn_weights=False)
    fused, _ = ours(z)
    explicit, A = ours(z, return_attention=True)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(A, expected_weights, atol=1e-6, rtol=1e-5)


def test_without_position_embeddings_the_encoder_is_permutation_equivariant_over_patches():
    torch.manual_seed(0)
    vit = model.ViT(image_size=12, channels=2, patch_size=4, dim=16, depth=2, num_heads=2, mlp_dim=32).eval()
    images = torch.randn(2, 2, 12, 12)
    permutation = torch.randperm(9)
    shuffled = model.unpatchify(model.patchify(images, 4)[:, permutation], 4, 2, 12, 12)
    with torch.no_grad():
        vit.pos_embedding.zero_()
        logits, attentions = vit(images, return_attention=True)
        shuffled_logits, shuffled_attentions = vit(shuffled, return_attention=True)
        torch.testing.assert_close(shuffled_logits, logits, atol=1e-5, rtol=1e-5)  # class token: invariant
        tokens = torch.cat([torch.zeros(1, dtype=torch.long), permutation + 1])  # keep the class token first
        torch.testing.assert_close(shuffled_attentions[-1], attentions[-1][:, :, tokens][:, :, :, tokens],
                                   atol=1e-5, rtol=1e-5)  # patch tokens: permuted with the input
        vit.pos_embedding.normal_()
        assert not torch.allclose(vit(shuffled), vit(images), atol=1e-3)  # position embeddings break it


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
@pytest.mark.parametrize("dataset", sorted(train.DATASETS))
def test_output_shapes_for_each_preset(preset, dataset):
    args = train.get_args(["--dataset", dataset, "--preset", preset])
    config = train.model_config(args)
    vit = model.ViT(**config).eval()
    size = config["image_size"]
    with torch.no_grad():
        logits, attentions = vit(torch.randn(2, config["channels"], size, size), return_attention=True)
    tokens = (size // config["patch_size"]) ** 2 + 1
    assert logits.shape == (2, 10)
    assert len(attentions) == config["depth"]
    assert attentions[0].shape == (2, config["num_heads"], tokens, tokens)


def test_attention_rollout_equals_the_product_of_residual_attention_matrices():
    torch.manual_seed(0)
    attentions = [torch.rand(2, 3, 5, 5).softmax(-1) for _ in range(3)]
    expected = np.stack([np.eye(5)] * 2)
    for A in attentions:  # brute force in NumPy: (mean over heads + I), rows renormalised, left-multiplied
        A = A.mean(1).numpy() + np.eye(5)
        expected = np.einsum("bij,bjk->bik", A / A.sum(-1, keepdims=True), expected)
    torch.testing.assert_close(model.attention_rollout(attentions), torch.from_numpy(expected[:, 0, 1:]).float())


def test_a_tiny_model_overfits_64_images():
    torch.manual_seed(0)
    images, labels = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))  # random labels: memorise
    vit = model.ViT(patch_size=7, dim=32, depth=2, num_heads=2, mlp_dim=64)
    optimizer = torch.optim.AdamW(vit.parameters(), lr=3e-3)
    for _ in range(150):
        loss = nn.functional.cross_entropy(vit(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert (vit(images).argmax(-1) == labels).float().mean() == 1.0


def test_random_crop_is_a_window_of_the_zero_padded_image():
    args = train.get_args(["--crop-padding", "2", "--no-flip"])
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    cropped = train.augment(images, args, None)
    padded = nn.functional.pad(images, (2, 2, 2, 2))
    offsets = set()
    for image, crop in zip(padded, cropped):  # brute force: find the window this crop came from
        windows = [(i, j) for i in range(5) for j in range(5) if torch.equal(image[:, i:i + 8, j:j + 8], crop)]
        assert windows, "a crop that is no window of the padded image"
        offsets.add(windows[0])
    assert len(offsets) > 1, "every image cropped at the same place"


def test_flip_mirrors_some_images_left_to_right_and_leaves_the_others():
    args = train.get_args(["--flip", "--crop-padding", "0"])
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 1, 5, 5), dtype=torch.uint8)
    flipped = train.augment(images, args, None)
    same = [torch.equal(a, b) for a, b in zip(images, flipped)]
    mirrored = [torch.equal(a.flip(-1), b) for a, b in zip(images, flipped)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(same) and any(mirrored)


# ----------------------------------------------------------------------------- the scripts, end to end

@pytest.mark.parametrize("dataset, folder, counts, class_7", [
    ("mnist", "MNIST", [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009], "7 - seven"),
    ("fashion_mnist", "FashionMNIST", [1000] * 10, "Sneaker")])
def test_real_data_loads_with_torchvision_when_present(dataset, folder, counts, class_7):
    data_dir = os.environ.get("DATA_DIR", "")
    if not os.path.isfile(os.path.join(data_dir, folder, "raw", "t10k-images-idx3-ubyte")):
        pytest.skip(f"DATA_DIR does not hold {folder}")
    images, labels, classes = train.load_split(dataset, data_dir, train=False)
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == counts
    assert classes[7] == class_7


def test_training_loss_falls_and_test_accuracy_rises(mnist_run):
    _, out_dir, best = mnist_run
    rows = read_metrics(out_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["train_loss"]) < 0.8 * float(rows[0]["train_loss"])
    assert best > 0.4  # chance is 0.1


def test_sample_eval_gives_the_accuracy_training_reported(mnist_run, tmp_path, capsys):
    data, out_dir, best = mnist_run
    ckpt = torch.load(out_dir / "best.pt", weights_only=True)
    assert ckpt["folder"] == "vit" and ckpt["test_accuracy"] == best
    accuracy = sample.main(["--checkpoint", str(out_dir / "best.pt"), "--data-dir", str(data), "--device", "cpu",
                            "--eval", "--attention", "-n", "8", "--predictions-out", str(tmp_path / "p.png"),
                            "--attention-out", str(tmp_path / "a.png")])
    assert accuracy == best
    assert f"test accuracy {100 * best:.2f}%" in capsys.readouterr().out
    assert (tmp_path / "p.png").stat().st_size > 1000 and (tmp_path / "a.png").stat().st_size > 1000


def test_the_same_seed_gives_the_same_weights(mnist_run, tmp_path):
    data, out_dir, _ = mnist_run
    train.main(["--data-dir", str(data), "--epochs", "3", *TINY, *RANDOM, "--out-dir", str(tmp_path)])
    for key, value in state(out_dir / "last.pt").items():
        assert torch.equal(value, state(tmp_path / "last.pt")[key]), key


def test_resume_after_epoch_one_continues_exactly(mnist_run, tmp_path):
    _, out_dir, _ = mnist_run
    train.main(["--resume", str(out_dir / "epoch1.pt"), "--out-dir", str(tmp_path), "--device", "cpu"])
    for key, value in state(out_dir / "last.pt").items():
        assert torch.equal(value, state(tmp_path / "last.pt")[key]), key
    columns = ["epoch", "step", "train_loss", "test_loss", "test_accuracy"]
    assert [[r[c] for c in columns] for r in read_metrics(tmp_path)] == \
           [[r[c] for c in columns] for r in read_metrics(out_dir)]


def test_time_budget_stops_on_the_clock_with_the_learning_rate_annealed(mnist_run, tmp_path):
    data, _, _ = mnist_run
    start = time.time()
    train.main(["--data-dir", str(data), "--out-dir", str(tmp_path), "--epochs", "1000", "--time-budget", "0.03",
                "--threads", "1", *TINY])
    rows = read_metrics(tmp_path)
    assert 1 <= len(rows) < 1000 and time.time() - start < 1.8 + 5
    lrs = [float(r["lr"]) for r in rows]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.25 * 3e-3  # the cosine ran on the clock


@pytest.mark.parametrize("dataset", ["fashion_mnist", "cifar10"])
def test_trains_on_fashion_mnist_and_cifar10_in_torchvision_layout(dataset, tmp_path, monkeypatch):
    if dataset == "cifar10":
        fake_cifar10(tmp_path / "data")
        monkeypatch.setattr(torchvision.datasets.utils, "check_md5", lambda *args, **kwargs: True)  # fake files
        extra = ["--crop-padding", "4", "--flip", "--randaugment", "2", "--mixup", "0.2", "--patch-size", "8"]
    else:
        fake_mnist(tmp_path / "data", folder="FashionMNIST")
        extra = []
    train.main(["--dataset", dataset, "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out"),
                "--epochs", "1", *TINY, *extra])
    ckpt = torch.load(tmp_path / "out" / "last.pt", weights_only=True)
    assert ckpt["config"]["dataset"] == dataset and len(ckpt["classes"]) == 10
    assert np.isfinite(float(read_metrics(tmp_path / "out")[0]["train_loss"]))


def test_ddp_on_two_processes_equals_one_process_with_the_whole_batch(mnist_run, tmp_path):
    data, _, _ = mnist_run
    flags = ["--data-dir", str(data), "--epochs", "1", "--train-limit", "128", "--test-limit", "64", *TINY]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", *flags, "--out-dir", str(tmp_path / "ddp")],
                         cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr  # all of it: a failing rank's own message comes before torchrun's summary
    train.main([*flags, "--out-dir", str(tmp_path / "single")])
    ddp = state(tmp_path / "ddp" / "last.pt")
    for key, value in state(tmp_path / "single" / "last.pt").items():
        if key.endswith("qkv.bias"):  # the key bias has zero gradient in exact arithmetic (softmax ignores a
            value, ddp[key] = value.view(3, -1)[[0, 2]], ddp[key].view(3, -1)[[0, 2]]  # shift): Adam amplifies noise
        torch.testing.assert_close(ddp[key], value, atol=1e-5, rtol=1e-4)


def test_bad_command_lines_give_one_line_errors_without_traceback(mnist_run, tmp_path):
    _, out_dir, _ = mnist_run
    (tmp_path / "corrupt.pt").write_bytes((out_dir / "best.pt").read_bytes()[:1000])
    cases = [("train.py", ["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
             ("sample.py", ["--checkpoint", str(tmp_path / "corrupt.pt")], "truncated or corrupt")]
    runs = [subprocess.Popen([sys.executable, script, *arguments], cwd=HERE, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
            for script, arguments, _ in cases]  # in parallel: each one spends seconds importing torch
    for (script, arguments, message), run in zip(cases, runs):
        _, stderr = run.communicate(timeout=120)
        assert run.returncode != 0 and "Traceback" not in stderr, stderr
        assert message in stderr.strip().splitlines()[-1], stderr


def one_line_exit(main, argv):
    """What main(argv) says when it stops on a user's error (SystemExit is what becomes the one stderr line)."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code not in (0, None)
    return stop.value.code if isinstance(stop.value.code, str) else "parser error"


def test_bad_flags_checkpoints_and_missing_data_stop_with_one_line(mnist_run, tmp_path, monkeypatch, capsys):
    _, out_dir, _ = mnist_run
    torch.save({"folder": "gpt", "model": {}}, tmp_path / "foreign.pt")
    assert one_line_exit(train.main, ["--patch-size", "5"]) == "parser error"
    assert "not divisible by --patch-size 5" in capsys.readouterr().err
    assert one_line_exit(train.main, ["--dim", "30", "--num-heads", "4"]) == "parser error"
    assert one_line_exit(sample.main, ["--checkpoint", str(tmp_path / "missing.pt")]).startswith("error: no checkpoint")
    assert "not written by vit/train.py" in one_line_exit(sample.main, ["--checkpoint", str(tmp_path / "foreign.pt")])
    for variable in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"]:  # offline, whatever the machine
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    message = one_line_exit(train.main, ["--data-dir", str(tmp_path / "nowhere"), "--device", "cpu"])
    assert message.startswith("error: MNIST is not in") and "--data-dir" in message and "\n" not in message
    assert not (tmp_path / "nowhere").exists(), "a failed download left files behind"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "other.txt").write_text("not ours")
    one_line_exit(train.main, ["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--device", "cpu"])
    assert os.listdir(tmp_path / "data") == ["other.txt"], "a failed download left files behind"
