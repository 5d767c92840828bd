"""Every numeric flag of every command, at and beyond its bounds, through the real parser: a value inside is
taken, one outside is a one-line error naming the flag and its range, before any model loads."""
import argparse
import contextlib
import io
import math
import os

import pytest

from hetinfer import cli
from hetinfer.argtypes import Bounded, IntList, Size
from hetinfer.tokenizer import check_unicode
from hetinfer.errors import HetinferError

# what each command needs besides the flag under test to parse
REQUIRED = {"generate": ["-p", "x"], "profile": ["-o", "out.profile"],
            "train-predictors": ["--profile", "p", "-o", "out.predictors"],
            "prepare": ["-o", "out.deploy", "--flash-dir", "."], "run": ["d", "-p", "x"]}


def commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def numeric_flags() -> list[tuple[str, str, object]]:
    """(command, flag, type) for every option whose value is a number, a size or a list of numbers."""
    out = []
    for name, parser in commands().items():
        for action in parser._actions:
            numeric = action.type in (int, float) or isinstance(action.type, (Bounded, Size, IntList))
            if action.option_strings and numeric:
                out.append((name, action.option_strings[-1], action.type))
    return out


def values(t) -> tuple[list[str], list[str]]:
    """(accepted, refused) values at and beyond the bounds of type `t`."""
    if isinstance(t, Size):
        return [str(t.lo), str(t.hi), "1.5GiB"], [str(t.hi + 1), "99999999999999999999TB", "-1", "lots"]
    if isinstance(t, IntList):
        return [str(t.lo), f"{t.lo},{t.lo + 1}"], [str(t.lo - 1), f"{t.lo},x", ""]
    ok, bad = [], ["nan", "inf", "x"]
    for bound, is_open, step in ((t.lo, t.lo_open, -1), (t.hi, t.hi_open, +1)):
        if bound is None:
            continue
        (bad if is_open else ok).append(str(bound))
        beyond = bound + step if t.kind is int else bound + step * max(1e-6, abs(bound) * 1e-6)
        bad.append(str(beyond))
        inside = bound - step if t.kind is int else bound - step * 1e-3
        if t.contains(inside):
            ok.append(str(inside))
    if t.kind is int:
        bad.append("1.5")
    return ok, bad


FLAGS = numeric_flags()


def test_every_numeric_flag_is_bounded():
    plain = [f"{c} {f}" for c, f, t in FLAGS if t in (int, float)]
    assert not plain, f"numeric flags parsed without bounds: {plain}; use hetinfer.argtypes.int_in/float_in"
    assert {c for c, _, _ in FLAGS} >= {"generate", "chat", "profile", "train-predictors", "eval", "place", "serve",
                                        "prepare", "run"}
    assert len(FLAGS) >= 50


def run_main(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code, err.getvalue()


@pytest.mark.parametrize("command,flag,kind", FLAGS, ids=[f"{c} {f}" for c, f, _ in FLAGS])
def test_flag_bounds(command, flag, kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # output-path flags are checked against the working directory
    parser = commands()[command]
    ok, bad = values(kind)
    for v in ok:
        parser.parse_args([*REQUIRED.get(command, []), f"{flag}={v}"])  # "=": "-1e-06" would read as an option
    for v in bad:
        code, err = run_main([command, *REQUIRED.get(command, []), f"{flag}={v}"])
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: argument "), (v, err)
        assert flag in err, err
        if isinstance(kind, Bounded):
            assert kind.describe() in err, err


def test_bounds_describe_their_range():
    from hetinfer.argtypes import float_in, int_in

    assert int_in(1, 1024).describe() == "an integer from 1 to 1024"
    assert float_in(0.0, 1.0, lo_open=True).describe() == "a number in (0, 1]"
    assert float_in(0.0).describe() == "a number >= 0"
    assert not float_in(0.0).contains(math.inf) and not float_in().contains(math.nan)


def test_argparse_errors_are_one_line():
    for argv, words in ((["generate"], "required: -p/--prompt"), (["place", "--qtype", "q9"], "invalid choice"),
                        (["nonsense"], "invalid choice"), (["info", "--bogus"], "unrecognized arguments")):
        code, err = run_main(argv)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and words in err, err


BAD_BYTES = os.fsdecode(b"\xff\xfe abc")  # a non-UTF-8 command line, as Python hands it over


@pytest.mark.parametrize("argv", [["generate", "-p", BAD_BYTES], ["generate", "-p", "x", "--stop", BAD_BYTES],
                                  ["chat", "--system", BAD_BYTES], ["generate", "-p", "ok \ud800"]])
def test_invalid_unicode_text_is_refused_before_the_model_loads(argv):
    code, err = run_main(argv)
    assert code == 2 and err.count("\n") == 1 and "is not valid Unicode: character " in err, err


def test_check_unicode_names_the_character():
    assert check_unicode("naïve ✓") == "naïve ✓"
    with pytest.raises(HetinferError, match=r"character 0 is an undecodable byte 0xff \(U\+DCFF\)"):
        check_unicode(BAD_BYTES)
    with pytest.raises(HetinferError, match=r"character 3 is a lone surrogate \(U\+D800\); send UTF-8 text"):
        check_unicode("ok \ud800")


@pytest.mark.parametrize("argv,words", [
    (["generate", "-p", "x", "--stats-json", "{tmp}"], "is a directory"),
    (["generate", "-p", "x", "--stats-json", "{file}/s.json"], "is not a directory"),
    (["profile", "-o", "{file}"], "exists and is not a directory"),
    (["profile", "-o", "{file}/deeper/x.profile"], "is not a directory"),
    (["profile", "-o", "{tmp}/p", "--plot", "{tmp}"], "is a directory"),
    (["train-predictors", "--profile", "p", "-o", "{file}/x"], "is not a directory"),
    (["place", "-o", "{file}/plan"], "is not a directory"),
])
def test_output_paths_are_checked_when_parsed(argv, words, tmp_path):
    (tmp_path / "f").write_text("a file")
    code, err = run_main([a.format(tmp=tmp_path, file=tmp_path / "f") for a in argv])
    assert code == 2 and err.count("\n") == 1 and words in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # nothing written


@pytest.mark.slow
def test_paths_with_undecodable_bytes_print(model_path, tmp_path):
    import subprocess
    import sys

    link = os.path.join(os.fsencode(tmp_path), b"model-\xff.gguf")
    os.symlink(model_path, link)
    p = subprocess.run([sys.executable, "-m", "hetinfer.cli", "info", "-m", link], capture_output=True, timeout=600,
                       env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    assert p.returncode == 0 and b"model-\xff.gguf" in p.stdout, p.stderr[-1000:]
