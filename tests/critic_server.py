"""A minimal OpenAI-compatible chat completions server on loopback, whose replies a test scripts:
a critic whose verdicts are known, served through the same HTTP client a real endpoint critic uses."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable

from aiohttp import web

MODEL = "scripted-critic"


class ScriptedEndpoint:
    """`answer(prompt)` gives the reply to a conversation whose last message is `prompt`; every
    prompt is kept in `prompts`. Each reply waits `delay_s` first (a slow critic)."""

    def __init__(self, answer: Callable[[str], str], delay_s: float = 0.0):
        self.answer, self.delay_s = answer, delay_s
        self.prompts: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self.url = ""

    def __enter__(self) -> ScriptedEndpoint:
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True).start()
        if not ready.wait(10):
            raise RuntimeError("the scripted critic endpoint did not start")
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._complete)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        self._loop.run_until_complete(web.SockSite(self._runner, listening).start())
        self.url = f"http://127.0.0.1:{listening.getsockname()[1]}/v1"
        ready.set()
        self._loop.run_forever()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "tests"}]})

    async def _complete(self, request: web.Request) -> web.Response:
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        self.prompts.append(prompt)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return web.json_response({
            "id": f"scripted-{len(self.prompts)}", "object": "chat.completion", "created": int(time.time()), "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": self.answer(prompt)}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        })
