"""The installed console script, run as a user would: no traceback for a user's mistake.

Usage errors give the usage message and exit 2; a BenchError its one paragraph and exit 2; an unexpected
exception one line naming the log file (under --out) that holds the traceback, and exit 1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FAULT = Path(__file__).parent / "fault"


def _script() -> str:
    beside = Path(sys.executable).with_name("bench")
    found = str(beside) if beside.is_file() else shutil.which("bench")
    if found is None:
        pytest.fail("the `bench` console script is not installed: run `pip install -e '.[test]'` first")
    return found


def bench(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_script(), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "120", **env},
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("run", "--tsk", "odx"), "No such option: --tsk"),
        (("run", "--task", "odx", "--folds", "1"), "Invalid value for '--folds'"),
        (("run",), "Missing option '--task'"),
        (("run", "--task", "odx", "--protocol", "published"), "Invalid value for '--protocol'"),
        (("nosuchcommand",), "No such command"),
    ],
)
def test_usage_errors_show_usage_and_exit_2(tmp_path, args, message):
    r = bench(tmp_path, *args)
    assert r.returncode == 2, r.stderr
    assert "Usage: bench" in r.stderr and message in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_bench_error_is_one_paragraph_exit_2(tmp_path):
    r = bench(tmp_path, "run", "--methods", "abmil", "--task", "nosuchtask")
    assert r.returncode == 2
    assert "unknown task 'nosuchtask'" in r.stderr and "Traceback" not in r.stderr


def test_unexpected_error_is_one_line_and_a_log(tmp_path):
    r = bench(
        tmp_path,
        "methods",
        BENCH_TEST_FAULT="1",
        PYTHONPATH=os.pathsep.join([str(FAULT), os.environ.get("PYTHONPATH", "")]),
    )
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "injected fault" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    logs = list((tmp_path / "results" / "logs").glob("error-*.log"))
    assert len(logs) == 1 and str(logs[0].name) in r.stderr
    text = logs[0].read_text()
    assert "Traceback" in text and "RuntimeError: injected fault" in text


def test_a_file_where_out_should_be_a_folder_is_a_paragraph(tmp_path, small_task):
    (tmp_path / "afile").write_text("")
    r = bench(tmp_path, "run", "--methods", "abmil", "--task", str(small_task), "--out", "afile", "--quiet")
    assert r.returncode == 2 and "Not a directory" in r.stderr and "Fix:" in r.stderr
    assert "Traceback" not in r.stderr
