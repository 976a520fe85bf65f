"""`rm-scale serve`: a reward model over HTTP for RL loops (FastAPI + uvicorn), with dynamic batching.

    POST /get_reward  {"query": ["<prompt + response, templated>", ...]}  ->  {"rewards": [...], "scores": [...]}
                      OpenRLHF's remote reward-model protocol (--remote_rm_url http://HOST:PORT/get_reward)
    POST /score       {"prompts": [...], "responses": [...]} (strings or message lists) or {"texts": [...]}
                      ->  {"rewards": [...], "truncated": n}
    GET  /health      {"status": "ok", "model": ..., "requests": n, "batches": n, ...}

Requests are tokenised as the model was trained (rm_scale.scoring.scorer: the folder's scoring contract). Concurrent
requests wait at most ``max_wait_ms`` to share a forward of up to ``max_batch_tokens`` tokens; one forward runs at a
time, in its own thread, so the event loop keeps accepting requests. A bad request (malformed JSON, wrong types, an
empty list, too large) gets a 400 that says what is wrong; nothing a client sends stops the server. With a token
(``RM_SCALE_SERVE_TOKEN`` or --token-env) every request but /health needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# At module level: FastAPI resolves the endpoints' annotations (Request) in this module's globals.
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20
DEFAULT_MAX_ITEMS = 4096


class BadRequest(Exception):
    """A client error: answered with 400 and this message."""


class DynamicBatcher:
    """Collects concurrent requests' sequences into one forward: the first request waits at most ``max_wait_ms`` for
    others, until ``max_batch_tokens`` tokens are queued. ``run`` (token-id sequences → rewards) runs in one thread."""

    def __init__(self, run: Callable[[list[list[int]]], list[float]], *, max_batch_tokens: int,
                 max_wait_ms: float) -> None:
        self._run = run
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1000.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rm-scale-forward")
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self.requests = 0
        self.batches = 0
        self.largest_batch = 0  # requests in the largest forward so far

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, seqs: list[list[int]]) -> list[float]:
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((seqs, future))
        return await future

    async def _collect(self) -> list[tuple[list[list[int]], asyncio.Future]]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        tokens = sum(map(len, batch[0][0]))
        deadline = loop.time() + self.max_wait
        while tokens < self.max_batch_tokens:
            try:
                item = self._queue.get_nowait() if not self._queue.empty() else await asyncio.wait_for(
                    self._queue.get(), max(0.0, deadline - loop.time()))
            except (asyncio.TimeoutError, asyncio.QueueEmpty):
                break
            batch.append(item)
            tokens += sum(map(len, item[0]))
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            seqs = [s for item, _ in batch for s in item]
            try:
                rewards = await loop.run_in_executor(self._executor, self._run, seqs)
            except Exception as e:  # the forward failed (e.g. out of memory): those requests fail, the server stays
                logger.exception("forward of %d sequences failed", len(seqs))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(RuntimeError(f"scoring failed: {type(e).__name__}: {e}"))
                continue
            self.batches += 1
            self.requests += len(batch)
            self.largest_batch = max(self.largest_batch, len(batch))
            start = 0
            for item, future in batch:
                if not future.done():  # a client that went away cancelled its future
                    future.set_result(rewards[start : start + len(item)])
                start += len(item)


# ---- request parsing ----------------------------------------------------------------------------------------------

def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON ({e}); send a JSON object, e.g. "
                         '{"query": ["<prompt + response>"]}') from None
    if not isinstance(data, dict):
        raise BadRequest(f"the body must be a JSON object, got a JSON {type(data).__name__}")
    return data


def text_list(data: dict[str, Any], key: str, *, max_items: int, messages: bool = False) -> list[Any]:
    """``data[key]`` as a non-empty list of strings (or, with ``messages``, of message lists)."""
    if key not in data:
        raise BadRequest(f"missing field {key!r}; expected a list of strings")
    value = data[key]
    if not isinstance(value, list):
        raise BadRequest(f"field {key!r} must be a list, got {type(value).__name__}")
    if not value:
        raise BadRequest(f"field {key!r} is an empty list; send at least one item")
    if len(value) > max_items:
        raise BadRequest(f"field {key!r} has {len(value)} items; at most {max_items} per request (--max-items)")
    for i, item in enumerate(value):
        if isinstance(item, str) or (messages and _is_message_list(item)):
            continue
        kind = "a string or a list of {'role', 'content'} messages" if messages else "a string"
        raise BadRequest(f"{key}[{i}] must be {kind}, got {type(item).__name__}")
    return value


def _is_message_list(item: Any) -> bool:
    return isinstance(item, list) and bool(item) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in item)


def score_request(data: dict[str, Any], *, max_items: int) -> tuple[list[Any], list[Any] | None]:
    """/score's body: ``texts``, or ``prompts`` + ``responses`` of equal length."""
    if "texts" in data:
        return text_list(data, "texts", max_items=max_items), None
    if "prompts" not in data and "responses" not in data:
        raise BadRequest('expected {"prompts": [...], "responses": [...]} or {"texts": [...]}')
    prompts = text_list(data, "prompts", max_items=max_items, messages=True)
    responses = text_list(data, "responses", max_items=max_items, messages=True)
    if len(prompts) != len(responses):
        raise BadRequest(f"{len(prompts)} prompts but {len(responses)} responses; send one response per prompt")
    return prompts, responses


