"""A request body limit that holds with or without Content-Length (chunked uploads).

An ASGI middleware, below FastAPI's request parsing: it reads the body as it arrives, answers 413
as soon as it passes the limit (so at most the limit is ever held), and hands the app the body it
buffered.
"""
from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scheduler.responses import AsciiJSONResponse


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = AsciiJSONResponse({"detail": f"request body over {self.max_bytes} bytes"}, status_code=413,
                                     headers={"Connection": "close"})
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        parts: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            part = message.get("body", b"")
            size += len(part)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            parts.append(part)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(parts), "more_body": False}

        await self.app(scope, replay, send)
