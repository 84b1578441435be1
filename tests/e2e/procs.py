"""Processes a test may look at or kill: only its own (its subprocess's Ray, its
session's actors), never another job's on the same machine."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

RAY_PROCESS_NAMES = ("raylet", "gcs_server", "ray::", "default_worker", "dashboard")


def ray_pids() -> set[int]:
    """Every Ray process on this machine."""
    pids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(n in cmd for n in RAY_PROCESS_NAMES):
            pids.add(int(pid))
    return pids


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def polytrain(*args: str, **kw) -> subprocess.Popen:
    """``polytrain run ARGS`` as a child process."""
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


class RayWatch:
    """The Ray processes a child process starts (an embedded Ray), collected while
    it runs: once it has exited they are orphans, no longer found below it."""

    def __init__(self, proc: subprocess.Popen):
        self.seen: set[int] = set()
        self._thread = threading.Thread(target=self._watch, args=(proc,), daemon=True)
        self._thread.start()

    def _watch(self, proc: subprocess.Popen) -> None:
        while proc.poll() is None:
            self.seen |= descendants(proc.pid) & ray_pids()
            time.sleep(0.2)

    def left(self, timeout_s: float = 15) -> set[int]:
        """Those still alive after ``timeout_s`` (the child has exited)."""
        self._thread.join()
        deadline = time.monotonic() + timeout_s
        while (alive := self.seen & ray_pids()) and time.monotonic() < deadline:
            time.sleep(0.5)
        return alive


def session_actor_pids(class_name: str) -> list[int]:
    """Pids of this session's live actors of a class (Ray's actor table; no dashboard needed)."""
    from ray._private import state

    return [a["Pid"] for a in state.actors().values() if a["ActorClassName"] == class_name and a["State"] == "ALIVE"]
