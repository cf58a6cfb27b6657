"""Checks of the paper's claims and of the tool: the coder is exactly lossless, its length is the model's
log-loss, encoder and decoder see identical predictions, and damaged files are refused."""
import math
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import model
import sample
import train

torch.set_num_threads(1)  # tiny models on a shared 2-core machine: one thread is much faster
HERE = os.path.dirname(os.path.abspath(__file__))


def code_with_tables(tables, symbols):
    """Encode then decode `symbols`, symbol t drawn against frequency row `tables[t]`."""
    cum = model.cumulative(tables)
    enc = model.ArithmeticEncoder()
    for t, s in enumerate(symbols):
        enc.encode(int(cum[t, s]), int(cum[t, s + 1]))
    code = enc.finish()
    dec = model.ArithmeticDecoder(code)
    cum_np = cum.numpy()
    return code, [dec.decode(cum_np[t]) for t in range(len(symbols))]


def random_tables(seed, n, vocab, temperature):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64) * temperature
    probs = torch.softmax(logits, dim=-1)
    symbols = torch.multinomial(probs.float(), 1, generator=g).squeeze(1)
    return model.quantize(logits), symbols.tolist()


# ----------------------------------------------------------------------------------------------------
# The arithmetic coder


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(0, 300), vocab=st.integers(2, 300),
       temperature=st.sampled_from([0.0, 0.1, 1.0, 5.0, 30.0, 1e4]), adversarial=st.booleans())
def test_coder_round_trip_on_random_distributions_and_streams(seed, n, vocab, temperature, adversarial):
    tables, symbols = random_tables(seed, n, vocab, temperature)
    if adversarial:  # always the least likely symbol: the code must still be exact
        symbols = tables.argmin(dim=-1).tolist()
    _, decoded = code_with_tables(tables, symbols)
    assert decoded == symbols


def test_coder_round_trip_on_extreme_distributions():
    n = 2000
    certain = model.quantize(torch.tensor([[0.0] + [-1e4] * 255]).repeat(n, 1))  # p(0) ~ 1
    uniform = model.quantize(torch.zeros(n, 256))
    rng = np.random.default_rng(0)
    for tables, symbols in [(certain, [0] * n),                                  # the near-certain symbol
                            (certain, rng.integers(1, 256, n).tolist()),         # only the ~impossible ones
                            (certain, rng.choice([0, 0, 0, 7], n).tolist()),     # a mix
                            (uniform, rng.integers(0, 256, n).tolist())]:
        code, decoded = code_with_tables(tables, symbols)
        assert decoded == symbols
    assert len(code) == pytest.approx(n, abs=3)  # uniform over 256: 8 bits each


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), vocab=st.integers(1, 3000), scale=st.sampled_from([0.0, 1.0, 50.0, 1e6]))
def test_quantized_frequencies_are_deterministic_never_zero_and_sum_to_total(seed, vocab, scale):
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(seed)) * scale
    freqs = model.quantize(logits)
    assert torch.equal(freqs, model.quantize(logits.clone()))
    assert freqs.min() >= 1 and (freqs.sum(-1) == model.TOTAL).all()
    # each frequency is the probability times TOTAL, up to the +1 floor and the remainder (numpy reference)
    p = np.exp(logits.double().numpy() - logits.double().numpy().max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert np.abs(freqs.numpy() - p * model.TOTAL).max() <= vocab + 1


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 2000), temperature=st.sampled_from([0.5, 3.0, 20.0]))
def test_code_length_is_within_a_few_bytes_of_the_sum_of_minus_log2_p(seed, n, temperature):
    tables, symbols = random_tables(seed, n, 256, temperature)
    ideal = -sum(math.log2(tables[t, s].item() / model.TOTAL) for t, s in enumerate(symbols)) / 8
    code, _ = code_with_tables(tables, symbols)
    assert ideal - 2 <= len(code) <= ideal + 2


# ----------------------------------------------------------------------------------------------------
# The model and the encode/decode replay


def tiny_byte_model(seed=0, block_size=16):
    torch.manual_seed(seed)
    return model.ByteTransformer(block_size=block_size, n_layer=2, n_head=2, n_embd=32).eval()


