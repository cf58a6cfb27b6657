"""The rules that hold the monorepo together: ten self-contained folders, one conftest mechanism."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ["ddpm", "fff", "gnns", "gpt", "lm_compression", "nf", "ppo", "vit", "mae", "clip"]
PRESENT = [f for f in FOLDERS if (ROOT / f / "model.py").exists()]


def local_modules(folder):
    return {p.stem for p in (ROOT / folder).glob("*.py")}


def imported_names(path):
    """Top-level names of every import in a file, and whether it touches sys.path."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level)  # relative imports break `python train.py`
    touches_sys_path = "sys.path" in path.read_text()
    return names, touches_sys_path


def import_violations(folder, root=ROOT):
    """Imports in `folder` that would break once the folder is copied alone."""
    own = {p.stem for p in (root / folder).glob("*.py")}
    others = set(FOLDERS) - {folder}
    for other in others:
        if (root / other).is_dir():
            others = others | ({p.stem for p in (root / other).glob("*.py")} - own)
    bad = []
    for path in sorted((root / folder).rglob("*.py")):
        names, touches_sys_path = imported_names(path)
        for name in sorted(names & others) + sorted(n for n in names if n.startswith(".")):
            bad.append(f"{path.relative_to(root)} imports {name!r}")
        if touches_sys_path and path.name != "conftest.py":
            bad.append(f"{path.relative_to(root)} edits sys.path")
    return bad


def test_every_folder_exists():
    missing = [f for f in FOLDERS if not (ROOT / f).is_dir()]
    assert not missing, f"missing folders: {missing}"


@pytest.mark.parametrize("folder", FOLDERS)
def test_folder_has_its_files(folder):
    if folder not in PRESENT:
        pytest.skip(f"{folder}/ has no model.py yet")
    for name in [
        "model.py",
        "train.py",
        "sample.py",
        "README.md",
        f"test_{folder}.py",
        "conftest.py",
    ]:
        assert (ROOT / folder / name).exists(), f"{folder}/{name} is missing"


@pytest.mark.parametrize("name", ["conftest.py", "plumbing.py"])
def test_shared_files_are_the_same_file_everywhere(name):
    reference = (ROOT / "ppo" / name).read_bytes()
    for folder in FOLDERS:
        assert (ROOT / folder / name).read_bytes() == reference, (
            f"{folder}/{name} differs from ppo/{name}"
        )


# The naming sheet (README.md, Conventions): the flags every train.py and sample.py share.
TRAIN_FLAGS = [
    "--device",
    "--seed",
    "--data-dir",
    "--out-dir",
    "--lr",
    "--max-minutes",
    "--resume",
    "--threads",
    "--wandb",
    "--compile",
]
SAMPLE_FLAGS = ["--checkpoint", "--device"]
RETIRED = [
    "--ckpt",
    "--time-budget",
    "--total-steps",
    "--warmup",
    "--warmup-epochs",
    "--log-csv",
    "fashion-mnist",
    "{fashion,",
    ",fashion,",
    ",fashion}",
]


