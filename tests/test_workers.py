"""Per-process start-up for pre-forking servers: gauges of exited workers are forgotten."""

from __future__ import annotations

import os
import subprocess
import sys

from apirouter.ops.workers import forget_exited_workers


def test_exited_workers_lose_their_live_gauges_but_keep_their_counts(tmp_path):
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    mine = os.getpid()
    for name in (
        f"gauge_livesum_{exited.pid}.db",
        f"counter_{exited.pid}.db",
        f"gauge_livesum_{mine}.db",
    ):
        (tmp_path / name).write_bytes(b"")
    assert forget_exited_workers(tmp_path) == [exited.pid]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"counter_{exited.pid}.db", f"gauge_livesum_{mine}.db"]
    )