def test_kv_cache_steps_match_full_forward():
    lm = tiny_byte_model()
    x = torch.randint(0, 256, (3, 15), generator=torch.Generator().manual_seed(1))
    full, _ = lm(torch.cat([torch.full((3, 1), 256), x], dim=1))  # reference: one causal pass
    stepper = model.Stepper(lm, 3, "cpu")
    steps = [stepper.first()] + [stepper.next(x[:, t]) for t in range(15)]
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_sliding_window_restart_sees_bos_and_the_last_half_window():
    lm = tiny_byte_model(block_size=8)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    stepper = model.Stepper(lm, 2, "cpu")
    stepper.first()
    for t in range(11):
        logits = stepper.next(x[:, t])
    # window 8: the context fills up at symbol 7 and restarts as BOS + symbols 5..7, then grows to 5..10
    reference, _ = lm(torch.cat([torch.full((2, 1), 256), x[:, 5:11]], dim=1))
    torch.testing.assert_close(logits, reference[:, -1], atol=1e-5, rtol=1e-5)


EDGE_CASES = {"empty": b"", "one byte": b"\x00", "every byte value": bytes(range(256)),
              "random bytes": np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes(),
              "utf-8 text": "Ünïcödé — naïve café, 日本語のテキスト, emoji 🎉🐍 and plain ASCII.\n".encode() * 2}


@pytest.mark.parametrize("chunk_size", [100, 0])  # chunks batched (ragged last group), one long context
def test_round_trip_is_exact_on_edge_cases(chunk_size):
    lm = tiny_byte_model()
    for name, data in EDGE_CASES.items():
        blob = sample.compress(data, lm, sample.ByteTokenizer(), "tiny", chunk_size=chunk_size, batch_size=3)
        assert sample.decompress(blob, lm, sample.ByteTokenizer(), "tiny") == data, name


def test_encode_and_decode_see_the_same_symbols_and_code_length():
    """The coded length matches the replayed model's log-loss, and a longer context keeps working."""
    lm = tiny_byte_model()
    data = list(b"to be or not to be, that is the question " * 8)
    code = model.encode(lm, data, chunk_size=64, batch_size=4)
    assert model.decode(lm, code, len(data), chunk_size=64, batch_size=4) == data
    assert abs(len(code) - model.code_length_bits(lm, data, 64, 4) / 8) <= 2


def test_trained_model_compresses_text_better_than_untrained():
    text = b"the cat sat on the mat. " * 20
    lm = tiny_byte_model()
    before = len(model.encode(lm, list(text), 256, 8))
    opt = torch.optim.Adam(lm.parameters(), lr=1e-2)
    data = torch.tensor(list(text))
    lm.train()
    for i in range(40):
        x, y = train.get_batch(data, 8, 16, torch.Generator().manual_seed(i))
        loss = torch.nn.functional.cross_entropy(lm(x)[0].flatten(0, 1), y.flatten())
        opt.zero_grad(), loss.backward(), opt.step()
    lm.eval()
    code = model.encode(lm, list(text), 256, 8)
    assert model.decode(lm, code, len(text), 256, 8) == list(text)
    assert len(code) < 0.5 * before


# ----------------------------------------------------------------------------------------------------
# Hugging Face `transformers` models (tiny, random, built from a config: no download)


def tiny_gpt2(vocab_size, seed=0):
    import transformers
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_transformers_model_round_trips_10k_tokens():
    lm = model.HFModel(tiny_gpt2(256), bos_id=0)
    tokens = np.random.default_rng(1).integers(0, 256, 10_000).tolist()
    code = model.encode(lm, tokens, chunk_size=250, batch_size=40)  # 40 chunks, windows of 64 restarting
    assert model.decode(lm, code, len(tokens), chunk_size=250, batch_size=40) == tokens