def help_text(folder, script):
    run = subprocess.run(
        [sys.executable, script, "--help"],
        cwd=ROOT / folder,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"),
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


def naming_sheet_violations(train_help, sample_help, train_source):
    words = set(train_help.replace("[", " ").replace("]", " ").split())
    bad = [f"train.py lacks {f}" for f in TRAIN_FLAGS if f not in words]
    if not {"--steps", "--epochs"} & words:
        bad.append("train.py has neither --steps nor --epochs")
    bad += [f"sample.py lacks {f}" for f in SAMPLE_FLAGS if f not in sample_help.split()]
    for text, script in [(train_help, "train.py"), (sample_help, "sample.py")]:
        tokens = set(text.replace("[", " ").replace("]", " ").split())
        bad += [
            f"{script} uses the retired name {r}"
            for r in RETIRED
            if r in tokens or (not r.startswith("--") and r in text)
        ]
    if "ckpt.pt" not in train_source:
        bad.append("train.py never writes ckpt.pt")
    if "MetricsLog" not in train_source and "metrics.csv" not in train_source:
        bad.append("train.py never writes metrics.csv")
    if "last.pt" in train_source or "log.csv" in train_source:
        bad.append("train.py writes last.pt or log.csv (the sheet says ckpt.pt and metrics.csv)")
    return bad


@pytest.mark.parametrize("folder", FOLDERS)
def test_flags_follow_the_naming_sheet(folder):
    train_source = (ROOT / folder / "train.py").read_text()
    bad = naming_sheet_violations(
        help_text(folder, "train.py"), help_text(folder, "sample.py"), train_source
    )
    assert bad == []


def test_naming_sheet_check_can_fail():
    good = " ".join(TRAIN_FLAGS + ["--steps"])
    assert naming_sheet_violations(good, "--checkpoint --device", "'ckpt.pt' MetricsLog") == []
    bad = naming_sheet_violations(
        good.replace("--max-minutes", "--time-budget") + " {mnist,fashion,cifar10}",
        "--ckpt --device",
        "'last.pt'",
    )
    assert "train.py lacks --max-minutes" in bad and "sample.py lacks --checkpoint" in bad
    assert "train.py uses the retired name --time-budget" in bad
    assert "train.py uses the retired name ,fashion," in bad
    assert any("last.pt" in b for b in bad)


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_folder_imports_another(folder):
    assert import_violations(folder) == []


def test_import_check_catches_a_cross_folder_import(tmp_path):
    """The rule above can fail: a folder that imports another folder's module is caught."""
    for folder, source in [
        ("gpt", "import torch\n"),
        ("vit", "from gpt.model import GPT\nimport tokenizer\n"),
    ]:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "model.py").write_text(source)
    (tmp_path / "gpt" / "tokenizer.py").write_text("")
    assert import_violations("vit", root=tmp_path) == [
        "vit/model.py imports 'gpt'",
        "vit/model.py imports 'tokenizer'",
    ]
    assert import_violations("gpt", root=tmp_path) == []


def run_pytest(cwd, *args):
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize("with_conftest", [True, False])
def test_conftest_keeps_same_named_modules_apart(tmp_path, with_conftest):
    """Two folders with a model.py each, in one pytest run: each test sees its own model."""
    for name in ["alpha", "beta"]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.py").write_text(f"NAME = {name!r}\n")
        (folder / "train.py").write_text("import model\nNAME = model.NAME\n")
        (folder / f"test_{name}.py").write_text(
            f"import model\nimport train\n\ndef test_own_modules():\n"
            f"    assert model.NAME == train.NAME == {name!r}\n"
        )
        if with_conftest:
            shutil.copy(ROOT / "ppo" / "conftest.py", folder / "conftest.py")
    result = run_pytest(tmp_path, "alpha", "beta")
    if with_conftest:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "2 passed" in result.stdout
    else:
        assert result.returncode != 0, (
            "without the conftest the second folder should see the first's model"
        )


@pytest.mark.parametrize("folder", FOLDERS)
def test_folder_works_when_copied_alone(tmp_path, folder):
    if folder not in PRESENT:
        pytest.skip(f"{folder}/ has no model.py yet")
    copy = tmp_path / folder
    shutil.copytree(
        ROOT / folder, copy, ignore=shutil.ignore_patterns("__pycache__", "runs", "data")
    )
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    help_run = subprocess.run(
        [sys.executable, "train.py", "--help"], cwd=copy, env=env, capture_output=True, text=True
    )
    assert help_run.returncode == 0, help_run.stderr
    assert "--seed" in help_run.stdout
    tests = run_pytest(copy, "-x")
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-3000:]


# ---------------------------------------------------------------------------------- shipped models
MAX_FILE_BYTES, MAX_TOTAL_BYTES = 8 * 2**20, 30 * 2**20  # per shipped file, for all ten folders


