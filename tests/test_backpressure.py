"""Transport backpressure: the server stops reading a connection while its unprocessed frames cost over a window."""

import asyncio

import pytest

from directdrivex.server import FRAME_COST, TransportBackpressureQueue

WINDOW = 8 * 1024


class RecordingTransport:
    """Stands in for Twisted's TCP transport: records pause/resume calls."""

    def __init__(self):
        self.calls = []

    def pauseProducing(self):
        self.calls.append("pause")

    def resumeProducing(self):
        self.calls.append("resume")


def frame(size: int) -> dict:
    return {"type": "websocket.receive", "bytes": b"x" * size}


@pytest.fixture
def queue():
    return TransportBackpressureQueue(RecordingTransport(), high_water=WINDOW)


def cost(payload: int) -> int:
    return payload + FRAME_COST


async def test_reading_pauses_once_queued_frames_cost_more_than_one_window(queue):
    per_frame = WINDOW // cost(1024)  # 1 KiB frames: four of them cost one window
    for _ in range(per_frame):
        queue.put_nowait(frame(1024))
    assert queue.transport.calls == []  # exactly one window: still reading
    queue.put_nowait(frame(1))
    queue.put_nowait(frame(1024))
    assert queue.transport.calls == ["pause"]  # paused once, not per frame
    assert queue.queued_bytes == per_frame * cost(1024) + cost(1) + cost(1024)


async def test_a_flood_of_empty_frames_pauses_reading_too(queue):
    # Before, only payload bytes counted: empty frames never paused the socket, and a
    # flood of them grew the process without bound.
    for _ in range(WINDOW // FRAME_COST + 1):
        queue.put_nowait(frame(0))
    assert queue.transport.calls == ["pause"]


async def test_reading_resumes_when_the_consumer_drains_below_half_a_window(queue):
    for _ in range(6):
        queue.put_nowait(frame(1024))  # 12 KiB of cost
    await queue.get()
    assert queue.transport.calls == ["pause"]  # 10 KiB left: above half a window
    for _ in range(3):
        await queue.get()
    assert queue.transport.calls == ["pause", "resume"]
    assert queue.queued_bytes == 2 * cost(1024)


async def test_text_and_control_messages_count_by_their_payload_and_their_cost(queue):
    queue.put_nowait({"type": "websocket.receive", "text": "y" * WINDOW})
    queue.put_nowait({"type": "websocket.disconnect", "code": 1000})
    assert queue.transport.calls == ["pause"]
    assert (await asyncio.wait_for(queue.get(), 1))["text"]
    assert queue.queued_bytes == FRAME_COST
    assert queue.transport.calls == ["pause", "resume"]


def test_streamed_http_body_pieces_cost_their_bytes_too():
    """A tus body arrives as http.request messages ("body", not "bytes"): they must fill the window as frames do."""
    queue = TransportBackpressureQueue(RecordingTransport(), high_water=WINDOW)
    piece = {"type": "http.request", "body": b"x" * (256 * 1024), "more_body": True}
    for _ in range(WINDOW // cost(256 * 1024)):
        queue.put_nowait(piece)
    assert queue.transport.calls == []
    queue.put_nowait(piece)
    assert queue.transport.calls == ["pause"]
