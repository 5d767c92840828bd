"""Every command in the README's bash blocks runs as written, in order, in a fresh directory, on the real
model: `hetinfer` is this checkout's CLI, and only the profile, training and eval steps get flags that make
them small (more tokens would only take longer; `prepare` gets fewer tokens). `bash scripts/install.sh` is what CI itself runs."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"profile": ["--tokens", "2000", "--samples", "256", "--seq-len", "256"],
         "train-predictors": ["--epochs", "1", "--ranks", "16"], "eval": ["--tokens", "256"],
         "prepare": ["--tokens", "2000"]}


def readme_commands() -> list[list[str]]:
    """The commands of the README's ```bash blocks as argument lists (comments dropped, && split)."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                out.append(words[:cut])
                words = words[cut + 1:]
    return out


def test_readme_commands_are_known():
    cmds = readme_commands()
    heads = {tuple(c[:2]) if c[0] == "bash" else (c[0],) for c in cmds}
    assert heads <= {("bash", "scripts/install.sh"), ("hetinfer",), ("mkdir",), ("python3",)}, heads
    assert sum(c[0] == "hetinfer" for c in cmds) >= 12


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path, model_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "hetinfer"
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m hetinfer.cli \"$@\"\n")
    shim.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT))
    work = tmp_path / "work"
    work.mkdir()
    ran = 0
    for cmd in readme_commands():
        if cmd[0] == "bash" or cmd[0] == "python3":  # installing and the test suite: what CI runs
            continue
        argv = cmd + SMALL.get(cmd[1], []) if cmd[0] == "hetinfer" else cmd
        p = subprocess.run(argv, cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=1200)
        assert p.returncode == 0 and "Traceback" not in p.stderr, f"{shlex.join(argv)}\n{p.stderr[-2000:]}"
        ran += 1
    assert ran >= 14  # 12 hetinfer commands and two mkdir
    assert (work / "out" / "smollm2.plan" / "plan.json").is_file() and (work / "out" / "profile.png").is_file()
