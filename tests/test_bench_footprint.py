"""benchmarks/footprint.py's own logic: the smallest limit that kept the speed, and its argument errors."""
import subprocess
import sys
from pathlib import Path

from benchmarks.footprint import MB, reference_speed, smallest_kept

ROOT = Path(__file__).resolve().parent.parent


def test_smallest_kept_limit_needs_ninety_percent_of_the_speed_where_no_limit_bound():
    # unbound: uncapped, and 600 MB (peak below it): reference = median(100, 96) = 98, so 88.2 is the bar
    rows = [{"limit_bytes": None, "tok_s": 100.0, "peak_bytes": 500 * MB},
            {"limit_bytes": 600 * MB, "tok_s": 96.0, "peak_bytes": 500 * MB},
            {"limit_bytes": 400 * MB, "tok_s": 88.3, "peak_bytes": 400 * MB},
            {"limit_bytes": 300 * MB, "tok_s": 88.1, "peak_bytes": 300 * MB},
            {"limit_bytes": 250 * MB, "tok_s": None, "peak_bytes": 250 * MB}]
    assert reference_speed(rows) == 98.0
    assert smallest_kept(rows) == 400 * MB
    bound = [{"limit_bytes": None, "tok_s": 100.0, "peak_bytes": 500 * MB},
             {"limit_bytes": 400 * MB, "tok_s": 50.0, "peak_bytes": 400 * MB}]
    assert reference_speed(bound) == 100.0 and smallest_kept(bound) is None
    assert smallest_kept([{"limit_bytes": None, "tok_s": None, "peak_bytes": 0}]) is None  # the uncapped run failed


def test_bad_limits_are_an_argument_error():
    for bad in ("600,abc", "0", ","):
        p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "footprint.py"), "--limits", bad],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and "--limits" in p.stderr.strip().splitlines()[-1], p.stderr
