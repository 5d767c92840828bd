"""Census of bad input through every command: each case must end in one `error: ...` line and exit status 2.

A table of bad inputs (numeric flags out of range, sizes too large, undecodable text, output paths that are
directories or under a file, hand-edited artefacts, empty data), each classified as
  error      exit 2, no traceback, the last stderr line an `error:` naming the problem;
  traceback  an exception escaped (a Python traceback);
  accepted   exit 0: the bad input was taken silently;
  other      anything else (another exit status, a hang).
The test runs the cases in-process through `hetinfer.cli.main`; as a script it runs each as a subprocess, as a
user would, and prints the count per outcome (how issue #17's class 1 was measured before and after):

    python tests/test_bad_input_census.py [--show]
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import pytest

BAD_BYTES = os.fsdecode(b"\xff\xfe abc")  # what Python makes of `-p $'\xff\xfe abc'` on the command line
PLACE = ["place", "--model-shape", "{shape}", "--power-law", "1.0", "--hardware", "{hw}", "-o", "{tmp}/plan"]
GEN = ["generate", "-m", "{model}", "-p", "Hi", "-n", "1"]
CHAT = ["chat", "-m", "{model}", "-n", "1"]
SERVE = ["serve", "{model}"]
PROFILE = ["profile", "-m", "{model}", "--data", "{text}", "--tokens", "300", "--seq-len", "64", "--samples", "64",
           "-q", "-o", "{tmp}/out.profile"]
TRAIN = ["train-predictors", "-m", "{model}", "--profile", "{profile}", "--ranks", "16", "--epochs", "1", "-q",
         "-o", "{tmp}/out.predictors"]
EVAL = ["eval", "-m", "{model}", "--data", "{text}", "--tokens", "64", "--window", "64", "--stride", "32", "-q"]


@dataclass
class Case:
    name: str
    argv: list[str]
    stdin: str = ""


def _flag_cases() -> list[Case]:
    """One out-of-range value per numeric flag of every command (the parse-time class)."""
    table = [
        (GEN, [("-t", "0"), ("-t", "-1"), ("--ctx", "-1"), ("--ctx", "0"), ("-n", "-1"), ("--temperature", "-1"),
               ("--temperature", "nan"), ("--top-k", "-1"), ("--top-p", "0"), ("--top-p", "2"), ("--min-p", "1"),
               ("--repeat-penalty", "0"), ("--seed", "-1"), ("--seed", str(2**64)),
               ("--sparsity", "1.5"), ("--sparsity", "nan")]),
        (CHAT, [("-t", "-1"), ("--ctx", "-1"), ("--temperature", "-1"), ("--top-p", "0")]),
        (SERVE, [("--port", "-1"), ("--port", "70000"), ("--max-queue", "0"), ("--max-tokens", "0"), ("-t", "-1"),
                 ("--ctx", "-1"), ("--memory-budget", "lots")]),
        (PROFILE, [("-t", "-1"), ("--tokens", "0"), ("--seq-len", "1"), ("--samples", "10"), ("--seed", "-1")]),
        (TRAIN, [("-t", "-1"), ("--sparsity", "1.5"), ("--recall", "0"), ("--recall", "1.5"), ("--density", "0"),
                 ("--max-param-ratio", "0"), ("--max-flops-ratio", "-1"), ("--epochs", "0"), ("--ranks", "0"),
                 ("--ranks", "-4"), ("--seed", "-1")]),
        (EVAL, [("-t", "-1"), ("--tokens", "0"), ("--window", "1"), ("--stride", "0"), ("--sparsity", "1.5")]),
        (PLACE, [("--ctx", "0"), ("--sparsity", "1"), ("--power-law", "-1"), ("--power-law", "nan"),
                 ("--time-limit", "0"), ("--time-limit", "inf"), ("--mip-gap", "-1"), ("--max-binaries", "0"),
                 ("--group-size", "0"), ("--window", "-1"), ("--ram", "99999999999999999999TB"),
                 ("--gpu-mem", "99999999999999999999TB"), ("--predictor-bytes", "99999999999999999999TB")]),
    ]
    return [Case(f"{base[0]} {flag} {value}", [*base, flag, value]) for base, flags in table for flag, value in flags]


CASES: list[Case] = _flag_cases() + [
    # decided, not a silent default
    Case("generate --ctx 0 (was silently 4096)", [*GEN, "--ctx", "0"]),
    # text that is not valid Unicode
    Case("generate -p undecodable bytes", ["generate", "-m", "{model}", "-p", BAD_BYTES, "-n", "1"]),
    Case("generate --chat -p undecodable bytes", ["generate", "-m", "{model}", "--chat", "-p", BAD_BYTES, "-n", "1"]),
    Case("chat --system undecodable bytes", [*CHAT, "--system", BAD_BYTES], stdin="hello\n"),
    Case("profile --data chat JSONL with invalid UTF-8", [*PROFILE[:4], "{badjsonl}", *PROFILE[5:]]),
    Case("eval --data chat JSONL with a lone surrogate", [*EVAL[:4], "{surrogatejsonl}", *EVAL[5:]]),
    # output paths that are directories or cannot be written
    Case("generate --stats-json DIR", [*GEN, "--stats-json", "{tmp}"]),
    Case("generate --stats-json under a file", [*GEN, "--stats-json", "{afile}/stats.json"]),
    Case("profile -o under a file", [*PROFILE[:-1], "{afile}/x.profile"]),
    Case("profile --plot DIR", [*PROFILE, "--plot", "{tmp}"]),
    Case("train-predictors -o under a file", [*TRAIN[:-1], "{afile}/x.predictors"]),
    Case("place -o under a file", [*PLACE[:-1], "{afile}/plan"]),
    # hand-edited artefacts: the manifest parses but lacks a field
    Case("train-predictors, profile without model", [*TRAIN[:4], "{profile_no_model}", *TRAIN[5:]]),
    Case("train-predictors, profile without tokens", [*TRAIN[:4], "{profile_no_tokens}", *TRAIN[5:]]),
    Case("generate --sparsity, profile without model", [*GEN, "--sparsity", "0.5", "--profile", "{profile_no_model}"]),
    Case("generate --sparsity, profile without config.n_ff", [*GEN, "--sparsity", "0.5", "--profile",
                                                              "{profile_no_n_ff}"]),
    Case("eval threshold, profile without model", [*EVAL, "--sparsity", "0.5", "--profile", "{profile_no_model}"]),
    Case("place, profile without model", ["place", "--profile", "{profile_no_model}", "--hardware", "{hw}", "-o",
                                          "{tmp}/plan"]),
    Case("place, profile without tokens", ["place", "--profile", "{profile_no_tokens}", "--hardware", "{hw}", "-o",
                                           "{tmp}/plan"]),
    Case("generate --predictors without model", [*GEN, "--predictors", "{predictors_no_model}"]),
    Case("eval --predictors without model.config", [*EVAL, "--predictors", "{predictors_no_config}"]),
    Case("place --predictors without model", ["place", "--profile", "{profile}", "--predictors",
                                              "{predictors_no_model}", "--hardware", "{hw}", "-o", "{tmp}/plan"]),
    Case("place --hardware with ram.capacity_bytes a string", [*PLACE[:6], "{hw_string}", *PLACE[7:]]),
    Case("place --model-shape without n_layers", [*PLACE[:2], "{shape_no_layers}", *PLACE[3:]]),
    # data that holds nothing to measure
    Case("eval on a whitespace-only file", [*EVAL[:4], "{blank}", *EVAL[5:]]),
    Case("eval on a too-short file", [*EVAL[:4], "{short}", *EVAL[5:]]),
    Case("profile on a whitespace-only file", [*PROFILE[:4], "{blank}", *PROFILE[5:]]),
]

TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure "
        "in Paris. Its base is square, measuring 125 metres on each side. ") * 40
SHAPE = {"arch": "llama", "n_layers": 4, "d_model": 256, "n_ff": 512, "n_heads": 4, "n_kv_heads": 2, "head_dim": 64,
         "vocab_size": 1024, "context_length": 512, "name": "small"}
HARDWARE = {"format": "hetinfer.hardware", "version": 1, "gpu": None, "flash": None, "sources": {},
            "ram": {"capacity_bytes": 1 << 30, "bytes_per_s": 2e10, "layer_seconds": 1e-5}}


def _edited(src: str, dst: str, edit) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "manifest.json")
    with open(path) as fh:
        manifest = json.load(fh)
    edit(manifest)
    with open(path, "w") as fh:
        json.dump(manifest, fh)
    return dst


def make_inputs(tmp: str, model: str, run_cli) -> dict[str, str]:
    """The files the cases refer to; `run_cli(argv)` makes the real-model profile and predictors."""
    def write(name: str, data) -> str:
        path = os.path.join(tmp, name)
        with open(path, "wb" if isinstance(data, bytes) else "w") as fh:
            fh.write(data)
        return path

    f = {"tmp": tmp, "model": model, "text": write("text.txt", TEXT), "blank": write("blank.txt", " \n\t \n" * 50),
         "short": write("short.txt", "Hi."), "afile": write("afile", "not a directory"),
         "badjsonl": write("bad.jsonl", b'{"turns": ["caf\xe9 au lait"]}\n'),
         "surrogatejsonl": write("surrogate.jsonl", '{"turns": ["\\ud800 alone"]}\n'),
         "shape": write("shape.json", json.dumps(SHAPE)),
         "shape_no_layers": write("shape2.json", json.dumps({k: v for k, v in SHAPE.items() if k != "n_layers"})),
         "hw": write("hw.json", json.dumps(HARDWARE)),
         "hw_string": write("hw2.json", json.dumps({**HARDWARE, "ram": {**HARDWARE["ram"], "capacity_bytes": "1G"}}))}
    f["profile"], f["predictors"] = os.path.join(tmp, "p.profile"), os.path.join(tmp, "p.predictors")
    run_cli([a.format(**f) for a in [*PROFILE[:-1], f["profile"]]])
    run_cli([a.format(**f) for a in [*TRAIN[:-1], f["predictors"]]])
    f["profile_no_model"] = _edited(f["profile"], f"{tmp}/nm.profile", lambda m: m.pop("model"))
    f["profile_no_tokens"] = _edited(f["profile"], f"{tmp}/nt.profile", lambda m: m.pop("tokens"))
    f["profile_no_n_ff"] = _edited(f["profile"], f"{tmp}/nf.profile", lambda m: m["model"]["config"].pop("n_ff"))
    f["predictors_no_model"] = _edited(f["predictors"], f"{tmp}/nm.predictors", lambda m: m.pop("model"))
    f["predictors_no_config"] = _edited(f["predictors"], f"{tmp}/nc.predictors", lambda m: m["model"].pop("config"))
    return f


def classify(code: int | None, stderr: str, escaped: bool) -> str:
    if escaped or "Traceback (most recent call last)" in stderr:
        return "traceback"
    if code == 0:
        return "accepted"
    lines = stderr.strip().splitlines()
    return "error" if code == 2 and lines and lines[-1].startswith(("error:", "hetinfer")) and "error:" in lines[-1] \
        else "other"


def run_in_process(argv: list[str], stdin: str = "") -> tuple[str, str]:
    """(outcome, stderr) of `hetinfer.cli.main(argv)` in this process."""
    from hetinfer import cli

    err, escaped, code = io.StringIO(), False, None
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = cli.main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except Exception as e:  # noqa: BLE001 - the census counts what escapes
                escaped = True
                err.write(f"{type(e).__name__}: {e}")
    finally:
        sys.stdin = old_stdin
    return classify(code, err.getvalue(), escaped), err.getvalue()


def run_subprocess(argv: list[str], stdin: str = "", cwd: str | None = None) -> tuple[str, str]:
    """Like `run_in_process`, as a user runs it; the hetinfer imported is the one on PYTHONPATH (run from `cwd`,
    not from a checkout that would shadow it)."""
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    try:
        p = subprocess.run([sys.executable, "-m", "hetinfer.cli", *map(os.fsencode, argv)], input=stdin.encode(),
                           capture_output=True, timeout=900, env=env, cwd=cwd)
    except subprocess.TimeoutExpired:
        return "other", "timed out"
    stderr = p.stderr.decode("utf-8", "replace")
    return classify(p.returncode, stderr, False), stderr


def _strict_run(argv: list[str]) -> None:
    outcome, err = run_in_process(argv)
    if outcome != "accepted":
        raise RuntimeError(f"setup command failed: {argv}: {err}")


@pytest.fixture(scope="module")
def census_inputs(tmp_path_factory, model_path):
    return make_inputs(str(tmp_path_factory.mktemp("census")), model_path, _strict_run)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_error_line(case, census_inputs):
    outcome, err = run_in_process([a.format(**census_inputs) for a in case.argv], case.stdin)
    assert outcome == "error", err
    assert len(err.strip().splitlines()) == 1, err


def main() -> int:
    from hetinfer.loader import default_model_path

    show = "--show" in sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        inputs = make_inputs(tmp, default_model_path(), _strict_run)
        counts: dict[str, int] = {}
        for case in CASES:
            outcome, err = run_subprocess([a.format(**inputs) for a in case.argv], case.stdin, cwd=tmp)
            counts[outcome] = counts.get(outcome, 0) + 1
            multi = len(err.strip().splitlines()) > 1 and outcome == "error"
            print(f"{outcome:<9} {'(multi-line) ' if multi else ''}{case.name}", flush=True)
            if show and outcome != "error" or show and multi:
                print("    " + err.strip().replace("\n", "\n    ")[-600:])
    print(f"{len(CASES)} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
