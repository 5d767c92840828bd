"""The atomic-write helper: round trips, overwrites, one-line errors, and temporaries of a killed
writer removed by the next write."""
import json
import os
import signal
import subprocess
import sys

import pytest

from hetinfer.atomic import atomic_dir, atomic_file, atomic_write, atomic_write_json, check_writable, temp_path
from hetinfer.errors import HetinferError


def test_file_round_trip_and_overwrite(tmp_path):
    p = tmp_path / "new" / "out.bin"  # the directory is created
    atomic_write(p, b"\x00\x01binary")
    assert p.read_bytes() == b"\x00\x01binary"
    atomic_write(p, "text é")
    assert p.read_text(encoding="utf-8") == "text é"
    atomic_write_json(p, {"a": [1, 2.5], "b": None})
    assert json.loads(p.read_text()) == {"a": [1, 2.5], "b": None} and p.read_text().endswith("}\n")
    assert os.listdir(p.parent) == ["out.bin"]


def test_dir_round_trip_replaces_an_existing_directory(tmp_path):
    p = tmp_path / "art"
    with atomic_dir(p) as d:
        (d / "a").write_text("1")
        (d / "sub").mkdir()
        (d / "sub" / "b").write_text("2")
    assert (p / "a").read_text() == "1" and (p / "sub" / "b").read_text() == "2"
    with atomic_dir(p) as d:
        (d / "c").write_text("3")
    assert sorted(os.listdir(p)) == ["c"] and os.listdir(tmp_path) == ["art"]


def test_a_failed_write_keeps_the_old_contents_and_leaves_nothing(tmp_path):
    p = tmp_path / "out.json"
    atomic_write(p, "old")
    with pytest.raises(ValueError):
        with atomic_file(p) as f:
            f.write(b"half")
            raise ValueError("the writer failed")
    d = tmp_path / "art"
    with atomic_dir(d) as t:
        (t / "x").write_text("old")
    with pytest.raises(ValueError):
        with atomic_dir(d) as t:
            (t / "x").write_text("half")
            raise ValueError("the writer failed")
    assert p.read_text() == "old" and (d / "x").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["art", "out.json"]


def one_line_error(fn, *args) -> str:
    with pytest.raises(HetinferError) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unwritable_targets_are_one_line_errors_that_leave_nothing(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "keep").write_text("k")
    (tmp_path / "file").write_text("f")
    msg = one_line_error(atomic_write_json, tmp_path / "dir", {})
    assert str(tmp_path / "dir") in msg and "is a directory; give a file path" in msg
    msg = one_line_error(atomic_write, tmp_path / "file" / "x.json", "{}")
    assert str(tmp_path / "file" / "x.json") in msg and "is a file, not a directory" in msg

    def fill(path):
        with atomic_dir(path) as d:
            (d / "x").write_text("x")

    msg = one_line_error(fill, tmp_path / "file")
    assert str(tmp_path / "file") in msg and "not a directory; give another path" in msg
    assert sorted(os.listdir(tmp_path)) == ["dir", "file"] and os.listdir(tmp_path / "dir") == ["keep"]
    assert (tmp_path / "file").read_text() == "f"


def test_check_writable_fails_early_the_same_way_and_creates_nothing(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("f")
    for path in (tmp_path / "dir", tmp_path / "file" / "x.json"):
        with pytest.raises(HetinferError) as early:
            check_writable(path)
        assert str(early.value) == one_line_error(atomic_write, path, "{}")
    check_writable(tmp_path / "new" / "deeper" / "x.json")
    assert sorted(os.listdir(tmp_path)) == ["dir", "file"]


WRITER = """
import sys, time
from hetinfer.atomic import atomic_dir, atomic_file
kind, path = sys.argv[1:]
if kind == "file":
    with atomic_file(path) as f:
        f.write(b"half of it")
        f.flush()
        print("writing", flush=True)
        time.sleep(600)
else:
    with atomic_dir(path) as d:
        (d / "part").write_text("half of it")
        print("writing", flush=True)
        time.sleep(600)
"""


def write(kind: str, path, text: str) -> None:
    if kind == "file":
        atomic_write(path, text)
    else:
        with atomic_dir(path) as d:
            (d / "part").write_text(text)


def read(kind: str, path) -> str:
    return (path if kind == "file" else path / "part").read_text()


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_temporaries_of_a_killed_writer_are_removed_by_the_next_write(tmp_path, kind):
    target = tmp_path / "out"
    write(kind, target, "old")
    child = subprocess.Popen([sys.executable, "-c", WRITER, kind, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "writing\n"
        (tmp,) = [n for n in os.listdir(tmp_path) if n != "out"]
        assert tmp.startswith(f".out.tmp-{child.pid}-")
        write(kind, target, "while it runs")  # a live writer's temporary is not touched
        assert tmp in os.listdir(tmp_path)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert read(kind, target) == "while it runs" and tmp in os.listdir(tmp_path)  # SIGKILL left it
    write(kind, target, "new")
    assert os.listdir(tmp_path) == ["out"] and read(kind, target) == "new"


def dead_pid() -> str:
    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()


def test_a_killed_overwrite_of_a_directory_is_cleaned_up(tmp_path):
    """SIGKILL between an overwrite's two renames leaves the old directory as `.NAME.old-PID-RAND`."""
    dead = dead_pid()
    (tmp_path / f".out.old-{dead}-0123abcd").mkdir()
    (tmp_path / f".out.old-{dead}-0123abcd" / "part").write_text("old")
    (tmp_path / f".other.old-{dead}-0123abcd").mkdir()  # another target's: left for its own next write
    write("dir", tmp_path / "out", "new")
    assert sorted(os.listdir(tmp_path)) == [f".other.old-{dead}-0123abcd", "out"]


def test_temp_path_removes_a_killed_processs_scratch_file(tmp_path):
    (tmp_path / f".scratch.tmp-{dead_pid()}-0123abcd").write_bytes(b"probe data")
    p = temp_path(tmp_path / "scratch")
    assert p.parent == tmp_path and p.name.startswith(f".scratch.tmp-{os.getpid()}-")
    assert os.listdir(tmp_path) == []
