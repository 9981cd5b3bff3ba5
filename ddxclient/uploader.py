"""Uploads one file: POST, then stream over the WebSocket, resuming wherever the server says.

The server's ``ready.offset`` is the only resume point: after any disconnect
the client reconnects (fresh ticket from GET /api/uploads/<id>/), reads
``ready`` and seeks there, never trusting its own count of bytes sent.

Every way a connection or an API call can end is either a ``Retry`` (network
and server faults, busy, no slot: wait ``retry_after`` / ``Retry-After`` or back
off, then go on) or a ``Refused`` (the request itself is wrong: stop). The two
tables that decide are ``ws_verdict`` and ``http_verdict``; docs/client.md
lists them. Retries without progress are bounded: the count restarts whenever
the server's offset advanced, so a long upload survives any number of
separate faults but gives up on one that never heals.
"""

import asyncio
import contextlib
import email.utils
import hashlib
import http.client
import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
import uuid
from urllib.parse import urlsplit, urlunsplit

import websockets
from tqdm import tqdm
from websockets.protocol import State

log = logging.getLogger("ddxclient")

EXIT_REFUSED = 3
EXIT_FAILED = 4
EXIT_INTERRUPTED = 130

# Error codes (the message the server sends before closing) after which reconnecting can succeed.
RETRYABLE_CODES = frozenset({"busy", "lease_lost", "slots_exhausted", "idle_timeout", "internal_error", "unavailable"})
# Reconnecting at once is the remedy: a fresh ticket comes with every GET; the GET shows a finished upload.
RECHECK_CODES = frozenset({"unauthenticated", "not_uploading"})
FINAL_CODES = frozenset({"protocol_error", "not_found", "size_exceeded", "checksum_mismatch"})
# What a close code means when no error message came before it (or it named a code this client does not know).
CLOSE_CODES = {
    4400: "protocol_error",
    4401: "unauthenticated",
    4404: "not_found",
    4408: "idle_timeout",
    4409: "busy",  # or not_uploading: the GET before the reconnect tells
    4410: "lease_lost",
    4413: "size_exceeded",
    4422: "checksum_mismatch",
    4429: "slots_exhausted",
    4500: "internal_error",
    4503: "unavailable",
}
# Closes that say nothing about the upload: going away, no status, abnormal (no close frame), server error,
# restart, try again later; 1000 without "complete" (the GET shows whether the upload finished).
NETWORK_CLOSES = frozenset({1000, 1001, 1005, 1006, 1011, 1012, 1013})
# HTTP statuses worth retrying besides every 5xx (409 only with the code busy).
RETRYABLE_HTTP = frozenset({408, 429})

READ_BLOCK = 4 * 1024 * 1024
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
# A Retry-After beyond this is a server bug or a hostile one; it still gets a retry, just sooner.
MAX_RETRY_AFTER = 300.0
# How long to wait for the server's close after its error message: by then it has made the written bytes
# durable and freed the slot, so the reconnect is admitted at once.
CLOSE_WAIT = 5.0


class Refused(Exception):
    """The server refused for good (bad request, not found, quota, checksum...)."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code


class Failed(Exception):
    """The upload could not be finished (retries exhausted, digest mismatch, the file unreadable)."""


class Retry(Exception):
    """Try again, after ``delay`` seconds if the server said so (else the backoff decides)."""

    def __init__(self, reason: str, delay: float | None = None, *, code: str | None = None):
        super().__init__(reason)
        self.delay = delay
        self.code = code


def ws_verdict(message: dict | None, close_code: int | None) -> Retry | Refused:
    """What a connection that ended without ``complete`` means: ``message`` is the error message, if any."""
    message = message or {}
    code = message.get("code")
    if code not in RETRYABLE_CODES | RECHECK_CODES | FINAL_CODES:
        code = CLOSE_CODES.get(close_code)
    detail = message.get("detail") or f"the connection closed with {close_code or 'no close code'}"
    if code in FINAL_CODES or (code is None and close_code not in NETWORK_CLOSES and close_code is not None):
        return Refused(code or f"closed_{close_code}", detail)
    delay = retry_after(message.get("retry_after"))
    if delay is None and code in RECHECK_CODES:
        delay = 0.0
    return Retry(f"{code} ({close_code}): {detail}" if message else detail, delay, code=code)


def http_verdict(what: str, status: int, headers, payload) -> Retry | Refused:
    """What an HTTP error status means; ``headers`` is looked up case-insensitively (``.get``)."""
    payload = payload if isinstance(payload, dict) else {}
    code = str(payload.get("code") or f"http_{status}")
    detail = str(payload.get("detail") or f"HTTP {status}")
    if status >= 500 or status in RETRYABLE_HTTP or (status == 409 and code == "busy"):
        delay = retry_after(headers.get("Retry-After")) if headers is not None else None
        if delay is None:
            delay = retry_after(payload.get("retry_after"))
        return Retry(f"{what} answered {status} {code}: {detail}", delay, code=code)
    return Refused(code, detail)


def retry_after(value) -> float | None:
    """Seconds from a ``retry_after`` number or a ``Retry-After`` header (seconds or an HTTP date)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        try:
            seconds = email.utils.parsedate_to_datetime(str(value)).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def backoff(attempt: int) -> float:
    """Exponential backoff with jitter for the ``attempt``-th retry: 0.5 s, 1 s, 2 s ... capped at 30 s."""
    return min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** min(attempt - 1, 10)) * random.uniform(0.5, 1.0)


