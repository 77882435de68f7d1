"""``pid_alive``: the one liveness check of a process on this host (claims, synthetic-cache temporaries)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from bench.locks import pid_alive


def test_pid_alive_of_running_and_reaped_processes() -> None:
    assert pid_alive(os.getpid())
    reaped = subprocess.Popen(["true"])
    reaped.wait()
    assert not pid_alive(reaped.pid)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc to see a zombie")
def test_a_zombie_is_not_alive() -> None:
    zombie = subprocess.Popen(["true"])  # exits at once; not reaped until ``wait``
    stat = Path(f"/proc/{zombie.pid}/stat")
    deadline = time.monotonic() + 10
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not pid_alive(zombie.pid)
    zombie.wait()