def shipped_model_problems(folder_dir):
    """What is wrong with a folder's pretrained/: files and manifest.json must agree exactly."""
    import hashlib
    import json

    pretrained = Path(folder_dir) / "pretrained"
    if not pretrained.is_dir():
        return ["no pretrained/ folder"]
    try:
        manifest = json.loads((pretrained / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        return [f"manifest.json unreadable ({type(e).__name__})"]
    problems = [f"{p.name} is not in manifest.json" for p in sorted(pretrained.glob("*.pt"))
                if p.name not in manifest]
    for name, entry in manifest.items():
        path = pretrained / name
        if not path.is_file():
            problems.append(f"{name} is listed but absent")
            continue
        data = path.read_bytes()
        if entry.get("sha256") != hashlib.sha256(data).hexdigest():
            problems.append(f"{name}: sha256 differs from manifest.json")
        if entry.get("bytes") != len(data):
            problems.append(f"{name}: size {len(data)} differs from manifest.json")
        if len(data) > MAX_FILE_BYTES:
            problems.append(f"{name}: {len(data)} bytes, over {MAX_FILE_BYTES}")
        if name.endswith(".pt"):
            import torch

            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(ckpt, dict) or ckpt.get("folder") != Path(folder_dir).name:
                problems.append(f"{name}: not a checkpoint of {Path(folder_dir).name}/")
            elif {"optimizer", "rng"} & set(ckpt):
                problems.append(f"{name}: still holds the training state (optimizer, rng)")
        empty = [k for k in ("command", "commit", "data", "hardware", "training_time", "score")
                 if not entry.get(k)]
        if empty:
            problems.append(f"{name}: manifest.json lacks {empty}")
    return problems


@pytest.mark.parametrize("folder", FOLDERS)
def test_shipped_models_match_their_manifest(folder):
    if not (ROOT / folder / "pretrained").is_dir():
        pytest.skip(f"{folder} ships no model yet")
    assert shipped_model_problems(ROOT / folder) == []


def test_shipped_models_fit_the_budget():
    total = sum(p.stat().st_size for p in ROOT.glob("*/pretrained/*.pt"))
    assert total <= MAX_TOTAL_BYTES, f"{total} bytes of shipped models, over {MAX_TOTAL_BYTES}"


def test_shipped_model_check_can_fail(tmp_path):
    import hashlib
    import json

    pretrained = tmp_path / "demo" / "pretrained"
    pretrained.mkdir(parents=True)
    (pretrained / "m.bin").write_bytes(b"weights")
    entry = {k: "x" for k in ("command", "commit", "data", "hardware", "training_time", "score")}
    entry.update(sha256=hashlib.sha256(b"weights").hexdigest(), bytes=7)
    (pretrained / "manifest.json").write_text(json.dumps({"m.bin": entry}))
    assert shipped_model_problems(tmp_path / "demo") == []
    (pretrained / "m.bin").write_bytes(b"weightz")  # a changed file
    (pretrained / "extra.pt").write_bytes(b"")  # an unlisted one
    assert shipped_model_problems(tmp_path / "demo") == [
        "extra.pt is not in manifest.json", "m.bin: sha256 differs from manifest.json"]


def test_shipped_model_check_finds_training_state(tmp_path):
    import hashlib
    import json

    import torch

    pretrained = tmp_path / "demo" / "pretrained"
    pretrained.mkdir(parents=True)
    torch.save({"folder": "demo", "model": {}, "optimizer": {}}, pretrained / "m.pt")
    data = (pretrained / "m.pt").read_bytes()
    entry = {k: "x" for k in ("command", "commit", "data", "hardware", "training_time", "score")}
    entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (pretrained / "manifest.json").write_text(json.dumps({"m.pt": entry}))
    assert shipped_model_problems(tmp_path / "demo") == [
        "m.pt: still holds the training state (optimizer, rng)"]
