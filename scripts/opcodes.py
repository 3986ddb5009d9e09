#!/usr/bin/env python3
"""Count the Python work the router does per request: opcodes executed, by function.

CPU time per request (``bench.py cpu``) moves by a few percent between runs on a shared
VM, which hides changes of that size. The number of Python bytecode instructions the
router runs per request barely moves at all, and it names the functions that cost them,
so it shows what a change added or saved; C code (socket calls, JSON, regexes) and the
kernel are not counted, so confirm with ``bench.py cpu`` before drawing conclusions.

Each checkout's router runs in a process of its own (all threads traced, from the
embedded server's main loop to the upstream client) against ``sse_upstream.py``, while a
separate process sends the bench's plain requests (``--stream``: 20-event streams).

    python scripts/opcodes.py                       # this checkout
    python scripts/opcodes.py --baseline /tmp/base  # and another, with the differences

Not part of the test suite; figures are per request, after a warm-up.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import bench

HERE = Path(__file__).resolve().parent


def traced_router(source: str, upstream_port: int, requests: int, stream: bool) -> None:
    """(Child process.) Serve ``source``'s router under a tracer; print opcodes per
    request by function, as JSON."""
    sys.path.insert(0, source)
    import logging

    logging.disable(logging.CRITICAL)
    try:
        from apirouter.config.provider import parse
        from apirouter.config.settings import Settings
        from apirouter.proxy.app import App
        from apirouter.server import runner
    except ImportError:  # a checkout from before the package was split into rooms (#24)
        from apirouter.app import App
        from apirouter.settings import Settings

        from apirouter import server as runner
        from apirouter.config import parse

    counts: collections.Counter[str] = collections.Counter()
    tracing = threading.Event()

    def short(filename: str) -> str:
        """A dependency by its path in site-packages, the router by its path in ``source``."""
        return filename.rpartition("site-packages/")[2].replace(source + "/", "")

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if tracing.is_set():
            frame.f_trace_opcodes = True
            if event == "opcode":
                code = frame.f_code
                counts[f"{short(code.co_filename)}:{code.co_name}"] += 1
        return tracer

    threading.settrace(tracer)  # every thread the server starts from here on
    document = {"name": "bench", "baseUrl": f"http://127.0.0.1:{upstream_port}/v1"}
    app = App(parse(json.dumps(document), "bench"), Settings.defaults())
    port = bench.free_port()
    server = runner.make_server(app, "127.0.0.1", port, None)
    stopping = threading.Event()
    loop = threading.Thread(target=runner.run, args=(server, app), kwargs={"stopping": stopping})
    loop.start()
    bench.wait_listening(port)
    payload = "bench.stream_payload(20, 0.002)" if stream else "bench.PAYLOAD"

    def drive(total: int) -> None:
        code = f"import bench; bench.load({port}, {total}, 8, {payload})"
        subprocess.run([sys.executable, "-c", code], cwd=HERE, check=True)

    drive(max(200, requests // 4))  # warm: connections, pools, caches
    tracing.set()
    drive(requests)
    tracing.clear()
    stopping.set()
    loop.join(15)
    per_request = {name: n / requests for name, n in counts.most_common()}
    print(json.dumps(per_request))


def measure(source: str, upstream_port: int, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", source, str(upstream_port)]
    command += ["--requests", str(args.requests)] + (["--stream"] if args.stream else [])
    done = subprocess.run(command, cwd=HERE, check=True, capture_output=True, text=True)
    result: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="another checkout to compare with")
    parser.add_argument("--requests", type=int, default=2000, help="traced requests")
    parser.add_argument("--stream", action="store_true", help="20-event streams instead")
    parser.add_argument("--top", type=int, default=25, help="functions listed")
    parser.add_argument("--child", nargs=2, metavar=("SOURCE", "UPSTREAM_PORT"))
    args = parser.parse_args()
    if args.child:
        traced_router(args.child[0], int(args.child[1]), args.requests, args.stream)
        return
    upstream_port = bench.free_port()
    upstream = subprocess.Popen([sys.executable, str(bench.UPSTREAM), str(upstream_port)])
    try:
        bench.wait_listening(upstream_port)
        this = measure(str(bench.REPO), upstream_port, args)
        base = (
            measure(str(Path(args.baseline).resolve()), upstream_port, args)
            if args.baseline
            else {}
        )
    finally:
        upstream.terminate()
    print(f"this: {sum(this.values()):.0f} opcodes per request")
    if not args.baseline:
        for name, n in list(this.items())[: args.top]:
            print(f"{n:9.1f}  {name}")
        return
    print(f"baseline: {sum(base.values()):.0f} opcodes per request")
    changed = sorted(set(this) | set(base), key=lambda k: -abs(this.get(k, 0) - base.get(k, 0)))
    print(f"{'baseline':>9} {'this':>9} {'change':>9}  function")
    for name in changed[: args.top]:
        before, after = base.get(name, 0.0), this.get(name, 0.0)
        print(f"{before:9.1f} {after:9.1f} {after - before:+9.1f}  {name}")


if __name__ == "__main__":
    main()
