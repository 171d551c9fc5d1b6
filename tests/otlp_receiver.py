"""A loopback OTLP receiver for tests: what the exporters really send, decoded.

``OTLPReceiver("grpc")`` serves the OTLP gRPC TraceService and MetricsService (grpcio with
the opentelemetry-proto stubs); ``OTLPReceiver("http/protobuf")`` serves POST /v1/traces and
/v1/metrics (http.server, protobuf bodies). Both bind 127.0.0.1 on an ephemeral port and keep
every decoded request. The helpers flatten requests into plain spans and metric points so
tests can assert on names, ids, attributes, units and labels.

    with OTLPReceiver("grpc") as rx:
        ... export to rx.endpoint ...
        rx.wait_for(lambda: rx.spans(), timeout=5)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


def any_value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return attributes(v.kvlist_value.values)
    return getattr(v, kind)


def attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: list[tuple[str, int, dict[str, Any]]]
    resource: dict[str, Any]
    status: str = "UNSET"  # UNSET | OK | ERROR
    status_message: str = ""


@dataclass
class MetricPoint:
    name: str
    unit: str
    description: str
    kind: str  # gauge | sum | histogram | ...
    attributes: dict[str, Any]
    value: Any
    resource: dict[str, Any] = field(default_factory=dict)
    time_ns: int = 0  # the point's time_unix_nano
    exemplars: list[tuple[str, str, float]] = field(default_factory=list)  # (trace id, span id, value), hex


class OTLPReceiver:
    """Collects ExportTraceServiceRequest / ExportMetricsServiceRequest messages on loopback."""

    def __init__(self, protocol: str = "grpc") -> None:
        if protocol not in ("grpc", "http/protobuf"):
            raise ValueError(f"unknown protocol {protocol!r}")
        self.protocol = protocol
        self.trace_requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metric_requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.headers: list[dict[str, str]] = []  # request headers / gRPC metadata, lower-case keys
        self._lock = threading.Lock()
        self._grpc: grpc.Server | None = None
        self._http: ThreadingHTTPServer | None = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> OTLPReceiver:
        if self.protocol == "grpc":
            self._start_grpc()
        else:
            self._start_http()
        return self

    def stop(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace=None)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    def __enter__(self) -> OTLPReceiver:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """The base URL to configure (gRPC: host:port with scheme; HTTP: without the /v1/... path)."""
        return f"http://127.0.0.1:{self.port}"

    def _start_grpc(self) -> None:
        rx = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 (the generated name)
                rx._record(rx.trace_requests, request, dict(context.invocation_metadata()))
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request, context):  # noqa: N802
                rx._record(rx.metric_requests, request, dict(context.invocation_metadata()))
                return metrics_service_pb2.ExportMetricsServiceResponse()

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._grpc = server

    def _start_http(self) -> None:
        rx = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path == "/v1/traces":
                    req: Any = trace_service_pb2.ExportTraceServiceRequest()
                    target, resp = rx.trace_requests, trace_service_pb2.ExportTraceServiceResponse()
                elif self.path == "/v1/metrics":
                    req = metrics_service_pb2.ExportMetricsServiceRequest()
                    target, resp = rx.metric_requests, metrics_service_pb2.ExportMetricsServiceResponse()
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                req.ParseFromString(body)
                rx._record(target, req, {k.lower(): v for k, v in self.headers.items()})
                payload = resp.SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._http = server

    def _record(self, target: list, request: Any, headers: dict[str, str]) -> None:
        with self._lock:
            target.append(request)
            self.headers.append(headers)

    # ------------------------------------------------------------------ decoded views

    def spans(self) -> list[Span]:
        out = []
        with self._lock:
            requests = list(self.trace_requests)
        for req in requests:
            for rs in req.resource_spans:
                res = attributes(rs.resource.attributes)
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        out.append(
                            Span(
                                trace_id=s.trace_id.hex(),
                                span_id=s.span_id.hex(),
                                parent_span_id=s.parent_span_id.hex(),
                                name=s.name,
                                start_ns=s.start_time_unix_nano,
                                end_ns=s.end_time_unix_nano,
                                attributes=attributes(s.attributes),
                                events=[(e.name, e.time_unix_nano, attributes(e.attributes)) for e in s.events],
                                resource=res,
                                status=("UNSET", "OK", "ERROR")[s.status.code],
                                status_message=s.status.message,
                            )
                        )
        return out

    def metric_points(self) -> list[MetricPoint]:
        out = []
        with self._lock:
            requests = list(self.metric_requests)
        for req in requests:
            for rm in req.resource_metrics:
                res = attributes(rm.resource.attributes)
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        kind = m.WhichOneof("data")
                        for p in getattr(m, kind).data_points:
                            if kind == "histogram":
                                value: Any = (p.count, p.sum)
                            else:
                                value = p.as_double if p.WhichOneof("value") == "as_double" else p.as_int
                            exemplars = [
                                (
                                    e.trace_id.hex(),
                                    e.span_id.hex(),
                                    e.as_double if e.WhichOneof("value") == "as_double" else e.as_int,
                                )
                                for e in p.exemplars
                            ]
                            out.append(
                                MetricPoint(
                                    m.name,
                                    m.unit,
                                    m.description,
                                    kind,
                                    attributes(p.attributes),
                                    value,
                                    res,
                                    p.time_unix_nano,
                                    exemplars,
                                )
                            )
        return out

    def resources(self) -> list[dict[str, Any]]:
        with self._lock:
            reqs: list[Any] = list(self.trace_requests) + list(self.metric_requests)
        out = []
        for req in reqs:
            groups = getattr(req, "resource_spans", None) or getattr(req, "resource_metrics", None) or []
            out.extend(attributes(g.resource.attributes) for g in groups)
        return out

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Poll until predicate() is truthy; return its value (or the last falsy one at timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value or time.monotonic() > deadline:
                return value
            time.sleep(0.02)


def main() -> None:
    """``python -m tests.otlp_receiver [grpc|http/protobuf]``: serve until stdin closes.

    Prints ``port <n>`` once listening and ``spans <n> metric_points <m>`` at the end, so a
    benchmark can keep the receiver's CPU out of the measured process.
    """
    import sys

    protocol = sys.argv[1] if len(sys.argv) > 1 else "grpc"
    with OTLPReceiver(protocol) as rx:
        print(f"port {rx.port}", flush=True)
        sys.stdin.read()
        print(f"spans {len(rx.spans())} metric_points {len(rx.metric_points())}", flush=True)


__all__ = ["OTLPReceiver", "Span", "MetricPoint", "attributes"]

if __name__ == "__main__":
    main()
