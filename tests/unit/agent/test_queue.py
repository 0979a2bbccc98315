"""The agent's outbound queue, in memory and in SQLite: FIFO, in-flight exclusion, acknowledgement, the bound with
its drop policy (the oldest telemetry first, then the oldest of anything) and, for the file queue, a restart."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warden.agent import FileQueue, MemoryQueue, MessageQueue

QueueFactory = Callable[[int], MessageQueue]
TOPIC = "warden/dev-a/telemetry"


@pytest.fixture(params=["memory", "file"])
def make_queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[QueueFactory]:
    queues: list[MessageQueue] = []

    def factory(limit: int) -> MessageQueue:
        queue: MessageQueue = (
            MemoryQueue(limit) if request.param == "memory" else FileQueue(tmp_path / f"q{len(queues)}.sqlite", limit)
        )
        queues.append(queue)
        return queue

    yield factory
    for queue in queues:
        queue.close()


def payloads(queue: MessageQueue, limit: int = 1000) -> list[bytes]:
    return [item.payload for item in queue.pending(limit)]


def fill(queue: MessageQueue, *specs: tuple[str, bool]) -> list[int]:
    return [queue.put(TOPIC, name.encode(), droppable=droppable) for name, droppable in specs]


def test_an_empty_queue(make_queue: QueueFactory) -> None:
    queue = make_queue(10)
    assert len(queue) == 0
    assert queue.pending(10) == []
    assert queue.dropped == 0


def test_messages_come_out_in_the_order_they_went_in(make_queue: QueueFactory) -> None:
    queue = make_queue(100)
    ids = [queue.put(f"warden/dev-a/{kind}", bytes([i]), droppable=i % 2 == 0) for i, kind in enumerate(["a"] * 20)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 20
    assert len(queue) == 20
    items = queue.pending(100)
    assert [item.id for item in items] == ids
    assert [item.payload for item in items] == [bytes([i]) for i in range(20)]
    assert [item.droppable for item in items] == [i % 2 == 0 for i in range(20)]
    assert {item.topic for item in items} == {"warden/dev-a/a"}


def test_pending_leaves_the_messages_queued(make_queue: QueueFactory) -> None:
    queue = make_queue(10)
    fill(queue, ("a", True), ("b", False))
    assert payloads(queue) == payloads(queue) == [b"a", b"b"]
    assert len(queue) == 2


@pytest.mark.parametrize("limit", [1, 3, 5, 10])
def test_pending_returns_at_most_limit_of_the_oldest(make_queue: QueueFactory, limit: int) -> None:
    queue = make_queue(100)
    fill(queue, *[(str(i), True) for i in range(5)])
    assert payloads(queue, limit) == [str(i).encode() for i in range(min(limit, 5))]


def test_pending_of_zero_from_the_file_queue_is_empty(tmp_path: Path) -> None:
    queue = FileQueue(tmp_path / "q.sqlite", 10)
    try:
        queue.put(TOPIC, b"a", droppable=True)
        assert queue.pending(0) == []
    finally:
        queue.close()


def test_pending_of_zero_from_the_memory_queue_is_empty() -> None:
    queue = MemoryQueue(10)
    queue.put(TOPIC, b"a", droppable=True)
    assert queue.pending(0) == []


def test_pending_skips_the_messages_in_flight(make_queue: QueueFactory) -> None:
    queue = make_queue(100)
    ids = fill(queue, *[(str(i), True) for i in range(6)])
    assert [item.id for item in queue.pending(3, exclude={ids[0], ids[2]})] == [ids[1], ids[3], ids[4]]
    assert [item.id for item in queue.pending(10, exclude=frozenset(ids[:5]))] == [ids[5]]
    assert queue.pending(10, exclude=set(ids)) == []
    # ids that are not (or no longer) queued change nothing
    assert [item.id for item in queue.pending(2, exclude={10_000, 10_001, 10_002})] == ids[:2]


def test_ack_removes_one_message(make_queue: QueueFactory) -> None:
    queue = make_queue(10)
    ids = fill(queue, ("a", True), ("b", False), ("c", True))
    queue.ack(ids[1])
    assert payloads(queue) == [b"a", b"c"]
    assert len(queue) == 2
    queue.ack(ids[1])  # twice: nothing happens
    queue.ack(12345)  # unknown: nothing happens
    assert len(queue) == 2
    queue.ack(ids[0])
    queue.ack(ids[2])
    assert len(queue) == 0
    assert queue.pending(10) == []
    assert queue.dropped == 0  # acknowledged is not dropped


def test_ids_are_not_reused_after_an_ack(make_queue: QueueFactory) -> None:
    queue = make_queue(10)
    first = queue.put(TOPIC, b"a", droppable=True)
    queue.ack(first)
    assert queue.put(TOPIC, b"b", droppable=True) > first


def test_a_full_queue_drops_the_oldest_droppable_message_first(make_queue: QueueFactory) -> None:
    queue = make_queue(4)
    fill(queue, ("event-1", False), ("telemetry-1", True), ("health-1", False), ("telemetry-2", True))
    fill(queue, ("event-2", False))
    assert payloads(queue) == [b"event-1", b"health-1", b"telemetry-2", b"event-2"]
    assert queue.dropped == 1
    fill(queue, ("telemetry-3", True))
    assert payloads(queue) == [b"event-1", b"health-1", b"event-2", b"telemetry-3"]
    assert queue.dropped == 2
    assert len(queue) == 4


def test_without_droppable_messages_the_oldest_of_any_kind_goes(make_queue: QueueFactory) -> None:
    queue = make_queue(3)
    fill(queue, ("event-1", False), ("event-2", False), ("health-1", False))
    fill(queue, ("telemetry-1", True))  # the new message is kept, droppable or not
    assert payloads(queue) == [b"event-2", b"health-1", b"telemetry-1"]
    fill(queue, ("event-3", False))  # now there is telemetry to drop again
    assert payloads(queue) == [b"event-2", b"health-1", b"event-3"]
    fill(queue, ("event-4", False))
    assert payloads(queue) == [b"health-1", b"event-3", b"event-4"]
    assert queue.dropped == 3
    assert len(queue) == 3


def test_the_dropped_counter_counts_every_drop(make_queue: QueueFactory) -> None:
    queue = make_queue(10)
    for i in range(35):
        queue.put(TOPIC, str(i).encode(), droppable=True)
    assert queue.dropped == 25
    assert len(queue) == 10
    assert payloads(queue) == [str(i).encode() for i in range(25, 35)]


def test_a_queue_of_one_keeps_only_the_newest(make_queue: QueueFactory) -> None:
    queue = make_queue(1)
    fill(queue, ("a", False), ("b", True), ("c", False))
    assert payloads(queue) == [b"c"]
    assert queue.dropped == 2


def test_acknowledged_room_is_reused_without_drops(make_queue: QueueFactory) -> None:
    queue = make_queue(2)
    first, _ = fill(queue, ("a", True), ("b", True))
    queue.ack(first)
    fill(queue, ("c", True))
    assert payloads(queue) == [b"b", b"c"]
    assert queue.dropped == 0


# --- the file queue across a restart ------------------------------------------------------------------------------


def test_the_file_queue_survives_a_restart_with_its_contents_and_dropped_count(tmp_path: Path) -> None:
    path = tmp_path / "state" / "queue.sqlite"
    queue = FileQueue(path, 3)
    ids = fill(queue, ("event-1", False), ("telemetry-1", True), ("telemetry-2", True), ("event-2", False))
    queue.put(TOPIC, b"\x00\xffbinary", droppable=False)
    queue.ack(ids[0])
    assert queue.dropped == 2
    before = queue.pending(10)
    assert [item.payload for item in before] == [b"event-2", b"\x00\xffbinary"]
    queue.close()

    reopened = FileQueue(path, 3)
    try:
        assert reopened.pending(10) == before
        assert len(reopened) == 2
        assert reopened.dropped == 2
        new = reopened.put(TOPIC, b"after", droppable=False)
        assert new > max(ids)  # ids keep growing across restarts, also past acknowledged ones
        assert reopened.dropped == 2
        reopened.put(TOPIC, b"more", droppable=False)
        assert reopened.dropped == 3  # event-2, the oldest, went
        assert payloads(reopened) == [b"\x00\xffbinary", b"after", b"more"]
    finally:
        reopened.close()
    again = FileQueue(path, 3)
    try:
        assert again.dropped == 3
        assert len(again) == 3
        assert payloads(again) == [b"\x00\xffbinary", b"after", b"more"]
    finally:
        again.close()


def test_a_file_queue_reopened_with_a_smaller_limit_drops_down_to_it(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite"
    queue = FileQueue(path, 10)
    fill(queue, *[(f"t{i}", True) for i in range(6)])
    queue.close()
    smaller = FileQueue(path, 3)
    try:
        assert len(smaller) == 6  # nothing is dropped until something is put
        smaller.put(TOPIC, b"new", droppable=False)
        assert payloads(smaller) == [b"t4", b"t5", b"new"]
        assert smaller.dropped == 4
    finally:
        smaller.close()


def test_the_file_queue_makes_its_directory(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "queue.sqlite"
    queue = FileQueue(path, 10)
    queue.close()
    assert path.is_file()
    assert (path.parent.stat().st_mode & 0o077) == 0


# --- against a reference model ------------------------------------------------------------------------------------

OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.booleans()),
        st.tuples(st.just("ack"), st.integers(0, 40)),
        st.tuples(st.just("pending"), st.integers(1, 8), st.sets(st.integers(0, 40), max_size=5)),
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["memory", "file"]), limit=st.integers(1, 6), operations=OPERATIONS)
def test_the_queues_behave_like_the_reference_model(
    kind: str, limit: int, operations: list[tuple[object, ...]]
) -> None:
    """A list of (id, droppable) with the documented policy; ack and exclude name ids by their position among the
    ids handed out so far, so that they hit real ones."""
    with tempfile.TemporaryDirectory() as directory:
        queue: MessageQueue = MemoryQueue(limit) if kind == "memory" else FileQueue(Path(directory) / "q.sqlite", limit)
        try:
            model: list[tuple[int, bool]] = []
            dropped = 0
            handed_out: list[int] = []
            for operation in operations:
                if operation[0] == "put":
                    droppable = bool(operation[1])
                    while len(model) >= limit:
                        victim = next((entry for entry in model if entry[1]), model[0])
                        model.remove(victim)
                        dropped += 1
                    message_id = queue.put(TOPIC, str(len(handed_out)).encode(), droppable=droppable)
                    assert all(message_id > i for i in handed_out)
                    handed_out.append(message_id)
                    model.append((message_id, droppable))
                elif operation[0] == "ack":
                    position = int(str(operation[1]))
                    if handed_out:
                        message_id = handed_out[position % len(handed_out)]
                        queue.ack(message_id)
                        model = [entry for entry in model if entry[0] != message_id]
                else:
                    count = int(str(operation[1]))
                    positions = operation[2]
                    assert isinstance(positions, set)
                    exclude = {handed_out[p % len(handed_out)] for p in positions} if handed_out else set()
                    expected = [entry[0] for entry in model if entry[0] not in exclude][:count]
                    assert [item.id for item in queue.pending(count, exclude=exclude)] == expected
                assert len(queue) == len(model)
                assert queue.dropped == dropped
            assert [(item.id, item.droppable) for item in queue.pending(limit)] == model
        finally:
            queue.close()