async def pause(seconds: float) -> None:
    """Wait between retries (a seam: the client's tests skip the waiting and record it)."""
    await asyncio.sleep(seconds)


class RetryBudget:
    """Retries of one upload: at most ``max_retries`` in a row without progress.

    Progress is the server's offset (``ready``, an ack, the GET) going past the
    highest it stated before; then the count and the backoff start over, as
    tus-js-client does, so backoff delays apply per stall.
    """

    def __init__(self, max_retries: int, offset: int = 0):
        self.max_retries = max_retries
        self.attempt = 0
        self.offset = offset

    def progress(self, offset: int) -> None:
        if offset > self.offset:
            self.offset = offset
            self.attempt = 0

    def next_delay(self, retry: Retry) -> float:
        self.attempt += 1
        if self.attempt > self.max_retries:
            raise Failed(f"gave up after {self.max_retries} retries without progress; last: {retry}") from retry
        return retry.delay if retry.delay is not None else backoff(self.attempt)


def file_sha256(path: str, progress: bool) -> str:
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    with (
        open(path, "rb") as handle,
        tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc="sha256", disable=not progress) as bar,
    ):
        while block := handle.read(READ_BLOCK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


class Uploader:
    def __init__(
        self, server: str, token: str, *, declare_sha256=True, max_retries=50, progress=True, timeout: float = 60
    ):
        self.server = server.rstrip("/")
        self.token = token
        self.declare_sha256 = declare_sha256
        self.max_retries = max_retries
        self.progress = progress
        # Seconds without any sign of life from the server (an answer, an ack, bytes leaving) before giving up
        # on a request or a connection and retrying.
        self.timeout = timeout
        self.upload_id: str | None = None

    # --- HTTP -------------------------------------------------------------------

    def _http(self, method: str, path: str, body: dict | None = None):
        request = urllib.request.Request(
            self.server + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Token {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, response.headers, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            try:
                payload = json.loads(error.read() or b"{}")
            except ValueError:
                payload = {}  # not ours (a proxy's HTML page): the status alone decides
            return error.code, error.headers, payload

    async def _call(self, method: str, path: str, body: dict | None = None):
        """One API call: the JSON payload, else Retry or Refused."""
        what = f"{method} {path}"
        try:
            status, headers, payload = await asyncio.to_thread(self._http, method, path, body)
        except (OSError, http.client.HTTPException, ValueError) as error:
            # Refused, reset, timed out, cut short, or an unparsable success body: all network faults.
            raise Retry(f"{what} failed: {error!r}") from error
        if status >= 300:
            raise http_verdict(what, status, headers, payload)
        return payload

    async def _api(self, method: str, path: str, body: dict | None = None, *, budget: RetryBudget):
        while True:
            try:
                return await self._call(method, path, body)
            except Retry as retry:
                await self._wait(budget, retry)

    async def _create(self, body: dict, budget: RetryBudget) -> dict:
        """POST /api/uploads/. Before posting again, look for the upload a lost answer may have created."""
        body = {**body, "fingerprint": f"ddxclient:{uuid.uuid4()}"}
        while True:
            try:
                return await self._call("POST", "/api/uploads/", body)
            except Retry as retry:
                await self._wait(budget, retry)
            listing = await self._api("GET", "/api/uploads/?status=uploading", budget=budget)
            fingerprint = body["fingerprint"]
            mine = [item["id"] for item in listing if isinstance(item, dict) and item.get("fingerprint") == fingerprint]
            if mine:
                log.info("upload %s: the lost POST had created it", mine[0])
                return await self._api("GET", f"/api/uploads/{mine[0]}/", budget=budget)

    async def _wait(self, budget: RetryBudget, retry: Retry) -> None:
        delay = budget.next_delay(retry)
        attempts = f"{budget.attempt} of {budget.max_retries}"
        log.warning("upload %s: %s; retrying in %.1fs (%s)", self.upload_id or "(new)", retry, delay, attempts)
        await pause(delay)

    def _ws_address(self, ws_url: str) -> str:
        parts = urlsplit(self.server)
        scheme = "wss" if parts.scheme == "https" else "ws"
        path, _, query = ws_url.partition("?")
        return urlunsplit((scheme, parts.netloc, path, query, ""))

    # --- the upload ---------------------------------------------------------------

    async def upload(self, path: str, *, resume_id: str | None = None) -> dict:
        try:
            size = os.path.getsize(path)
            own_sha256 = await asyncio.to_thread(file_sha256, path, self.progress)
        except OSError as error:
            raise Failed(f"cannot read {path}: {error}") from error
        budget = RetryBudget(self.max_retries)
        if resume_id:
            self.upload_id = resume_id
            info = await self._api("GET", f"/api/uploads/{resume_id}/", budget=budget)
            if info["size"] != size:
                raise Refused("size_mismatch", f"upload {resume_id} is {info['size']} bytes, the file is {size}")
        else:
            body = {"filename": os.path.basename(path), "size": size}
            if self.declare_sha256:
                body["sha256"] = own_sha256
            info = await self._create(body, budget)
        self.upload_id = info["id"]
        log.info("upload %s: %d bytes, resuming at %d", self.upload_id, size, info["offset"])

        with tqdm(
            total=size, unit="B", unit_scale=True, unit_divisor=1024, desc="upload", disable=not self.progress
        ) as bar:
            last_code = None
            while True:
                budget.progress(info["offset"])
                if info["status"] == "complete":
                    result = {"id": info["id"], "size": info["size"], "sha256": info.get("sha256") or ""}
                    break
                if info["status"] != "uploading":
                    raise Refused("not_uploading", f"the upload is {info['status']}")
                try:
                    result = await self._stream(path, size, info["ws_url"], bar, budget)
                    break
                except Retry as retry:
                    # Refused twice in a row with no progress in between: the fresh ticket is no good either.
                    if retry.code == last_code == "unauthenticated" and budget.attempt > 0:
                        raise Refused("unauthenticated", "the server refused a fresh ticket too") from retry
                    last_code = retry.code
                    await self._wait(budget, retry)
                # A fresh ticket (and the status, in case the upload finished or was cancelled).
                info = await self._api("GET", f"/api/uploads/{self.upload_id}/", budget=budget)

        if result["sha256"] and result["sha256"] != own_sha256:
            raise Failed(f"server has sha256 {result['sha256']}, the file has {own_sha256}")
        result["sha256"] = own_sha256
        return result

    async def _stream(self, path: str, size: int, ws_url: str, bar, budget: RetryBudget | None = None) -> dict:
        """One connection: send from ready.offset honouring the window; return the complete message."""
        budget = budget or RetryBudget(self.max_retries)
        try:
            async with websockets.connect(
                self._ws_address(ws_url),
                compression=None,  # file bytes rarely compress; deflate would cost more CPU than the wire
                max_size=1024 * 1024,
                write_limit=4 * 1024 * 1024,
                open_timeout=self.timeout,
                ping_interval=min(20.0, self.timeout / 2),
                ping_timeout=self.timeout,
                close_timeout=min(10.0, self.timeout),
            ) as ws:
                try:
                    return await self._send_file(ws, path, size, bar, budget)
                except AttributeError as error:
                    # websockets 17 can fail so when the server dies while a send waits out the closing
                    # handshake: it aborts a transport asyncio has already torn down. The connection is
                    # gone, as in any other loss (the fault suite's kill -9 met it): retry from the server's offset.
                    if ws.state not in (State.CLOSING, State.CLOSED):
                        raise
                    raise Retry(f"connection lost: {error!r}") from error
        except websockets.InvalidStatus as error:
            response = error.response
            try:
                payload = json.loads(response.body or b"{}")
            except ValueError:
                payload = {}
            raise http_verdict("the WebSocket handshake", response.status_code, response.headers, payload) from error
        except (TimeoutError, OSError, websockets.InvalidHandshake) as error:
            raise Retry(f"network error: {error!r}") from error

    async def _send_file(self, ws, path: str, size: int, bar, budget: RetryBudget) -> dict:
        try:
            ready = await asyncio.wait_for(self._receive(ws), self.timeout)
        except TimeoutError:
            raise Retry(f"no ready from the server within {self.timeout:g}s") from None
        if ready.get("type") != "ready":
            raise Retry(f"expected ready, got {ready.get('type')!r}")
        offset, chunk, window = ready["offset"], ready["chunk_size"], ready["window"]
        budget.progress(offset)
        bar.n = offset  # the server's durable point, not what we sent before
        bar.refresh()
        acked = sent = offset
        heard = asyncio.Event()  # set on every message from the server, and when the reader stops
        outcome: dict = {}

        async def read_messages():
            nonlocal acked
            try:
                while True:
                    message = await self._receive(ws)
                    heard.set()
                    if message.get("type") == "ack":
                        acked = max(acked, message["offset"])
                        budget.progress(acked)
                        bar.update(max(0, acked - bar.n))
                    elif message.get("type") == "complete":
                        outcome["complete"] = message
                        return
            except BaseException as error:  # surfaces in the sender below
                outcome.setdefault("error", error)
            finally:
                heard.set()

        async def watch():
            # Keepalive pings cannot tell a stalled network while our write buffer is full (the ping waits
            # behind it), nor a hung server (Daphne answers pings for it): watch the signs of life instead,
            # acks and bytes leaving the write buffer (however slowly: a slow link is not a stalled one).
            loop = asyncio.get_running_loop()
            seen, since = None, loop.time()
            while True:
                await asyncio.sleep(min(1.0, self.timeout / 4))
                mark = (acked, sent - ws.transport.get_write_buffer_size())
                if mark != seen:
                    seen, since = mark, loop.time()
                elif loop.time() - since > self.timeout:
                    outcome.setdefault("error", Retry(f"no progress for {self.timeout:g}s: the connection stalled"))
                    ws.transport.abort()
                    return

        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed by the with below
        except OSError as error:  # our disk, not the network: retrying would not help
            raise Failed(f"cannot read {path}: {error}") from error
        reader = asyncio.create_task(read_messages())
        watchdog = asyncio.create_task(watch())
        try:
            with handle:
                handle.seek(offset)
                while sent < size and not reader.done():
                    frame = min(chunk, size - sent)
                    while sent + frame - acked > window and not reader.done():
                        heard.clear()
                        await heard.wait()
                    if reader.done():
                        break
                    try:
                        data = handle.read(frame)
                    except OSError as error:
                        raise Failed(f"cannot read {path}: {error}") from error
                    if len(data) != frame:
                        raise Failed(f"{path} changed while uploading (short read at {sent})")
                    try:
                        await ws.send(data)
                    except websockets.ConnectionClosed:
                        break  # the reader says why: an error message, or the close code (1006 on a reset)
                    sent += frame
            await reader
        finally:
            watchdog.cancel()
            reader.cancel()
        if "complete" in outcome:
            bar.update(size - bar.n)
            return outcome["complete"]
        raise outcome.get("error") or Retry("the connection ended before completion")

    async def _receive(self, ws) -> dict:
        """The next message; an error message or a close becomes Retry or Refused (ws_verdict)."""
        try:
            raw = await ws.recv()
        except websockets.ConnectionClosed as closed:
            raise ws_verdict(None, closed.rcvd.code if closed.rcvd else 1006) from closed
        try:
            message = json.loads(raw) if isinstance(raw, str) else None
        except ValueError:
            message = None
        if not isinstance(message, dict):
            raise Retry("the server sent something other than a JSON message")
        if message.get("type") != "error":
            return message
        raise ws_verdict(message, await close_code_of(ws, min(CLOSE_WAIT, self.timeout)))


async def close_code_of(ws, timeout: float) -> int | None:
    """The server's close code after its error message; None if the close never came."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ws.wait_closed(), timeout)
        return ws.close_code
    return None