# ---- the app ------------------------------------------------------------------------------------------------------

def create_app(scorer: Any, *, max_batch_tokens: int = 16384, max_wait_ms: float = 10.0,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_items: int = DEFAULT_MAX_ITEMS,
               token: str | None = None) -> Any:
    """The FastAPI app serving ``scorer`` (a rm_scale.scoring.RewardScorer)."""
    from contextlib import asynccontextmanager

    batcher = DynamicBatcher(scorer.rewards_of_ids, max_batch_tokens=max_batch_tokens, max_wait_ms=max_wait_ms)

    @asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="rm_scale reward server", lifespan=lifespan)
    app.state.batcher = batcher

    async def rewards(request: Request, parse: Callable[[dict[str, Any]], tuple[list[Any], list[Any] | None]]) -> Any:
        if token is not None and not _authorized(request, token):
            return JSONResponse({"error": "missing or wrong bearer token (Authorization: Bearer <token>)"}, 401)
        try:
            data = parse_json(await _read_body(request, max_request_bytes))
            first, second = parse(data)
            full = await asyncio.to_thread(_tokens, scorer, first, second)
        except (BadRequest, TypeError, ValueError) as e:  # TypeError, ValueError: a shape the scorer cannot read
            return JSONResponse({"error": str(e)}, 400)
        seqs = [scorer.cut(ids) for ids in full]  # the contract: a longer text keeps its end
        try:
            values = await batcher.submit(seqs)
        except RuntimeError as e:
            return JSONResponse({"error": str(e)}, 500)
        return {"rewards": scorer.finish(values), "truncated": sum(len(s) < len(f) for s, f in zip(seqs, full))}

    @app.post("/get_reward")
    async def get_reward(request: Request) -> Any:
        response = await rewards(request, lambda d: (text_list(d, "query", max_items=max_items), None))
        if isinstance(response, dict):  # OpenRLHF reads "rewards" (newer versions also "scores", "extra_logs")
            response = {"rewards": response["rewards"], "scores": response["rewards"], "extra_logs": {}}
        return response

    @app.post("/score")
    async def score(request: Request) -> Any:
        return await rewards(request, lambda d: score_request(d, max_items=max_items))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": scorer.model_dir, "requests": batcher.requests, "batches": batcher.batches,
                "largest_batch_requests": batcher.largest_batch, "max_length": scorer.max_length,
                "normalize": scorer.normalize}

    return app


def _tokens(scorer: Any, first: Sequence[Any], second: Sequence[Any] | None) -> list[list[int]]:
    if second is None:
        return [scorer.tokens(t) for t in first]
    return [scorer.tokens(p, r) for p, r in zip(first, second)]


def _authorized(request: Any, token: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


async def _read_body(request: Any, limit: int) -> bytes:
    """The body, refused past ``limit`` bytes (read in chunks: a huge body is never held whole)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"the request has {int(declared)} bytes; at most {limit} (--max-request-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"the request is over {limit} bytes (--max-request-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)
