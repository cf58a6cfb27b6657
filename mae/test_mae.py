"""The paper's claims and the repo's conventions, each checked against an independent reference."""
import csv
import math
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import datasets

import model
import sample
import train
from model import MAEDecoder, MAEEncoder, MaskedAutoencoder, ViTClassifier, patchify, random_masking, unpatchify

HERE = Path(__file__).resolve().parent
TINY = ["--embed-dim", "32", "--depth", "2", "--num-heads", "2", "--decoder-embed-dim", "16", "--decoder-depth", "1",
        "--decoder-num-heads", "2", "--batch-size", "64", "--warmup-steps", "2", "--threads", "1"]


# ----------------------------------------------------------------------------------------------------------------------
# Small data in torchvision's raw layouts


def write_idx(folder, prefix, images, labels):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{prefix}-images-idx3-ubyte", "wb") as f:
        f.write(struct.pack(">iiii", 2051, *images.shape) + images.astype(np.uint8).tobytes())
    with open(folder / f"{prefix}-labels-idx1-ubyte", "wb") as f:
        f.write(struct.pack(">ii", 2049, len(labels)) + labels.astype(np.uint8).tobytes())


def fake_digits(n, rng):
    """Ten learnable 'digits': class k is a bright bar at a class-dependent place, plus noise."""
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 40, (n, 28, 28))
    for i, k in enumerate(labels):
        row = 2 + 2 * int(k)
        images[i, row:row + 3, 4:24] = 255
        images[i, 4:24, 2 + 2 * int(k):5 + 2 * int(k)] = 200
    return images, labels


def write_fake_mnist(root, folder="MNIST", n_train=256, n_test=64, seed=0):
    rng = np.random.default_rng(seed)
    for prefix, n in [("train", n_train), ("t10k", n_test)]:
        write_idx(root / folder / "raw", prefix, *fake_digits(n, rng))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_fake_mnist(root)
    return root


def run_train(mode, data_dir, out_dir, *extra):
    train.main([mode, "--data-dir", str(data_dir), "--out-dir", str(out_dir), *TINY, *extra])
    return str(Path(out_dir) / "ckpt.pt")


@pytest.fixture(scope="module")
def pretrained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    return run_train("pretrain", data_dir, out, "--epochs", "6", "--lr", "3e-3")


def read_csv(ckpt_path):
    with open(Path(ckpt_path).parent / "metrics.csv") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------------------------------
# model.py: patches, masking, position embeddings, encoder, decoder, loss


def test_patchify_matches_slicing_and_unpatchify_inverts_it():
    imgs = torch.randn(2, 3, 12, 12)
    p = 4
    patches = patchify(imgs, p)  # (2, 9, 48)
    for i in range(3):
        for j in range(3):
            expected = imgs[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(0, 2, 3, 1).reshape(2, -1)
            assert torch.equal(patches[:, i * 3 + j], expected)
    assert torch.equal(unpatchify(patches, p, 3), imgs)


@pytest.mark.parametrize("num_patches,mask_ratio", [(16, 0.75), (49, 0.75), (49, 0.5), (49, 0.9), (16, 0.1)])
def test_masking_keeps_round_n_times_one_minus_ratio_and_restore_is_exact(num_patches, mask_ratio):
    torch.manual_seed(0)
    x = torch.randn(32, num_patches, 8)
    visible, mask, ids_restore = random_masking(x, mask_ratio)
    keep = round(num_patches * (1 - mask_ratio))
    assert visible.shape == (32, keep, 8)
    assert torch.equal((1 - mask).sum(dim=1), torch.full((32,), float(keep)))  # exactly `keep` per sample
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    for b in range(32):  # brute force, one sample at a time
        shuffled = x[b, ids_shuffle[b]]
        assert torch.equal(visible[b], shuffled[:keep])
        assert torch.equal(shuffled[ids_restore[b]], x[b])  # restoring the order is exact
        assert set(ids_shuffle[b, :keep].tolist()) == set(torch.nonzero(mask[b] == 0).flatten().tolist())
    assert len({tuple(m.tolist()) for m in mask}) > 1  # every sample has its own mask


def test_encoder_input_token_count_is_the_visible_count():
    encoder = MAEEncoder(img_size=28, patch_size=4, embed_dim=16, depth=1, num_heads=2)
    seen = []
    encoder.blocks[0].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].shape[1]))
    imgs = torch.randn(3, 1, 28, 28)
    for ratio in [0.75, 0.5, 0.9]:
        encoder(imgs, ratio)
        assert seen[-1] == 1 + round(49 * (1 - ratio))  # [CLS] + visible patches, nothing else
    encoder(imgs, 0.0)
    assert seen[-1] == 1 + 49


