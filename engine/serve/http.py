"""What every HTTP answer of the front end shares: errors are JSON ``{"error": message, "status":
code}``, and every answer is counted in ``/metrics`` by route and status (``AnswerCounter``), also
FastAPI's own 404/405 and an exception that escapes a handler (a 500 with one line in the log,
no traceback to the client)."""
from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from engine.serve import metrics

log = logging.getLogger("ray.serve")
ROUTES = ("/", "/generate", "/healthz", "/metrics", "/metrics.json")


def error(status: int, message: str, **headers) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers or None)


class AnswerCounter:
    """ASGI middleware: counts each answer's status (``metrics.METRICS``, looked up per call: one
    front end per process); turns an exception raised before the answer started into a JSON 500.
    One raised after (a video cut off mid-stream) goes on, so the client sees a broken stream."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope.get("path", "") if scope.get("path", "") in ROUTES else "other"
        started = False

        async def counted(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                metrics.METRICS.answered(route, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception as exc:
            if started:
                raise
            log.error("%s %s failed: %s: %s", scope.get("method"), route, type(exc).__name__, exc)
            answer = error(500, f"internal error ({type(exc).__name__}); see the service log")
            await answer(scope, receive, counted)


async def _http_error(request, exc: HTTPException) -> JSONResponse:
    return error(exc.status_code, str(exc.detail), **(exc.headers or {}))


def install(app: FastAPI) -> None:
    app.add_middleware(AnswerCounter)
    app.add_exception_handler(HTTPException, _http_error)
