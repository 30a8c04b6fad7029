"""Processes of a POSIX session: how tests find and stop everything a Ray driver or `ray start` made."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def session_pids(session_id: int) -> list[int]:
    """Processes of one POSIX session: every process the cluster started (workers change their titles,
    so command lines can't find them)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session_id and fields[0] != "Z":  # state, ppid, pgrp, session; Z: exited
            pids.append(int(entry.name))
    return pids


def stop_cluster(session_id: int, grace_s: float = 5) -> list[int]:
    """SIGTERM the cluster's processes, SIGKILL what is left after the grace period; returns survivors."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_pids(session_id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while session_pids(session_id) and time.monotonic() < deadline:
            time.sleep(0.5)
    return session_pids(session_id)


def kill_session(session_id: int, timeout_s: float = 10) -> list[int]:
    """SIGKILL every process of the session, no grace (a node's sudden loss); returns survivors.

    Passes repeat until none is left, so a process forked during one pass is killed by the next.
    """
    deadline = time.monotonic() + timeout_s
    while (pids := session_pids(session_id)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    return session_pids(session_id)


def titled(session_id: int, fragment: str) -> list[int]:
    """Processes of the session whose title (Ray workers retitle themselves) contains ``fragment``."""
    found = []
    for pid in session_pids(session_id):
        with contextlib.suppress(OSError):
            if fragment in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode():
                found.append(pid)
    return found