def test_decoder_puts_encoded_tokens_back_in_place_and_mask_tokens_elsewhere():
    torch.manual_seed(0)
    decoder = MAEDecoder(num_patches=16, patch_dim=16, embed_dim=8, decoder_embed_dim=8, decoder_depth=1,
                         decoder_num_heads=2)
    seen = []
    decoder.decoder_blocks[0].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    patches = torch.randn(2, 16, 8)
    visible, mask, ids_restore = random_masking(patches, 0.75)
    latent = torch.cat([torch.randn(2, 1, 8), visible], dim=1)  # stands in for the encoder output
    decoder(latent, ids_restore)
    tokens = seen[0] - decoder.decoder_pos_embed  # (2, 17, 8) without the position embeddings
    projected = decoder.decoder_embed(latent)
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    for b in range(2):
        assert torch.allclose(tokens[b, 0], projected[b, 0], atol=1e-6)  # [CLS] first
        for k, n in enumerate(ids_shuffle[b, :4].tolist()):  # the k-th visible token goes back to patch n
            assert torch.allclose(tokens[b, 1 + n], projected[b, 1 + k], atol=1e-6)
        for n in torch.nonzero(mask[b]).flatten().tolist():  # every masked patch gets the one shared mask token
            assert torch.allclose(tokens[b, 1 + n], decoder.mask_token[0, 0], atol=1e-6)


