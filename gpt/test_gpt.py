"""The claims of gpt/, each checked against an independent reference. Runs in well under 30 s on 2 CPU cores."""
import csv
import math
import os
import subprocess
import sys
import urllib.request

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import model
import sample
import train
from model import GPT, CharTokenizer, GPTConfig

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n") * 30
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "8",
        "--eval-batches", "2", "--sample-chars", "20", "--threads", "1"]


def tiny_gpt(**overrides):
    torch.manual_seed(0)
    config = dict(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0, attn_dropout=0.0, bias=True)
    return GPT(GPTConfig(**{**config, **overrides})).eval()


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def one_line_exit(excinfo, *fragments):
    message = str(excinfo.value.code)
    assert message.startswith("error:") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


# --------------------------------------------------------------------------------------------------- the model
def test_causality_future_tokens_never_change_past_logits():
    gpt = tiny_gpt()
    idx = torch.randint(11, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = (idx[:, 9:] + 1) % 11
    logits, _ = gpt(idx)
    logits_changed, _ = gpt(changed)
    assert torch.allclose(logits[:, :9], logits_changed[:, :9], atol=1e-6)
    assert not torch.allclose(logits[:, 9:], logits_changed[:, 9:], atol=1e-3)  # the test can fail


def test_fused_attention_equals_explicit_math():
    gpt = tiny_gpt()
    idx = torch.randint(11, (3, 16))
    fused, _ = gpt(idx)
    for block in gpt.blocks:
        block.attn.fused = False
    explicit, _ = gpt(idx)
    assert torch.allclose(fused, explicit, atol=1e-5)
    # and the explicit path is softmax(QK^T/sqrt(d) + mask) V computed by a brute-force loop over positions
    q, k, v = torch.randn(3, 1, 2, 5, 4).unbind(0)
    out = model.explicit_attention(q, k, v, model.causal_mask(5, 5))
    for t in range(5):
        w = torch.softmax(q[:, :, t:t + 1] @ k[:, :, :t + 1].transpose(-2, -1) / 2.0, dim=-1)  # sqrt(4) = 2
        assert torch.allclose(out[:, :, t:t + 1], w @ v[:, :, :t + 1], atol=1e-6)


def test_attention_equals_torch_multihead_attention():
    gpt = tiny_gpt()
    attn = gpt.blocks[0].attn
    mha = nn.MultiheadAttention(16, 2, bias=True, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn.qkv.weight)
        mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)
    x = torch.randn(2, 7, 16)
    future = ~model.causal_mask(7, 7)  # MultiheadAttention masks where True
    expected, _ = mha(x, x, x, attn_mask=future, need_weights=False)
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_kv_cache_logits_match_full_recompute():
    gpt = tiny_gpt()
    idx = torch.randint(11, (2, 12))
    full, _ = gpt(idx)
    cache = [{"block_size": 16} for _ in gpt.blocks]
    prefix, _ = gpt(idx[:, :5], cache=cache)
    steps = [gpt(idx[:, t:t + 1], cache=cache, start=t)[0] for t in range(5, 9)]
    chunk, _ = gpt(idx[:, 9:], cache=cache, start=9)  # several new positions at once: the shifted causal mask
    assert torch.allclose(torch.cat([prefix, *steps, chunk], dim=1), full, atol=1e-5)


def test_kv_cache_generation_equals_no_cache_generation_greedy():
    gpt = tiny_gpt()
    prompt = torch.randint(11, (3, 5))
    cached = gpt.generate(prompt, 40, temperature=0, use_cache=True)  # 45 > block_size 16: the window slides
    recomputed = gpt.generate(prompt, 40, temperature=0, use_cache=False)
    assert cached.shape == (3, 45)
    assert torch.equal(cached, recomputed)


