"""`karn export --to otlp` into the decoding loopback receiver: every span and metric point of
a recorded run arrives, with the ids the live run sent, twice identically; a dead endpoint is
a one-line error and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from karn_otel import collector as kc
from karn_otel.config import KarnConfig
from karn_otel.contracts import HostSnapshot
from karn_otel.export import run_dirs_in
from karn_otel.reference.trainer import RunConfig, run_reference
from karn_otel.sinks.runlog import read_run
from tests.otlp_receiver import OTLPReceiver
from tests.stack.conftest import free_port


def karn(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "karn_otel.cli", *args], capture_output=True, text=True, timeout=120, env=env
    )


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    """A run recorded with the run log *and* sent live over OTLP: the ids to compare with."""
    out = tmp_path_factory.mktemp("live")
    with OTLPReceiver("grpc") as rx:
        kc.configure(
            KarnConfig(
                out_dir=out, console="off", otlp_endpoint=rx.endpoint, otel_export_interval_s=0.2, run_id="live-otlp"
            )
        )
        try:
            run_reference(RunConfig(epochs=3, seed=1), checkpoint_dir=None)
        finally:
            kc.shutdown()
        live = rx.wait_for(lambda: [s for s in rx.spans() if s.name == "karn.episode"] and rx.spans(), timeout=10)
    return out / "live-otlp", live


def _ids(spans):
    return sorted((s.trace_id, s.span_id, s.parent_span_id, s.name, s.start_ns, s.end_ns) for s in spans)


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_replay_sends_the_live_ids_and_every_epoch(live_run, protocol):
    run_dir, live_spans = live_run
    with OTLPReceiver(protocol) as rx:
        p = karn("export", str(run_dir), "--to", "otlp", "--endpoint", rx.endpoint, "--protocol", protocol)
        assert p.returncode == 0, p.stderr
        assert "sent" in p.stdout and "spans" in p.stdout
        first = rx.wait_for(lambda: rx.spans(), timeout=10)
        assert _ids(first) == _ids(live_spans)  # the same trace and span ids, times and parents
        assert {s.status for s in first} == {s.status for s in live_spans}
        points = [m for m in rx.metric_points() if m.name == "karn.host.val_accuracy"]
        snaps = [(e.timestamp, e.payload) for e in read_run(run_dir).events if isinstance(e.payload, HostSnapshot)]
        assert [(pt.time_ns, pt.value) for pt in sorted(points, key=lambda q: q.time_ns)] == [
            (int(t * 1e9), s.val_accuracy) for t, s in snaps
        ]  # every epoch, at its record's time
        assert all(pt.attributes["rank"] == "0" and pt.attributes["run_id"] == "live-otlp" for pt in points)
        # sending twice: identical ids (idempotent in Tempo)
        n = len(rx.spans())
        assert (
            karn("export", str(run_dir), "--to", "otlp", "--endpoint", rx.endpoint, "--protocol", protocol).returncode
            == 0
        )
        again = rx.wait_for(lambda: rx.spans()[n:] if len(rx.spans()) >= 2 * n else None, timeout=10)
        assert _ids(again) == _ids(first)


def test_a_dead_endpoint_is_one_line_and_exit_2(live_run):
    run_dir, _ = live_run
    p = karn("export", str(run_dir), "--to", "otlp", "--endpoint", f"http://127.0.0.1:{free_port()}", "--timeout", "1")
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("karn export: error:") and "did not accept" in p.stderr


def test_no_endpoint_is_a_clear_error(live_run):
    run_dir, _ = live_run
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_EXPORTER_OTLP")}
    p = karn("export", str(run_dir), "--to", "otlp", env=env)
    assert p.returncode == 2 and "no OTLP endpoint" in p.stderr
    assert run_dirs_in(run_dir) == [run_dir]
