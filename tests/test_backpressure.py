"""Transport backpressure: the server stops reading a connection while its unprocessed frames exceed a window."""

import asyncio

import pytest

from directdrivex.server import TransportBackpressureQueue

WINDOW = 8 * 1024


class RecordingTransport:
    """Stands in for Twisted's TCP transport: records pause/resume calls."""

    def __init__(self):
        self.calls = []

    def pauseProducing(self):
        self.calls.append("pause")

    def resumeProducing(self):
        self.calls.append("resume")


class Protocol:
    def __init__(self):
        self.transport = RecordingTransport()


def frame(size: int) -> dict:
    return {"type": "websocket.receive", "bytes": b"x" * size}


@pytest.fixture
def queue():
    return TransportBackpressureQueue(Protocol(), high_water=WINDOW)


async def test_reading_pauses_once_queued_frames_pass_one_window(queue):
    for _ in range(8):
        queue.put_nowait(frame(1024))
    assert queue.protocol.transport.calls == []  # exactly one window: still reading
    queue.put_nowait(frame(1))
    queue.put_nowait(frame(1024))
    assert queue.protocol.transport.calls == ["pause"]  # paused once, not per frame
    assert queue.queued_bytes == WINDOW + 1025


async def test_reading_resumes_when_the_consumer_drains_below_half_a_window(queue):
    for _ in range(10):
        queue.put_nowait(frame(1024))
    for _ in range(5):
        await queue.get()
    assert queue.protocol.transport.calls == ["pause"]  # 5 KiB left: above half a window
    await queue.get()
    assert queue.protocol.transport.calls == ["pause", "resume"]
    assert queue.queued_bytes == 4 * 1024


async def test_text_and_control_messages_count_by_their_payload(queue):
    queue.put_nowait({"type": "websocket.receive", "text": "y" * (WINDOW + 1)})
    queue.put_nowait({"type": "websocket.disconnect", "code": 1000})
    assert queue.protocol.transport.calls == ["pause"]
    assert (await asyncio.wait_for(queue.get(), 1))["text"]
    assert queue.queued_bytes == 0
    assert queue.protocol.transport.calls == ["pause", "resume"]
