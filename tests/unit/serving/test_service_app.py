"""The service's ASGI app as BentoML builds it (`Predictor.to_asgi()`), driven in-process:
what its middleware leaves behind per request, and the request deadline."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest

from conftest import tracking_section, write_params


def live_timers() -> int:
    """Timers still pending on this event loop (cancelled ones wait in its heap until swept)."""
    return sum(not h.cancelled() for h in asyncio.get_running_loop()._scheduled)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def service_module(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app")
    os.environ["LOOPLINE_PARAMS"] = str(write_params(tmp, "unused.csv", tracking=tracking_section(tmp)))
    import serving.service

    return serving.service


def test_requests_leave_no_timers_behind(service_module):
    """BentoML's own timeout middleware keeps a timer per request for the whole timeout; under
    load they piled up (634k tracked objects after 30k requests) and GC pauses grew."""
    app = service_module.Predictor.to_asgi()

    async def hammer() -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            before = live_timers()
            for _ in range(300):
                assert (await client.get("/livez")).status_code == 200
            return live_timers() - before

    assert asyncio.run(hammer()) < 5


def _call(middleware, path: str = "/predict") -> tuple[int, bytes, int]:
    async def run():
        sent: list[dict] = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        await middleware({"type": "http", "method": "POST", "path": path, "headers": []}, receive, send)
        leftover = live_timers()
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"), leftover

    return asyncio.run(run())


def test_a_request_not_answered_in_time_gets_504_and_is_cancelled(service_module):
    cancelled = []

    async def slow(scope, receive, send):
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    status, body, leftover = _call(service_module.RequestTimeout(slow, timeout=0.2))
    assert status == 504 and b"serve.request_timeout_s" in body
    assert cancelled == [True] and leftover == 0


def test_a_response_that_has_started_is_not_cut(service_module):
    async def streaming(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(0.4)  # longer than the deadline, after the response began
        await send({"type": "http.response.body", "body": b"done"})

    status, body, leftover = _call(service_module.RequestTimeout(streaming, timeout=0.2))
    assert (status, body, leftover) == (200, b"done", 0)