def test_top_k_and_top_p_sample_only_allowed_ids():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.sample_next(logits, top_k=1, generator=g), torch.zeros(500, 1, dtype=torch.long))
    assert set(model.sample_next(logits, top_k=2, generator=g).unique().tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # 0.636, 0.234, 0.086, ...: the nucleus for top_p=0.8 is ids {0, 1}
    assert probs[0] < 0.8 <= probs[:2].sum()
    assert set(model.sample_next(logits, top_p=0.8, generator=g).unique().tolist()) == {0, 1}
    assert set(model.sample_next(logits, generator=g).unique().tolist()) == {0, 1, 2, 3, 4}


def test_initial_loss_is_close_to_ln_vocab_size():
    gpt = tiny_gpt(vocab_size=65)
    idx = torch.randint(65, (8, 16))
    _, loss = gpt(idx, torch.randint(65, (8, 16)))
    assert abs(loss.item() - math.log(65)) < 0.1


def test_weight_tying_and_decay_on_matrices_only():
    gpt = tiny_gpt()
    assert gpt.lm_head.weight is gpt.wte.weight
    decay, no_decay = gpt.configure_optimizer(0.1, 1e-3, (0.9, 0.99), "cpu").param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(gpt.parameters()))


def test_tiny_model_overfits_a_short_text():
    tokenizer = CharTokenizer.from_text(TEXT)
    data = torch.tensor(tokenizer.encode(TEXT[:100]))
    gpt = tiny_gpt(vocab_size=len(tokenizer), n_embd=32).train()
    optimizer = gpt.configure_optimizer(0.0, 1e-2, (0.9, 0.99), "cpu")
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        x, y = train.get_batch(data, 16, 16, g)
        _, loss = gpt(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.3  # from ln(27) = 3.3; what is left is the first characters of each window


def test_tokenizer_round_trip():
    text = "Wár is peace.\nFreedom is slavery. 2 + 2 = 5 ☂"
    tokenizer = CharTokenizer.from_text(text)
    assert len(tokenizer) == len(set(text))
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.unknown("peace? war!") == ["?", "w", "!"]


def test_batches_are_shifted_windows_of_the_text():
    data = torch.arange(100)
    x, y = train.get_batch(data, 8, 4, torch.Generator().manual_seed(0))
    assert torch.equal(y, x + 1) and torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 7, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------- training
def test_training_loss_falls_and_same_seed_gives_same_run(tmp_path, text_file):
    runs = []
    for name in ["a", "b"]:
        train.main(["--text-file", text_file, *TINY, "--steps", "60", "--eval-interval", "30", "--lr", "1e-2",
                    "--warmup-steps", "5", "--out-dir", str(tmp_path / name)])
        runs.append(read_csv(tmp_path / name / "metrics.csv"))
    assert float(runs[0][-1]["val_loss"]) < float(runs[0][0]["val_loss"]) - 1.0
    assert [r["val_loss"] for r in runs[0]] == [r["val_loss"] for r in runs[1]]


def test_resume_continues_like_an_uninterrupted_run(tmp_path, text_file):
    common = ["--text-file", text_file, *TINY, "--dropout", "0.1", "--lr", "3e-3", "--min-lr", "3e-3",
              "--warmup-steps", "0", "--eval-interval", "3"]  # dropout uses the RNG; a constant lr spans both runs
    train.main([*common, "--steps", "9", "--out-dir", str(tmp_path / "whole")])
    train.main([*common, "--steps", "3", "--out-dir", str(tmp_path / "split")])
    train.main([*common, "--steps", "9", "--out-dir", str(tmp_path / "split"), "--resume", str(tmp_path / "split" / "last.pt")])
    whole, split = read_csv(tmp_path / "whole" / "metrics.csv"), read_csv(tmp_path / "split" / "metrics.csv")
    assert [r["step"] for r in split] == ["0", "3", "6", "9"]
    assert [(r["train_loss"], r["val_loss"]) for r in whole] == [(r["train_loss"], r["val_loss"]) for r in split]


def test_sample_reads_a_checkpoint_and_writes_the_sample_format(tmp_path, text_file, capsys):
    train.main(["--text-file", text_file, *TINY, "--steps", "2", "--eval-interval", "2", "--out-dir", str(tmp_path)])
    out = tmp_path / "generated.txt"
    samples = sample.main(["--ckpt", str(tmp_path / "best.pt"), "-p", "To be", "-n", "30", "--num-samples", "3",
                           "--top-p", "0.9", "--out", str(out), "--seed", "0"])
    written = out.read_text(encoding="utf-8")
    assert [len(s) for s in samples] == [35] * 3 and all(s.startswith("To be") for s in samples)
    assert written == "".join(f"################ SAMPLE {k} ################\n{s}\n" for k, s in enumerate(samples, 1))
    assert samples[0] in capsys.readouterr().out  # streamed to the terminal
    assert sample.main(["--ckpt", str(tmp_path / "best.pt"), "-n", "20", "--benchmark"])[2]  # cache == no cache
    sample.main(["--plot", str(tmp_path), "--plot-out", str(tmp_path / "loss.png")])
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_shakespeare_is_read_from_data_dir(tmp_path):
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text(TEXT)
    args = train.parse_args(["--data-dir", str(tmp_path)])
    assert train.load_text(args) == TEXT


def test_real_tiny_shakespeare_when_available():
    path = os.path.join(os.environ.get("DATA_DIR", "data"), "tinyshakespeare", "input.txt")
    if not os.path.exists(path):
        pytest.skip(f"Tiny Shakespeare not in {path} (set DATA_DIR)")
    text = train.load_text(train.parse_args(["--data-dir", os.path.dirname(os.path.dirname(path))]))
    assert len(text) == 1115394 and len(CharTokenizer.from_text(text)) == 65


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun's gloo rendezvous")
def test_torchrun_two_processes_gloo(tmp_path, text_file):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", "--text-file", text_file, *TINY, "--device", "cpu", "--steps", "4",
                          "--eval-interval", "2", "--out-dir", str(tmp_path)],
                         cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr  # all of it: a failing rank's own message comes before torchrun's summary
    assert [r["step"] for r in read_csv(tmp_path / "metrics.csv")] == ["0", "2", "4"]
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and len(ckpt["rng"]["batches"]) == 2  # both ranks' batch streams were saved