def test_hf_model_by_name_from_a_local_folder_compresses_and_decompresses(tmp_path):
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    text = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 3
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>")
    folder = str(tmp_path / "tiny-gpt2")
    fast.save_pretrained(folder)
    tiny_gpt2(len(fast)).save_pretrained(folder)
    (tmp_path / "in.txt").write_text(text + "naïve 日本 🎉", encoding="utf-8")
    src, packed, out = (str(tmp_path / n) for n in ["in.txt", "in.lmz", "out.txt"])
    sample.main(["--hf-model", folder, "--chunk-size", "40", "compress", src, "-o", packed])
    sample.main(["--hf-model", folder, "decompress", packed, "-o", out])
    assert open(out, "rb").read() == open(src, "rb").read()
    assert sample.unpack(open(packed, "rb").read())["model_id"] == f"hf:{folder}"
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00 not utf-8")
    with pytest.raises(SystemExit, match="not UTF-8"):
        sample.main(["--hf-model", folder, "compress", str(tmp_path / "bin"), "-o", packed])


# ----------------------------------------------------------------------------------------------------
# The container: damaged files and the wrong model are refused, never decoded into wrong output


@pytest.fixture(scope="module")
def packed():
    lm = tiny_byte_model()
    data = b"All the world's a stage, and all the men and women merely players. " * 3
    return lm, data, sample.compress(data, lm, sample.ByteTokenizer(), "tiny", chunk_size=64, batch_size=2)


def test_header_records_length_checksum_and_model(packed):
    lm, data, blob = packed
    h = sample.unpack(blob)
    assert (h["length"], h["crc"], h["weights"]) == (len(data), zlib.crc32(data), model.weights_hash(lm))


def test_corrupted_header_is_detected(packed):
    lm, _, blob = packed
    for i in range(5, sample.HEADER.size):  # every byte after magic and version
        damaged = blob[:i] + bytes([blob[i] ^ 0x40]) + blob[i + 1:]
        with pytest.raises(sample.CompressionError, match="corrupted|truncated|different model"):
            sample.decompress(damaged, lm, sample.ByteTokenizer(), "tiny")
    with pytest.raises(sample.CompressionError, match="magic"):
        sample.decompress(b"PK\x03\x04" + blob[4:], lm, sample.ByteTokenizer(), "tiny")


def test_corrupted_payload_is_detected(packed):
    lm, _, blob = packed
    for i in [len(blob) - 1, len(blob) - 10, len(blob) - 30]:
        damaged = blob[:i] + bytes([blob[i] ^ 0x01]) + blob[i + 1:]
        with pytest.raises(sample.CompressionError, match="payload is corrupted"):
            sample.decompress(damaged, lm, sample.ByteTokenizer(), "tiny")


def test_truncated_file_is_detected(packed):
    lm, _, blob = packed
    for n in [0, 3, 20, sample.HEADER.size + 3, len(blob) - 1]:
        with pytest.raises(sample.CompressionError, match="truncated|magic"):
            sample.decompress(blob[:n], lm, sample.ByteTokenizer(), "tiny")


def test_wrong_model_is_detected(packed):
    _, _, blob = packed
    with pytest.raises(sample.CompressionError, match="different model"):
        sample.decompress(blob, tiny_byte_model(seed=1), sample.ByteTokenizer(), "other")


