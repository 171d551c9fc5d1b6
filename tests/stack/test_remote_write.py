"""Every epoch reaches Prometheus through remote write, as the Collector's path delivers it.

A real Prometheus (the Debian 2.42 binary) with ``--web.enable-remote-write-receiver`` is fed by
``opentelemetry-exporter-prometheus-remote-write`` (the OTel project's own exporter, standing in
for the Collector's ``prometheusremotewrite`` exporter, which cannot run here) through Karn's
OTel sink and its per-epoch metric reader. The exporter is given Karn's Prometheus names (what
the Collector produces with collector-config/otel-collector.yaml, checked in test_static.py).
After a 20-epoch run Prometheus holds every epoch, each value the run log's.
"""

from __future__ import annotations

import dataclasses

import pytest
from opentelemetry.exporter.prometheus_remote_write import PrometheusRemoteWriteMetricsExporter

import karn_otel
from karn_otel.config import KarnConfig
from karn_otel.contracts import TelemetryEventType as ET
from karn_otel.metrics_registry import by_name
from karn_otel.reference.trainer import RunConfig, run_reference
from karn_otel.sinks.otel import OTelSink
from karn_otel.sinks.runlog import read_run
from tests.stack.conftest import Prometheus, wait_until

pytestmark = pytest.mark.stack

EPOCHS = 20


class KarnNamedRemoteWrite(PrometheusRemoteWriteMetricsExporter):
    """The OTel remote-write exporter with Karn's Prometheus names (the Collector's naming)."""

    def _parse_metric(self, metric, resource_labels):
        named = dataclasses.replace(metric, name=by_name(metric.name).prometheus_name, unit="")
        return super()._parse_metric(named, resource_labels)


def test_every_epoch_reaches_prometheus_through_remote_write(start_prometheus, tmp_path):
    prom: Prometheus = start_prometheus(
        {"global": {"scrape_interval": "15s", "evaluation_interval": "15s"}},
        "--web.enable-remote-write-receiver",
    )
    # A long export interval: the points of every epoch come from the epoch boundaries, not a timer.
    c = karn_otel.configure(KarnConfig(out_dir=tmp_path, console="off", otel_export_interval_s=60.0))
    sink = OTelSink(c.config, c.view, metric_exporters=[KarnNamedRemoteWrite(f"{prom.url}/api/v1/write", timeout=5)])
    c.add_sink(sink)
    try:
        run_reference(RunConfig(epochs=EPOCHS))
    finally:
        karn_otel.shutdown()
    hosts = [e for e in read_run(tmp_path / c.run_id).events if e.event_type is ET.HOST_SNAPSHOT]
    assert len(hosts) == EPOCHS
    sel = f'run_id="{c.run_id}", rank="0"'
    count = wait_until(
        lambda: prom.query(f"count_over_time(karn_host_val_accuracy{{{sel}}}[1h])"), 20, "remote-written samples"
    )
    assert [float(r["value"][1]) for r in count] == [EPOCHS], "one sample per epoch, every epoch"

    def samples(name: str) -> list[tuple[float, float]]:
        [series] = prom.query(f"{name}{{{sel}}}[1h]")
        return [(float(t), float(v)) for t, v in series["values"]]

    acc = samples("karn_host_val_accuracy")
    assert [v for _, v in acc] == [h.payload.val_accuracy for h in hosts], "the run log's values, epoch by epoch"
    assert [v for _, v in samples("karn_host_epoch")] == list(range(1, EPOCHS + 1))
    assert [v for _, v in samples("karn_host_train_loss")] == [h.payload.train_loss for h in hosts]
    # Each sample is stamped at its epoch's end (within the 1 ms resolution and the reader's wake-up).
    for (t, _), h in zip(acc, hosts):
        assert h.timestamp - 0.01 <= t <= h.timestamp + 1.0, (t, h.timestamp)
    # Karn's own counters arrive too (periodically and at shutdown), from 0.
    assert prom.query(f'karn_health_alerts_total{{{sel}, check="loss_spike"}}[1h]')
