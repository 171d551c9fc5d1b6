"""Store: bounded by configuration, not by run length."""

from __future__ import annotations

from karn_otel import collector as kc
from karn_otel.config import KarnConfig
from karn_otel.contracts import DenseTrace
from tests.conftest import make_context
from tests.test_collector import host


def dense(i: int) -> DenseTrace:
    return DenseTrace(f"reason{i}", i, i, (), {}, {}, {}, {}, {})


def test_rings_are_bounded():
    c = kc.KarnCollector(
        KarnConfig(out_dir=None, console="off", strict=True, max_dense_traces=3, max_epoch_snapshots=5)
    )
    c.emit(make_context())
    for e in range(1, 50):
        c.emit(host(epoch=e))
        c.emit(dense(e))
    s = c.store
    assert [h.epoch for h in s.host_history()] == [45, 46, 47, 48, 49]
    assert [d.trigger_reason for d in s.dense_trace_list()] == ["reason47", "reason48", "reason49"]
    assert s.latest_host().epoch == 49
    assert s.counts()["host_snapshot"] == 49


def test_new_episode_starts_clean():
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off", strict=True))
    c.emit(make_context())
    c.emit(host(epoch=3))
    c.emit(make_context(episode_id="ep-2"))
    assert c.store.latest_host() is None
    assert c.store.context.episode_id == "ep-2"


def test_readers_see_whole_steps_of_the_lock_free_scalars_path():
    """The per-step path updates the store without its lock: a reader must still never see
    half a step (every name of one step carries that step's value here)."""
    import threading

    from karn_otel import collector as kc
    from karn_otel.config import KarnConfig
    from karn_otel.contracts import Scalars
    from tests.conftest import make_context

    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off", strict=True))
    c.emit(make_context())
    names = [f"m{i}" for i in range(20)]
    stop = threading.Event()
    torn: list[dict[str, float]] = []

    def read() -> None:
        while not stop.is_set():
            snap = c.view.scalars()
            if snap and len(set(snap.values())) != 1:
                torn.append(snap)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for step in range(20_000):
            c.emit(Scalars(step, dict.fromkeys(names, float(step))))
    finally:
        stop.set()
        reader.join()
    assert not torn, torn[:1]
    assert c.view.scalars() == dict.fromkeys(names, 19_999.0)
    assert c.store.counts()["scalars"] == 20_000