def test_to_float_gives_an_exact_fraction_that_decodes_back(capsys):
    lm = tiny_byte_model()
    text = "The quick brown fox jumps over the lazy dog"
    fraction, back = sample.to_float(text, lm, sample.ByteTokenizer())
    assert 0 <= fraction < 1 and back == text.encode()
    k = fraction.denominator.bit_length() - 1  # fraction = numerator / 2^k: the bits of the code
    code = (fraction.numerator << (-k % 8)).to_bytes((k + 7) // 8, "big")
    assert model.decode(lm, code, len(text), chunk_size=0, batch_size=1) == list(text.encode())
    assert "round trip exact: True" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# Training, checkpoints, the command line


def tiny_train_args(tmp_path, *extra):
    text = tmp_path / "text.txt"
    if not text.exists():
        text.write_bytes(b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 60)
    return ["--text-file", str(text), "--out-dir", str(tmp_path / "run"), "--block-size", "16", "--n-layer", "1",
            "--n-head", "2", "--n-embd", "32", "--batch-size", "8", "--warmup", "5", "--eval-interval", "10",
            "--eval-batches", "2", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    train.main(tiny_train_args(tmp, "--steps", "60", "--keep-every", "30"))
    return tmp


def test_training_loss_falls(trained):
    rows = open(trained / "run" / "log.csv").read().splitlines()[1:]
    val = [float(r.split(",")[4]) for r in rows]
    assert val[-1] < val[0] - 1.0 and val[-1] < math.log(256) - 2


def test_resume_continues_exactly(tmp_path):
    train.main(tiny_train_args(tmp_path, "--steps", "12", "--out-dir", str(tmp_path / "a")))
    train.main(tiny_train_args(tmp_path, "--steps", "12", "--out-dir", str(tmp_path / "b"), "--max-minutes", "1e-9"))
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 0
    train.main(tiny_train_args(tmp_path, "--steps", "12", "--out-dir", str(tmp_path / "b"),
                               "--resume", str(tmp_path / "b" / "ckpt.pt")))
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert a["step"] == b["step"] == 12
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_same_seed_gives_the_same_run(tmp_path, trained):
    train.main(tiny_train_args(tmp_path, "--steps", "60", "--keep-every", "30"))
    a = torch.load(trained / "run" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_errors_are_one_line(tmp_path, trained):
    (tmp_path / "bad.pt").write_bytes(open(trained / "run" / "ckpt.pt", "rb").read()[:300])
    torch.save({"folder": "gpt"}, tmp_path / "other.pt")
    for path, message in [(tmp_path / "none.pt", "does not exist"), (tmp_path / "bad.pt", "truncated or corrupt"),
                          (tmp_path / "other.pt", "not an lm_compression checkpoint")]:
        with pytest.raises(SystemExit, match=message):
            train.load_checkpoint(str(path))


def test_missing_dataset_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "SHAKESPEARE_URL", "file:///nonexistent/input.txt")
    with pytest.raises(SystemExit, match="Tiny Shakespeare not found"):
        train.main(["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "run")])
    assert os.listdir(tmp_path / "data") == []


def test_cli_compress_decompress_bench_and_curve_on_a_checkpoint(tmp_path, trained, capsys):
    ckpt = str(trained / "run" / "ckpt.pt")
    src = tmp_path / "in.txt"
    src.write_bytes(b"Before we proceed any further, hear me speak. " * 10)
    sample.main(["--checkpoint", ckpt, "compress", str(src), "-o", str(tmp_path / "x.lmz")])
    sample.main(["--checkpoint", ckpt, "decompress", str(tmp_path / "x.lmz"), "-o", str(tmp_path / "out")])
    assert (tmp_path / "out").read_bytes() == src.read_bytes()
    assert os.path.getsize(tmp_path / "x.lmz") < len(src.read_bytes())
    rows = sample.bench([str(src)], sample.load_model(sample.get_args(["--checkpoint", ckpt, "bench", str(src)]))[0],
                        sample.ByteTokenizer(), "t", sample.get_args(["--checkpoint", ckpt, "bench", str(src)]))
    assert rows[0][-1] == "yes" and "gzip -9" in capsys.readouterr().out
    plot = tmp_path / "curve.png"
    points = sample.curve([str(trained / "run" / "ckpt_step30.pt"), ckpt], str(src),
                          sample.get_args(["curve", ckpt, "--file", str(src), "--plot", str(plot)]))
    assert plot.stat().st_size > 0 and points[-1][2] <= points[0][2] + 0.1


def test_cli_errors_are_one_line_without_traceback(tmp_path, trained):
    (tmp_path / "junk.lmz").write_bytes(b"LMZ\x1a\x01" + b"\x00" * 40)
    runs = [[sys.executable, "train.py", "--steps", "0"],
            [sys.executable, "sample.py", "--checkpoint", str(trained / "run" / "ckpt.pt"),
             "decompress", str(tmp_path / "junk.lmz"), "-o", str(tmp_path / "out")]]
    for cmd in runs:
        result = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 or "usage:" in result.stderr
    assert not (tmp_path / "out").exists()


def test_real_tiny_shakespeare_split_holds_out_the_last_111540_bytes():
    path = os.path.join(os.environ.get("DATA_DIR", "data"), "tinyshakespeare", "input.txt")
    if not os.path.isfile(path):
        pytest.skip(f"Tiny Shakespeare not found at {path} (set DATA_DIR)")
    data = open(path, "rb").read()
    train_part, held_out = train.split(data)
    assert len(held_out) == 111_540 and bytes(held_out.tolist()) == data[-111_540:]
    assert len(train_part) + len(held_out) == len(data)
