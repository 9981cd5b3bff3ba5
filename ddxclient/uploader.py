"""Uploads one file: POST, then stream over the WebSocket, resuming wherever the server says.

The server's ``ready.offset`` is the only resume point: after any disconnect
the client reconnects (fresh ticket from GET /api/uploads/<id>/), reads
``ready`` and seeks there, never trusting its own count of bytes sent.
"""

import asyncio
import hashlib
import json
import logging
import os
import random
import urllib.error
import urllib.request
from urllib.parse import urlsplit, urlunsplit

import websockets
from tqdm import tqdm

log = logging.getLogger("ddxclient")

EXIT_REFUSED = 3
EXIT_FAILED = 4
EXIT_INTERRUPTED = 130

# Close codes after which reconnecting can succeed (spec: WebSocket protocol).
RETRYABLE_CLOSE = {1001, 1006, 1011, 1012, 1013, 4410, 4429}
READ_BLOCK = 4 * 1024 * 1024
MAX_BACKOFF = 30.0


class Refused(Exception):
    """The server refused for good (bad request, not found, quota, checksum...)."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code


class Failed(Exception):
    """The upload could not be finished (retries exhausted, digest mismatch)."""


class Retry(Exception):
    """Reconnect, after ``delay`` seconds if the server said so."""

    def __init__(self, reason: str, delay: float | None = None):
        super().__init__(reason)
        self.delay = delay


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
    def __init__(self, server: str, token: str, *, declare_sha256=True, max_retries=50, progress=True):
        self.server = server.rstrip("/")
        self.token = token
        self.declare_sha256 = declare_sha256
        self.max_retries = max_retries
        self.progress = progress
        self.upload_id: str | None = None

    # --- HTTP -------------------------------------------------------------------

    def _http(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict, dict]:
        request = urllib.request.Request(
            self.server + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Token {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, dict(response.headers), json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            try:
                payload = json.loads(error.read() or b"{}")
            except ValueError:
                payload = {"code": "http_error", "detail": f"HTTP {error.code}"}
            return error.code, dict(error.headers), payload

    async def _api(self, method: str, path: str, body: dict | None = None) -> dict:
        """Call the API, waiting out 429 (Retry-After) and network errors; other refusals are final."""
        for attempt in range(self.max_retries + 1):
            try:
                status, headers, payload = await asyncio.to_thread(self._http, method, path, body)
            except OSError as error:
                delay = backoff(attempt)
                log.warning("network error on %s %s: %s; retrying in %.1fs", method, path, error, delay)
                await asyncio.sleep(delay)
                continue
            if status == 429:
                delay = float(headers.get("Retry-After") or payload.get("retry_after") or backoff(attempt))
                log.warning("%s; retrying in %.0fs", payload.get("detail", "server busy"), delay)
                await asyncio.sleep(delay)
                continue
            if status >= 500:
                await asyncio.sleep(backoff(attempt))
                continue
            if status >= 400:
                raise Refused(payload.get("code", str(status)), payload.get("detail", ""))
            return payload
        raise Failed(f"{method} {path} kept failing after {self.max_retries} retries")

    def _ws_address(self, ws_url: str) -> str:
        parts = urlsplit(self.server)
        scheme = "wss" if parts.scheme == "https" else "ws"
        path, _, query = ws_url.partition("?")
        return urlunsplit((scheme, parts.netloc, path, query, ""))

    # --- the upload ---------------------------------------------------------------

    async def upload(self, path: str, *, resume_id: str | None = None) -> dict:
        size = os.path.getsize(path)
        own_sha256 = await asyncio.to_thread(file_sha256, path, self.progress)
        if resume_id:
            info = await self._api("GET", f"/api/uploads/{resume_id}/")
            if info["size"] != size:
                raise Refused("size_mismatch", f"upload {resume_id} is {info['size']} bytes, the file is {size}")
        else:
            body = {"filename": os.path.basename(path), "size": size}
            if self.declare_sha256:
                body["sha256"] = own_sha256
            info = await self._api("POST", "/api/uploads/", body)
        self.upload_id = info["id"]
        log.info("upload %s (%d bytes)", self.upload_id, size)

        with tqdm(
            total=size, unit="B", unit_scale=True, unit_divisor=1024, desc="upload", disable=not self.progress
        ) as bar:
            attempt = 0
            while True:
                if info["status"] == "complete":
                    result = {"id": info["id"], "size": info["size"], "sha256": info.get("sha256") or ""}
                    break
                if info["status"] != "uploading":
                    raise Refused("not_uploading", f"the upload is {info['status']}")
                try:
                    result = await self._stream(path, size, info["ws_url"], bar)
                    break
                except Retry as retry:
                    attempt += 1
                    if attempt > self.max_retries:
                        raise Failed(f"gave up after {self.max_retries} reconnects: {retry}") from retry
                    delay = retry.delay if retry.delay is not None else backoff(attempt)
                    log.warning("%s; reconnecting in %.1fs (attempt %d)", retry, delay, attempt)
                    await asyncio.sleep(delay)
                # A fresh ticket (and the status, in case the upload finished or was cancelled).
                info = await self._api("GET", f"/api/uploads/{self.upload_id}/")

        if result["sha256"] and result["sha256"] != own_sha256:
            raise Failed(f"server has sha256 {result['sha256']}, the file has {own_sha256}")
        result["sha256"] = own_sha256
        return result

    async def _stream(self, path: str, size: int, ws_url: str, bar) -> dict:
        """One connection: send from ready.offset honouring the window; return the complete message."""
        try:
            async with websockets.connect(
                self._ws_address(ws_url),
                compression=None,  # file bytes rarely compress; deflate would cost more CPU than the wire
                max_size=1024 * 1024,
                write_limit=4 * 1024 * 1024,
                open_timeout=30,
                ping_interval=20,
                ping_timeout=60,
            ) as ws:
                return await self._send_file(ws, path, size, bar)
        except websockets.InvalidStatus as error:
            status = error.response.status_code
            if status in (401, 403):
                raise Refused("forbidden", f"the server refused the WebSocket handshake ({status})") from error
            raise Retry(f"handshake answered HTTP {status}") from error
        except (TimeoutError, OSError, websockets.InvalidHandshake) as error:
            raise Retry(f"network error: {error!r}") from error

    async def _send_file(self, ws, path: str, size: int, bar) -> dict:
        ready = await self._next_message(ws)
        if ready.get("type") != "ready":
            raise Failed(f"expected ready, got {ready}")
        offset, chunk, window = ready["offset"], ready["chunk_size"], ready["window"]
        bar.n = offset  # the server's durable point, not what we sent before
        bar.refresh()
        acked = offset
        window_open = asyncio.Event()
        outcome: dict = {}

        async def read_acks():
            nonlocal acked
            try:
                while True:
                    message = await self._next_message(ws)
                    if message["type"] == "ack":
                        acked = max(acked, message["offset"])
                        bar.update(max(0, acked - bar.n))
                    elif message["type"] == "complete":
                        outcome["complete"] = message
                        return
                    window_open.set()
            except BaseException as error:  # surfaces in the sender below
                outcome["error"] = error
            finally:
                window_open.set()

        reader = asyncio.create_task(read_acks())
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                sent = offset
                while sent < size:
                    frame = min(chunk, size - sent)
                    while sent + frame - acked > window and "error" not in outcome and not reader.done():
                        window_open.clear()
                        await window_open.wait()
                    if "error" in outcome or reader.done():
                        break
                    data = handle.read(frame)
                    if len(data) != frame:
                        raise Failed(f"{path} changed while uploading (short read at {sent})")
                    try:
                        await ws.send(data)
                    except websockets.ConnectionClosed:
                        break  # the reader below says why: an error message, or the close code (1006 on a reset)
                    sent += frame
            await reader
        finally:
            reader.cancel()
        if "complete" in outcome:
            bar.update(size - bar.n)
            return outcome["complete"]
        raise outcome.get("error") or Retry("connection ended before completion")

    async def _next_message(self, ws) -> dict:
        """The next JSON message; an error message or close becomes Refused or Retry."""
        try:
            raw = await ws.recv()
        except websockets.ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd else 1006
            raise Retry(f"connection closed ({code})") from closed
        if isinstance(raw, bytes):
            raise Failed("the server sent a binary message")
        message = json.loads(raw)
        if message.get("type") != "error":
            return message
        code, detail = message.get("code", "error"), message.get("detail", "")
        close_code = await close_code_of(ws)
        retry_after = message.get("retry_after")
        if code == "busy" or close_code in RETRYABLE_CLOSE:
            raise Retry(f"{code}: {detail}", retry_after)
        if code == "unauthenticated":
            # The ticket expired: every reconnect fetches a fresh ws_url first.
            raise Retry(f"{code}: {detail}", 0)
        raise Refused(code, detail)


async def close_code_of(ws) -> int | None:
    try:
        await asyncio.wait_for(ws.wait_closed(), 5)
    except TimeoutError:
        return None
    return ws.close_code


def backoff(attempt: int) -> float:
    """Exponential backoff with jitter: 0.5 s, 1 s, 2 s ... capped at 30 s."""
    return min(MAX_BACKOFF, 0.5 * 2 ** min(attempt, 10)) * random.uniform(0.5, 1.0)
