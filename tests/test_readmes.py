"""The READMEs stay honest: every command they show parses with the script's real parser, and every
relative link and picture they show exists.

Each `python FOLDER/SCRIPT.py ...` in a code block or an inline code span (results tables hold the
full commands) is parsed by that script's own parse_config, in a subprocess per folder that stops
each script right after parsing: nothing is trained, loaded or written.
"""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ["ddpm", "fff", "gnns", "gpt", "lm_compression", "nf", "ppo", "vit", "mae", "clip"]
READMES = [ROOT / "README.md"] + [ROOT / f / "README.md" for f in FOLDERS]
SCRIPT = re.compile(r"^(?:\./)?(\w+)/(\w+\.py)$")

# Runs in the folder: parse_config raises Parsed once the flags are parsed and checked, so a script
# does nothing else; a bad flag ends in SystemExit(2) from argparse, as it would for a user.
DRIVER = r"""
import io, json, runpy, sys
from contextlib import redirect_stderr, redirect_stdout
sys.path.insert(0, ".")
import plumbing
class Parsed(Exception):
    pass
real = plumbing.parse_config
def parse_only(*args, **kwargs):
    real(*args, **kwargs)
    raise Parsed
plumbing.parse_config = parse_only
results = []
for script, argv in json.loads(sys.argv[1]):
    sys.argv = [script, *argv]
    err = io.StringIO()
    try:
        with redirect_stdout(io.StringIO()), redirect_stderr(err):
            runpy.run_path(script, run_name="__main__")
        results.append("ran without calling parse_config")
    except Parsed:
        results.append("ok")
    except SystemExit as e:
        lines = err.getvalue().strip().splitlines() or [str(e.code)]
        results.append(lines[-1] if e.code else "ok")  # --help exits with 0
    except Exception as e:
        results.append(f"{type(e).__name__}: {e}")
print(json.dumps(results))
"""


def code_texts(markdown):
    """The text of every fenced code block, and of every inline code span outside them."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", markdown, re.MULTILINE | re.DOTALL)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)
    return blocks + re.findall(r"`([^`\n]+)`", prose)


def commands(markdown):
    """(folder, script, argv) for each `python FOLDER/SCRIPT.py ...` (or via torchrun)."""
    found = []
    for text in code_texts(markdown):
        for line in text.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|\|\||;|\|", line):
                try:
                    tokens = shlex.split(part, comments=True)
                except ValueError:
                    continue
                for i, token in enumerate(tokens):
                    match = SCRIPT.match(token)
                    launcher = tokens[:i] and Path(tokens[i - 1]).name.startswith(("python", "-"))
                    if match and match.group(1) in FOLDERS and launcher:
                        found.append((match.group(1), match.group(2), tokens[i + 1:]))
                        break
    return found


def parse_in_folder(folder, commands_):
    run = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(commands_)], cwd=ROOT / folder,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def all_commands():
    by_folder = {}
    for readme in READMES:
        for folder, script, argv in commands(readme.read_text()):
            by_folder.setdefault(folder, []).append((readme.relative_to(ROOT), script, argv))
    return by_folder


@pytest.mark.parametrize("folder", FOLDERS)
def test_readme_commands_parse(folder):
    found = all_commands().get(folder, [])
    if not found:
        pytest.skip(f"no README shows a command of {folder}/")
    results = parse_in_folder(folder, [[script, argv] for _, script, argv in found])
    bad = [f"{readme}: python {folder}/{script} {' '.join(argv)} -> {result}"
           for (readme, script, argv), result in zip(found, results) if result != "ok"]
    assert bad == []


def test_readme_check_catches_a_wrong_flag():
    markdown = ("```bash\npython gpt/train.py --preset cpu --steps 5   # fine\n"
                "python gpt/train.py --no-such-flag 3\n```\n"
                "| run | `python gpt/sample.py --checkpoint x.pt --temperature nan` |\n")
    found = commands(markdown)
    assert [argv for _, _, argv in found] == [["--preset", "cpu", "--steps", "5"],
                                              ["--no-such-flag", "3"],
                                              ["--checkpoint", "x.pt", "--temperature", "nan"]]
    results = parse_in_folder("gpt", [[script, argv] for _, script, argv in found])
    assert results[0] == "ok"
    assert "unrecognized arguments: --no-such-flag" in results[1]
    assert "finite" in results[2]


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_pictures_exist(readme):
    text = readme.read_text()
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    prose = re.sub(r"`[^`\n]+`|\$[^$\n]+\$", "", prose)  # code and maths are not links
    targets = re.findall(r"\]\(([^)\s]+)\)", prose) + re.findall(r'<img[^>]+src="([^"]+)"', prose)
    missing = []
    for target in targets:
        if re.match(r"^[a-z]+://|^#|^mailto:", target):
            continue
        path = (readme.parent / target.split("#")[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert missing == []


def long_lines(markdown, limit=100):
    """Lines longer than `limit` characters, prose and code blocks alike. Table rows are exempt:
    Markdown cannot wrap one, and a results row carries its full command."""
    return [line for line in markdown.splitlines()
            if len(line) > limit and not line.lstrip().startswith("|")]


PROCESS = re.compile(r"\b(issues?|sessions?)\b", re.IGNORECASE)  # how we worked, not the method


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_lines_fit_in_100_columns(readme):
    assert long_lines(readme.read_text()) == []


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_process_history(readme):
    assert [line for line in readme.read_text().splitlines() if PROCESS.search(line)] == []


def test_line_and_process_checks_can_fail():
    markdown = "x" * 101 + "\n| " + "y" * 200 + " |\n```\n" + "z" * 101 + "\n```\nfine\n"
    assert long_lines(markdown) == ["x" * 101, "z" * 101]
    assert PROCESS.search("as the issue asked") and PROCESS.search("in an earlier Session")
    assert not PROCESS.search("tissues and missions")
