"""A FastAPI app that streams an LLM's answer into a tokenfan channel, token by token.

Run a broker (``tokenfan serve``), then this app::

    pip install fastapi uvicorn
    TOKENFAN_URL=http://127.0.0.1:8765 uvicorn fastapi_app:app --port 8000     # in docs/examples

Watch the channel (``tokenfan tail ai-chat/s1``, or the browser client),
then ask::

    curl -s localhost:8000/chat -H 'Content-Type: application/json' \\
         -d '{"message": "Who is late?", "sessionId": "s1"}'

``POST /chat {"message", "sessionId"}`` answers ``202 {"ok": true,
"channel": "ai-chat/s1"}`` at once and streams the answer to that channel in
the background: ``ai:start``, one ``ai:token`` per piece, then ``ai:done``
(or ``ai:error`` if the LLM fails). A missing or empty field is ``400
{"ok": false, "error": "..."}``, and so is a session id that makes a bad
channel name (the broker's message). The app's lifespan owns one
:class:`AsyncPublisher`, so every request shares its connections, and
tokens that several answers emit in the same tick go out in one request.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import BackgroundTasks, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from broker.publisher import AsyncPublisher, PublishError, Rejected

log = logging.getLogger("fastapi_app")
MODEL = "fake-llm"


class ChatIn(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    message: str = Field(min_length=1, max_length=32_768)
    session_id: str = Field(alias="sessionId", min_length=1, max_length=200)


async def fake_llm(prompt: str) -> AsyncIterator[str]:
    """Stand-in for a streaming LLM call, e.g. with the openai package::

        stream = await AsyncOpenAI().chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}], stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content
    """
    for word in f"You asked: {prompt} Here is a streamed answer, one token at a time.".split(" "):
        await asyncio.sleep(0.01)  # the network and the model take their time
        yield word + " "


async def stream_answer(publisher: AsyncPublisher, channel: str, prompt: str) -> None:
    """Emit the answer's tokens, then ``ai:done``; on failure ``ai:error`` (if the broker is reachable)."""
    tokens = 0
    try:
        async for token in fake_llm(prompt):
            await publisher.emit(channel, "ai:token", {"token": token})
            tokens += 1
        await publisher.emit(channel, "ai:done", {"reason": "stop", "tokens": tokens})
    except PublishError:
        log.exception("cannot publish the answer on %s", channel)
    except Exception as exc:  # the LLM failed: tell the watchers, as the broker's own AI path does
        log.exception("the answer on %s failed", channel)
        try:
            await publisher.emit(channel, "ai:error", {"code": "upstream_error", "message": str(exc)})
        except PublishError:
            log.exception("cannot publish ai:error on %s", channel)


def create_app(broker_url: str, *, api_key: str | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncPublisher(broker_url, api_key=api_key) as publisher:
            app.state.publisher = publisher
            yield

    app = FastAPI(lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(part) for part in error['loc'][1:]) or 'body'}: "
                             f"{error['msg']}" for error in exc.errors())
        return JSONResponse({"ok": False, "error": problems}, status_code=400)

    @app.post("/chat", status_code=202)
    async def chat(body: ChatIn, request: Request, background: BackgroundTasks) -> JSONResponse:
        # ...authenticate the user and check they may use body.session_id here...
        publisher: AsyncPublisher = request.app.state.publisher
        channel = f"ai-chat/{body.session_id}"
        try:  # the first event is awaited here, so a bad session id is this caller's 400
            await publisher.emit(channel, "ai:start", {"model": MODEL, "prompt": body.message})
        except Rejected as exc:  # the broker's message, e.g. "channel name ... has characters outside ..."
            status = 400 if exc.status == 400 else 502
            return JSONResponse({"ok": False, "error": exc.message}, status_code=status)
        except PublishError as exc:  # the broker is unreachable
            return JSONResponse({"ok": False, "error": str(exc)}, status_code=503)
        # The answer streams after the 202 is sent, in this request's task.
        background.add_task(stream_answer, publisher, channel, body.message)
        return JSONResponse({"ok": True, "channel": channel}, status_code=202)

    return app


app = create_app(os.environ.get("TOKENFAN_URL", "http://127.0.0.1:8765"),
                 api_key=os.environ.get("TOKENFAN_API_KEY"))
