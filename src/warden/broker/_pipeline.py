"""The ingest as it runs in ``warden serve``: the link's thread receives and aggregates (:class:`Ingest`) and cuts a
batch every flush interval; the recorder's thread writes each batch in one transaction (:class:`IngestRecorder`)
and hands devices over their flood limit to the hub (``on_floods``), which restricts them.

Batches cross between the two threads whole, through a queue: the link never waits for the database. When the
recorder falls behind, the batches waiting are merged and written as one; a batch whose write failed is merged into
the next one. Malformed messages are logged at WARNING at most once per ``log_every`` seconds, with how many there
were since and one device's reason (never a payload)."""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from warden.broker._ingest import Batch, Flood, Ingest, IngestRecorder
from warden.broker._link import HubLink, LinkOptions, LinkStatus

__all__ = ["IngestPipeline"]

log = logging.getLogger(__name__)


class IngestPipeline:
    def __init__(
        self,
        *,
        ingest: Ingest,
        recorder: IngestRecorder,
        link: LinkOptions,
        on_floods: Callable[[Sequence[Flood]], int],
        on_reports: Callable[[Sequence[tuple[str, str, dict[str, Any]]]], object] | None = None,
        now: Callable[[], dt.datetime],
        log_every: float = 10.0,
    ) -> None:
        self.ingest = ingest
        self.recorder = recorder
        self._on_floods = on_floods
        self._on_reports = on_reports
        self._now = now
        self._log_every = log_every
        self._queue: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._carry: Batch | None = None
        self._failures = 0
        self._malformed_since_log = 0
        self._unknown_since_log = 0
        self._last_log = -float("inf")
        self.link = HubLink(link, deliver=ingest.receive, on_tick=self._cut)
        self._recorder_thread = threading.Thread(target=self._record_loop, name="warden-ingest-recorder", daemon=True)

    def start(self) -> None:
        """Seed the duplicate detection from storage, then start recording and connecting."""
        try:
            self.ingest.seed(self.recorder.sequence_heads())
        except Exception:
            log.exception("the stored sequence numbers could not be read: duplicates of the last run may count twice")
        self._recorder_thread.start()
        self.link.start()

    def stop(self) -> None:
        """Disconnect, write what was received last, and end both threads."""
        self.link.stop()  # its thread cuts the last batch before it ends
        self._queue.put(None)
        self._recorder_thread.join(timeout=30)

    def status(self) -> LinkStatus:
        return self.link.status()

    # -- the link's thread --------------------------------------------------------------------------------------------

    def _cut(self) -> None:
        batch = self.ingest.cut(now=time.monotonic(), at=self._now())
        if batch.devices or batch.invalid_topic or batch.overflow:
            self._queue.put(batch)

    # -- the recorder's thread ----------------------------------------------------------------------------------------

    def _record_loop(self) -> None:
        stopping = False
        while not stopping:
            batch = self._queue.get()
            if batch is None:
                stopping = True
            # Everything waiting goes into one transaction.
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    continue
                batch = more if batch is None else batch.merge(more, self.ingest.config)
            if self._carry is not None:
                batch = self._carry if batch is None else self._carry.merge(batch, self.ingest.config)
                self._carry = None
            if batch is not None:
                self._record(batch, final=stopping)

    def _record(self, batch: Batch, *, final: bool) -> None:
        try:
            result = self.recorder.record(batch)
        except Exception as e:
            self._failures += 1
            if self._failures == 1 or self._failures % 60 == 0:
                log.warning(
                    "ingest: writing a batch of %d messages failed (%s); it is kept for the next attempt",
                    batch.messages,
                    getattr(e, "message", type(e).__name__),
                )
            if not final:
                self._carry = batch
            else:
                log.error("ingest: %d messages of the last batch could not be written", batch.messages)
            return
        if self._failures:
            log.info("ingest: writing batches works again after %d failure(s)", self._failures)
            self._failures = 0
        if batch.reports and self._on_reports is not None:
            try:
                self._on_reports(batch.reports)
            except Exception:
                log.exception("ingest: recording %d command report(s) failed", len(batch.reports))
        self._malformed_since_log += result.malformed
        self._unknown_since_log += sum(batch.devices[d].messages for d in result.unknown_devices)
        now = time.monotonic()
        if (self._malformed_since_log or self._unknown_since_log) and now - self._last_log >= self._log_every:
            self._last_log = now
            example = result.malformed_example
            log.warning(
                "ingest: %d malformed message(s) and %d from unknown device(s) since the last report%s",
                self._malformed_since_log,
                self._unknown_since_log,
                f"; e.g. device {example[0]}: {example[1]}" if example else "",
            )
            self._malformed_since_log = self._unknown_since_log = 0
        if result.floods:
            try:
                restricted = self._on_floods(result.floods)
            except Exception:
                log.exception("ingest: restricting %d flooding device(s) failed", len(result.floods))
            else:
                self.recorder.note_restricted(restricted)
