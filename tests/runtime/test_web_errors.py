"""A view that fails unexpectedly answers 500 naming the error, and the worker logs its traceback."""

import asyncio
import logging

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from concord.runtime.web import unexpected_errors


async def _ask(path: str) -> tuple[int, dict | str]:
    async def broken(request):
        raise KeyError("source_system")

    async def gone(request):
        raise web.HTTPNotFound(text="no such thing")

    app = web.Application(middlewares=[unexpected_errors])
    app.router.add_get("/broken", broken)
    app.router.add_get("/gone", gone)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        resp = await client.get(path)
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, body


def test_an_unexpected_error_answers_500_with_its_name_and_is_logged(caplog):
    caplog.set_level(logging.ERROR, logger="concord.web")
    status, body = asyncio.run(_ask("/broken"))
    assert status == 500
    assert body == {"error": "internal error: KeyError: 'source_system'"}
    failed = [r for r in caplog.records if r.name == "concord.web"]
    assert [r.getMessage() for r in failed] == ["GET /broken failed"]
    assert failed[0].exc_info and failed[0].exc_info[0] is KeyError, "the traceback is in the log"


def test_an_http_answer_raised_by_a_view_passes_through(caplog):
    status, body = asyncio.run(_ask("/gone"))
    assert (status, body) == (404, "no such thing")
    assert not [r for r in caplog.records if r.name == "concord.web"]
