"""The ingest pipeline's recorder loop, driven by hand (its link is never started): batches waiting are written in
one transaction, a batch whose write failed goes with the next one, floods reach the hub and what it restricted is
counted, malformed messages are logged at most once per interval and never with a payload."""

from __future__ import annotations

import datetime as dt
import logging
import ssl
from collections.abc import Iterator, Sequence

import pytest

from tests.unit.broker._ingestkit import MemoryStore, recorder_for, telemetry, topic
from warden.broker import Flood, Ingest, IngestPipeline, LinkOptions

T0 = dt.datetime(2030, 1, 2, tzinfo=dt.UTC)


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore({"dev-a": 1.0, "dev-b": None})


@pytest.fixture
def pipeline(store: MemoryStore) -> Iterator[IngestPipeline]:
    restricted: list[Sequence[Flood]] = []

    def on_floods(floods: Sequence[Flood]) -> int:
        restricted.append(floods)
        return len(floods)

    made = IngestPipeline(
        ingest=Ingest(),
        recorder=recorder_for(store, rate=1000, window=1),
        link=LinkOptions(
            address=("127.0.0.1", 1),
            server_name="broker.x.example",
            client_id="hub.x.example",
            tls=ssl.create_default_context,
        ),
        on_floods=on_floods,
        now=lambda: T0,
        log_every=3600,
    )
    made.restricted = restricted  # type: ignore[attr-defined]
    yield made
    made.link.stop()


def cut_after(pipeline: IngestPipeline, *messages: tuple[str, bytes]) -> None:
    for device, payload in messages:
        pipeline.ingest.receive(topic(device, "telemetry"), payload)
    pipeline._cut()


def test_batches_waiting_are_written_in_one_transaction(pipeline: IngestPipeline, store: MemoryStore) -> None:
    for seq in range(1, 4):
        cut_after(pipeline, ("dev-a", telemetry(seq)), ("dev-b", telemetry(seq)))
    pipeline._cut()  # nothing received: nothing queued
    pipeline._queue.put(None)
    pipeline._record_loop()
    assert store.transactions == 1
    assert (store.rows["dev-a"].telemetry, store.rows["dev-b"].telemetry) == (3, 3)
    assert store.totals.flushes == 1


def test_a_batch_whose_write_failed_goes_with_the_next(pipeline: IngestPipeline, store: MemoryStore) -> None:
    store.fail_next_save = True
    cut_after(pipeline, ("dev-b", telemetry(1)))
    pipeline._record(pipeline._queue.get(), final=False)
    assert store.rows == {}
    cut_after(pipeline, ("dev-b", telemetry(2)))
    pipeline._queue.put(None)
    pipeline._record_loop()
    assert store.rows["dev-b"].telemetry == 2


def test_floods_reach_the_hub_and_restrictions_are_counted(pipeline: IngestPipeline, store: MemoryStore) -> None:
    cut_after(pipeline, *(("dev-a", telemetry(seq)) for seq in range(1, 4)), ("dev-b", telemetry(1)))
    cut_after(pipeline, ("dev-b", telemetry(2)))
    pipeline._queue.put(None)
    pipeline._record_loop()
    assert [[f.device_id for f in floods] for floods in pipeline.restricted] == [["dev-a"]]  # type: ignore[attr-defined]
    cut_after(pipeline, ("dev-b", telemetry(3)))
    pipeline._record(pipeline._queue.get(), final=False)
    assert store.totals.restricted == 1


def test_malformed_messages_are_logged_once_per_interval_without_payloads(
    pipeline: IngestPipeline, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="warden.broker._pipeline")
    for _ in range(3):
        cut_after(pipeline, ("dev-b", b"password=hunter2"), ("ghost", telemetry(1)))
        pipeline._record(pipeline._queue.get(), final=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "1 malformed message(s) and 1 from unknown device(s)" in warnings[0]
    assert "device dev-b: malformed telemetry message" in warnings[0]
    assert "hunter2" not in warnings[0]