def test_sincos_position_embedding_matches_the_direct_formula():
    D, G = 16, 4
    emb = model.get_2d_sincos_pos_embed(D, G, cls_token=True)
    assert emb.shape == (1 + G * G, D)
    assert torch.equal(emb[0], torch.zeros(D))
    for r in range(G):
        for c in range(G):
            for half, pos in [(0, c), (1, r)]:  # first half: the column, second half: the row
                for i in range(D // 4):
                    omega = 1 / 10000 ** (i / (D // 4))
                    base = half * D // 2
                    assert math.isclose(emb[1 + r * G + c, base + i], math.sin(pos * omega), abs_tol=1e-6)
                    assert math.isclose(emb[1 + r * G + c, base + D // 4 + i], math.cos(pos * omega), abs_tol=1e-6)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_loss_is_mse_on_masked_patches_only(norm_pix_loss):
    torch.manual_seed(0)
    mae = MaskedAutoencoder(img_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=2, decoder_embed_dim=8,
                            decoder_depth=1, decoder_num_heads=2, norm_pix_loss=norm_pix_loss)
    imgs = torch.randn(3, 1, 8, 8, requires_grad=True)
    pred = torch.randn(3, 4, 16)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 0]])
    loss = mae.forward_loss(imgs, pred, mask)
    # brute force: a loop over masked patches, statistics from NumPy
    x, errors = imgs.detach().numpy(), []
    for b in range(3):
        for n in range(4):
            if mask[b, n]:
                i, j = divmod(n, 2)
                target = x[b, 0, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(-1)
                if norm_pix_loss:
                    target = (target - target.mean()) / np.sqrt(target.var(ddof=1) + 1e-6)
                errors.append(np.mean((pred[b, n].numpy() - target) ** 2))
    assert math.isclose(loss.item(), float(np.mean(errors)), rel_tol=1e-5)
    loss.backward()
    grad = patchify(imgs.grad, 4).abs().sum(dim=-1)  # (3, 4)
    assert torch.all(grad[mask == 0] == 0)  # visible patches of the target get no gradient at all
    assert torch.all(grad[mask == 1] > 0)


def test_layer_wise_lr_decay_scales_each_block():
    clf = ViTClassifier(10, img_size=8, patch_size=4, embed_dim=8, depth=2, num_heads=2)
    groups = model.param_groups_lrd(clf, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert scale[id(clf.encoder.patch_embed.weight)] == 0.5 ** 3
    assert scale[id(clf.encoder.blocks[0].attn.qkv.weight)] == 0.5 ** 2
    assert scale[id(clf.encoder.blocks[1].mlp.fc1.weight)] == 0.5
    assert scale[id(clf.head.weight)] == 1.0
    assert wd[id(clf.head.weight)] == 0.05 and wd[id(clf.head.bias)] == 0.0 and wd[id(clf.encoder.norm.weight)] == 0


def test_encoder_flops_fall_with_the_mask_ratio():
    encoder = MAEEncoder(img_size=28, patch_size=4, embed_dim=16, depth=1, num_heads=2)
    rows = sample.encoder_cost(encoder, torch.randn(4, 1, 28, 28), [0.0, 0.5, 0.75, 0.9], repeats=1)
    assert [r[1] for r in rows] == [50, 1 + 24, 1 + 12, 1 + 5]
    flops = [r[2] for r in rows]
    assert all(a > b for a, b in zip(flops, flops[1:]))
    assert flops[2] < 0.3 * flops[0]  # 75% masking: roughly a quarter of the full encoder's cost


# ----------------------------------------------------------------------------------------------------------------------
# train.py: the loss falls, checkpoints resume exactly, probing keeps the encoder frozen


def test_tiny_mae_reconstruction_loss_falls(pretrained):
    rows = read_csv(pretrained)
    assert len(rows) == 6
    assert float(rows[-1]["train_loss"]) < 0.8 * float(rows[0]["train_loss"])
    assert float(rows[-1]["test_loss"]) < float(rows[0]["test_loss"])


@pytest.mark.parametrize("mode", ["pretrain", "linprobe", "finetune"])
def test_checkpoint_round_trip_and_exact_resume(mode, data_dir, pretrained, tmp_path, monkeypatch):
    extra = ["--init", pretrained] if mode != "pretrain" else ["--mask-ratio", "0.5"]
    straight = run_train(mode, data_dir, tmp_path / "straight", "--epochs", "2", *extra)
    save = train.save_checkpoint

    def save_then_crash(path, obj):  # the run dies right after its first checkpoint
        save(path, obj)
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_train(mode, data_dir, tmp_path / "half", "--epochs", "2", *extra)
    monkeypatch.setattr(train, "save_checkpoint", save)
    half = str(tmp_path / "half" / "ckpt.pt")
    ckpt = train.load_checkpoint(half)
    assert ckpt["folder"] == "mae" and ckpt["mode"] == mode and ckpt["epoch"] == 1
    rebuilt = train.build_model(ckpt["config"], mode)  # from the checkpoint alone
    rebuilt.load_state_dict(ckpt["model"])
    resumed = run_train(mode, data_dir, tmp_path / "half", "--epochs", "2", "--resume", half, *extra)
    a, b = train.load_checkpoint(straight)["model"], train.load_checkpoint(resumed)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(read_csv(resumed)) == 2


def test_same_seed_gives_the_same_run(data_dir, tmp_path):
    runs = [run_train("pretrain", data_dir, tmp_path / name, "--epochs", "1", "--seed", seed)
            for name, seed in [("a", "3"), ("b", "3"), ("c", "4")]]
    a, b, c = (train.load_checkpoint(r)["model"] for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_linprobe_keeps_the_pretrained_encoder_frozen(data_dir, pretrained, tmp_path):
    probe = train.load_checkpoint(run_train("linprobe", data_dir, tmp_path, "--epochs", "2", "--init", pretrained))
    init = train.load_checkpoint(pretrained)["model"]
    encoder_keys = [k for k in probe["model"] if k.startswith("encoder.")]
    assert encoder_keys and all(torch.equal(probe["model"][k], init[k]) for k in encoder_keys)
    clf = train.build_model(probe["config"], "linprobe")
    assert isinstance(clf.head[0], torch.nn.BatchNorm1d) and not clf.head[0].affine  # BN without affine + linear
    assert float(read_csv(str(tmp_path / "ckpt.pt"))[-1]["test_acc"]) > 10  # the synthetic classes are learnable


def test_ddp_two_processes_on_cpu(data_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", "pretrain", "--data-dir", str(data_dir), "--out-dir", str(tmp_path),
                             "--epochs", "1", "--device", "cpu", *TINY], cwd=HERE, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr  # all of it: a failing rank's own message comes before torchrun's summary
    rows = read_csv(str(tmp_path / "ckpt.pt"))
    assert len(rows) == 1 and int(rows[0]["step"]) == 2  # 256 images / 2 ranks / 64 per step


# ----------------------------------------------------------------------------------------------------------------------
# sample.py: the figure and the evaluation from a checkpoint alone


def test_sample_writes_reconstructions_and_eval_matches_training(data_dir, pretrained, tmp_path, capsys):
    out = tmp_path / "recon.png"
    sample.main(["--checkpoint", pretrained, "--data-dir", str(data_dir), "--out", str(out), "--num-images", "4"])
    assert out.stat().st_size > 1000
    probe = run_train("linprobe", data_dir, tmp_path / "probe", "--epochs", "1", "--init", pretrained)
    capsys.readouterr()
    sample.main(["--checkpoint", probe, "--data-dir", str(data_dir), "--eval"])
    printed = float(capsys.readouterr().out.split("=")[-1].split()[0])
    assert math.isclose(printed, float(read_csv(probe)[-1]["test_acc"]), abs_tol=1e-6)  # images vs cached features


def test_reconstruction_with_visible_patches_pasted_keeps_them_exactly():
    torch.manual_seed(0)
    mae = MaskedAutoencoder(img_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=2, decoder_embed_dim=8,
                            decoder_depth=1, decoder_num_heads=2)
    imgs = torch.randn(2, 1, 8, 8)
    mask_img, recon, pasted = sample.reconstruct(mae, imgs, 0.75)
    assert torch.equal(pasted[mask_img == 0], imgs[mask_img == 0])
    assert torch.equal(pasted[mask_img == 1], recon[mask_img == 1])


# ----------------------------------------------------------------------------------------------------------------------
# Data: the real loaders on small files in torchvision's layouts; errors a user can cause


def test_fashion_mnist_and_cifar10_loaders_read_torchvision_layouts(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path, folder="FashionMNIST", n_train=20, n_test=10)
    train_x, train_y, test_x, _ = train.load_dataset("fashion-mnist", tmp_path)
    assert train_x.shape == (20, 1, 28, 28) and test_x.shape == (10, 1, 28, 28) and train_y.dtype == torch.long
    rng = np.random.default_rng(0)
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    arrays = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        arrays[name] = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        with open(batches / name, "wb") as f:
            pickle.dump({"data": arrays[name], "labels": list(range(4))}, f)
    with open(batches / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    monkeypatch.setattr(datasets.CIFAR10, "_check_integrity", lambda self: True)  # our files have no official md5
    monkeypatch.setattr(datasets.CIFAR10, "_load_meta", lambda self: None)
    train_x, train_y, test_x, test_y = train.load_dataset("cifar10", tmp_path)
    assert train_x.shape == (20, 3, 32, 32) and test_x.shape == (4, 3, 32, 32)
    assert torch.equal(train_x[0], torch.as_tensor(arrays["data_batch_1"][0]).reshape(3, 32, 32))
    cfg = dict(vars(train.parse_args(["--dataset", "cifar10", "--patch-size", "8"])[1]))
    mae = train.build_model(cfg, "pretrain")
    loss, pred, _ = mae(train.normalize(train_x[:2], "cifar10"), 0.75)
    assert pred.shape == (2, 16, 8 * 8 * 3) and torch.isfinite(loss)


def test_missing_dataset_exits_in_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    def offline(self):
        os.makedirs(self.raw_folder, exist_ok=True)  # a real failed download leaves this behind
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")
    monkeypatch.setattr(datasets.MNIST, "download", offline)
    root = tmp_path / "empty"
    with pytest.raises(SystemExit) as exit_info:
        train.load_dataset("mnist", root)
    message = str(exit_info.value.code)
    assert message.startswith("error: mnist") and str(root / "MNIST") in message and "DATA_DIR" in message
    assert "\n" not in message and not root.exists()


def test_bad_checkpoints_exit_in_one_line(tmp_path, pretrained):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(Path(pretrained).read_bytes()[:200])
    other = tmp_path / "other.pt"
    torch.save({"folder": "gpt", "model": {}}, other)
    for path, words in [(tmp_path / "missing.pt", "no checkpoint"), (corrupt, "corrupt"), (other, "not written by mae")]:
        with pytest.raises(SystemExit) as exit_info:
            train.load_checkpoint(str(path))
        assert words in str(exit_info.value.code) and "\n" not in str(exit_info.value.code)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["finetune", "--init", str(other), "--data-dir", str(tmp_path)])
    assert "not written by mae" in str(exit_info.value.code)


@pytest.mark.parametrize("script,args", [
    ("train.py", ["pretrain", "--mask-ratio", "1.0"]),
    ("sample.py", ["--checkpoint", "does/not/exist.pt"]),
])
def test_user_errors_give_one_line_and_no_traceback(script, args):
    result = subprocess.run([sys.executable, script, *args], cwd=HERE, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]  # argparse prints its usage first; sys.exit only this line
    assert last.startswith(("error: ", f"{script}: error: "))


def test_mask_ratio_outside_zero_one_is_rejected():
    for bad in ["0", "1", "-0.5", "1.5"]:
        with pytest.raises(SystemExit):
            train.parse_args(["--mask-ratio", bad])


def test_real_mnist_loads_when_available():
    data_dir = os.environ.get("DATA_DIR", "")
    if not (Path(data_dir) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        pytest.skip("DATA_DIR does not hold MNIST")
    train_x, train_y, test_x, test_y = train.load_dataset("mnist", data_dir)
    assert train_x.shape == (60000, 1, 28, 28) and test_x.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(test_y), torch.bincount(test_y, minlength=10)) and test_y.max() == 9
