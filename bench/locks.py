"""Claims: one file per job, so that processes sharing an output folder (one machine or many over a shared
file system) never run the same job at the same time.

A claim is ``<fold folder>.claim`` (e.g. ``results/odx/abmil/fold_3.claim``), created with
``O_CREAT | O_EXCL`` (atomic: exactly one creator wins) and holding JSON ``{host, pid, token, job, since}``.
While its job runs, a heartbeat thread touches the file every ``HEARTBEAT_S`` seconds.

A claim is *stale* when its holder is gone:
- same host and the pid is no longer alive (or a zombie): recovered at once, e.g. after ``kill -9``;
- any host: its heartbeat is older than ``STALE_AFTER_S`` (a dead node; a pid reused after a reboot).
Removing a stale claim happens under an exclusive ``flock`` on ``.claims.lock`` in the same folder, so two
processes recovering the same claim cannot both win. Every event is one line appended to
``<out>/<task>/claims.log`` (``<time> <host> <pid> <event> <job>``, events: claimed, recovered stale claim
of ..., and the outcome on release: trained, skipped, failed): who ran what, where, and when.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "HEARTBEAT_S",
    "STALE_AFTER_S",
    "Claim",
    "claim_path",
    "describe_holder",
    "is_stale",
    "pid_alive",
    "read_claim",
    "remove_dead_temporaries",
    "try_claim",
]

HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
HOST = socket.gethostname()


def claim_path(fold_path: Path) -> Path:
    """The claim file of a job whose results go to ``fold_path``."""
    return fold_path.with_name(f"{fold_path.name}.claim")


@dataclass
class Claim:
    """A held claim; ``release()`` (or leaving the ``with`` block) removes it if it is still ours."""

    path: Path
    token: str
    label: str
    log: Path | None
    outcome: str = "released"  # what ``with claim:`` logs on a normal exit (e.g. trained, skipped)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def start_heartbeat(self, every: float = HEARTBEAT_S) -> None:
        def beat() -> None:
            while not self._stop.wait(every):
                if not self._ours():
                    return
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        self._thread = threading.Thread(target=beat, name=f"claim-heartbeat {self.label}", daemon=True)
        self._thread.start()

    def _ours(self) -> bool:
        info = read_claim(self.path)
        return info is not None and info.get("token") == self.token

    def release(self, outcome: str = "released") -> None:
        """Stop the heartbeat and remove the claim if it is still ours; ``outcome`` goes to the log."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._ours():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        _log(self.log, outcome, self.label)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: Any) -> None:
        self.release("failed" if exc_type is not None else self.outcome)


def read_claim(path: Path) -> dict[str, Any] | None:
    """The claim's JSON, ``{}`` when it exists but is unreadable (being written), None when absent."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) else {}


def describe_holder(path: Path) -> str:
    """``host pid N since T`` of a claim, for progress and log messages."""
    info = read_claim(path) or {}
    return f"{info.get('host', '?')} pid {info.get('pid', '?')} since {info.get('since', '?')}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs: a zombie (killed, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    try:  # a killed child its parent has not reaped yet still answers kill(0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_dead_temporaries(folder: Path, prefix: str) -> None:
    """Delete the temporary folders ``<prefix>.tmp-<this host>-<pid>-<tag>`` in ``folder`` whose process no
    longer runs (what an atomic publication killed half-way leaves behind)."""
    for p in Path(folder).glob(f"{prefix}.tmp-{HOST}-*"):
        try:
            pid = int(p.name.rsplit("-", 2)[-2])
        except ValueError:
            continue
        if not pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def is_stale(path: Path, stale_after: float = STALE_AFTER_S) -> bool:
    """Whether the claim at ``path`` belongs to a process that is gone (see the module docstring)."""
    info = read_claim(path)
    if info is None:
        return False
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False
    if age > stale_after:
        return True
    return info.get("host") == HOST and isinstance(info.get("pid"), int) and not pid_alive(info["pid"])


def _create(path: Path, label: str, log: Path | None) -> Claim | None:
    token = uuid.uuid4().hex
    body = json.dumps(
        {
            "host": HOST,
            "pid": os.getpid(),
            "token": token,
            "job": label,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        return None
    with os.fdopen(fd, "w") as f:
        f.write(body)
    return Claim(path, token, label, log)


@contextlib.contextmanager
def _guard(folder: Path) -> Iterator[None]:
    """Exclusive flock on ``folder/.claims.lock`` (serialises stale-claim recovery)."""
    fd = os.open(folder / ".claims.lock", os.O_CREAT | os.O_RDWR, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def try_claim(
    path: Path, label: str, log: Path | None = None, stale_after: float = STALE_AFTER_S
) -> Claim | None:
    """Claim ``path`` for this process (heartbeat started), recovering a stale claim first; None when a live
    process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    claim = _create(path, label, log)
    if claim is None:
        with _guard(path.parent):
            if not is_stale(path, stale_after):
                return None
            holder = describe_holder(path)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            _log(log, f"recovered stale claim of {holder}:", label)
            claim = _create(path, label, log)
        if claim is None:
            return None
    _log(log, "claimed", label)
    claim.start_heartbeat()
    return claim


def _log(log: Path | None, event: str, label: str) -> None:
    """Append one line (a single ``write`` with O_APPEND, so lines of concurrent writers do not interleave)."""
    if log is None:
        return
    line = f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {HOST} {os.getpid()} {event} {label}\n"
    log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