# ------------------------------------------------------------------------------------------------------ errors
def test_unknown_prompt_characters_give_one_line_error(tmp_path, text_file):
    train.main(["--text-file", text_file, *TINY, "--steps", "1", "--eval-interval", "1", "--out-dir", str(tmp_path)])
    run = subprocess.run([sys.executable, "sample.py", "--ckpt", str(tmp_path / "best.pt"), "-p", "To be? Yes!"],
                         cwd=HERE, capture_output=True, text=True)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert run.stderr.strip().count("\n") == 0 and "'?Y!'" in run.stderr


def test_missing_text_file_gives_one_line_error(tmp_path):
    run = subprocess.run([sys.executable, "train.py", "--text-file", str(tmp_path / "nope.txt"), "--out-dir", str(tmp_path / "o")],
                         cwd=HERE, capture_output=True, text=True)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert run.stderr.strip() == f"error: text file {tmp_path / 'nope.txt'} not found"
    assert not (tmp_path / "o").exists()


def test_empty_file_and_too_large_block_give_one_line_errors(tmp_path, text_file):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SystemExit) as e:
        train.main(["--text-file", str(tmp_path / "empty.txt"), "--out-dir", str(tmp_path / "o")])
    one_line_exit(e, "empty")
    with pytest.raises(SystemExit) as e:
        train.main(["--text-file", text_file, "--block-size", "2000", "--out-dir", str(tmp_path / "o")])
    one_line_exit(e, "--block-size 2000", "too large")
    assert not (tmp_path / "o").exists()


def test_offline_without_shakespeare_gives_one_line_error_and_leaves_nothing(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit) as e:
        train.main(["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "o")])
    one_line_exit(e, "Tiny Shakespeare", str(tmp_path / "data"), "DATA_DIR")
    assert os.listdir(tmp_path) == []


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    torch.save({"folder": "vit", "model": {}}, tmp_path / "vit.pt")
    for name, fragment in [("missing.pt", "not found"), ("corrupt.pt", "truncated or corrupt"), ("vit.pt", "'vit'")]:
        with pytest.raises(SystemExit) as e:
            sample.main(["--ckpt", str(tmp_path / name)])
        one_line_exit(e, fragment)


def test_bad_flags_are_rejected_by_the_parser(capsys):
    for flags in [["--n-embd", "30", "--n-head", "4"], ["--block-size", "0"], ["--dropout", "1.5"],
                  ["--attn-dropout", "-0.1"]]:
        with pytest.raises(SystemExit) as e:
            train.parse_args(flags)
        assert e.value.code == 2
    assert "error:" in capsys.readouterr().err
