"""The capacity gate, readiness, and what the app answers when it is full."""

from __future__ import annotations

import json
import threading
from contextlib import ExitStack
from dataclasses import dataclass

import httpx
import pytest
from clocks import wait_until
from upstream_fakes import chat_chunk, sse_response

from apirouter.errors import OverCapacity
from apirouter.proxy.capacity import CapacityGate, readiness

CHAT = "/v1/chat/completions"


@dataclass
class FakeResponse:
    relay: object | None = None


class FakeRelay:
    def __init__(self) -> None:
        self.slot = None

    def hold(self, slot) -> None:
        slot.mark_stream()
        self.slot = slot


def test_gate_admits_up_to_the_limit_then_refuses_at_once():
    refused = []
    gate = CapacityGate(2, on_refused=refused.append)
    first, second = gate.acquire("a"), gate.acquire("b")
    with pytest.raises(OverCapacity) as caught:
        gate.acquire("c")
    error = caught.value
    assert (error.status, error.error_type) == (503, "over_capacity")
    assert ("Retry-After", "1") in error.response_headers()
    assert json.loads(error.body())["error"]["code"] == "over_capacity"
    assert refused == ["over_capacity"]
    first.release()
    first.release()  # idempotent: a double release never frees a slot it does not hold
    assert gate.in_flight == 1
    gate.acquire("c")
    second.release()
    assert gate.snapshot()["in_flight"] == 1


def test_per_key_cap_stops_one_key_taking_every_slot():
    refused = []
    gate = CapacityGate(10, per_key=2, on_refused=refused.append)
    held = [gate.acquire("greedy"), gate.acquire("greedy")]
    with pytest.raises(OverCapacity):
        gate.acquire("greedy")
    gate.acquire("polite")  # other keys still get in
    assert refused == ["key_over_capacity"]
    held[0].release()
    gate.acquire("greedy")


def test_admit_gives_the_slot_back_unless_a_relay_takes_it():
    gate = CapacityGate(1)
    assert gate.admit("k", FakeResponse).relay is None
    assert gate.in_flight == 0
    with pytest.raises(RuntimeError):
        gate.admit("k", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert gate.in_flight == 0
    relay = FakeRelay()
    gate.admit("k", lambda: FakeResponse(relay))
    assert (gate.in_flight, gate.streams) == (1, 1)
    relay.slot.release()
    assert (gate.in_flight, gate.streams) == (0, 0)


def test_gate_counts_exactly_under_contention():
    gate = CapacityGate(50)
    admitted = []
    lock = threading.Lock()

    def work():
        for _ in range(200):
            try:
                slot = gate.acquire("k")
            except OverCapacity:
                continue
            with lock:
                admitted.append(slot)
            slot.release()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert gate.in_flight == 0 and admitted


def test_readiness_never_asks_upstreams_only_this_router():
    gate = CapacityGate(1)
    assert readiness(gate, config_loaded=True)[0] == 200
    slot = gate.acquire("k")
    status, document = readiness(gate, config_loaded=True)
    assert status == 503 and document["checks"]["capacity_left"] is False
    slot.release()
    gate.draining.set()
    status, document = readiness(gate, config_loaded=True)
    assert status == 503 and document == {
        "ready": False,
        "checks": {"config_loaded": True, "not_draining": False, "capacity_left": True},
    }


# --- through the app, over a real socket ---------------------------------------------------


def test_health_documents_capacity_and_ready_answers_200(make_router):
    router = make_router(max_concurrent=7)
    health = httpx.get(router.url + "/health").json()
    assert health["capacity"] == {
        "in_flight": 0,
        "limit": 7,
        "available": 7,
        "streams": 0,
        "per_key_limit": None,
        "draining": False,
    }
    ready = httpx.get(router.url + "/health/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    router.app.capacity.draining.set()
    assert httpx.get(router.url + "/health/ready").status_code == 503


def test_past_capacity_requests_get_503_over_capacity_while_streams_run(make_router, httpserver):
    router = make_router({"streamConfig": {"heartbeatIntervalSecs": 3600}}, max_concurrent=2)
    release = threading.Event()

    def held_stream():
        yield chat_chunk("held")
        release.wait(10)
        yield b"data: [DONE]\n\n"

    httpserver.expect_request(CHAT).respond_with_handler(lambda _: sse_response(held_stream()))
    with httpx.Client(timeout=10) as client, ExitStack() as streams:
        readers = []  # kept: a dropped reader closes its connection, and the router sees it
        for _ in range(2):
            response = streams.enter_context(
                client.stream("POST", router.url + CHAT, json={"model": "m", "stream": True})
            )
            readers.append(response.iter_raw())
            assert next(readers[-1]).startswith(b"data: ")
        assert router.sample("apirouter_streams_in_flight") == 2
        refused = httpx.post(router.url + CHAT, json={"model": "m"}, timeout=10)
        assert httpx.get(router.url + "/health/ready").json()["checks"]["capacity_left"] is False
        release.set()
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "over_capacity"
    assert router.sample("apirouter_requests_refused_total", {"reason": "over_capacity"}) == 1
    wait_until(lambda: router.app.capacity.in_flight == 0)
    assert router.sample("apirouter_streams_in_flight") == 0
    assert httpx.post(router.url + CHAT, json={"model": "m"}).status_code != 503
