"""The ``karn`` command: run the reference system, inspect a run directory, replay it.

    karn run [--epochs N] [--seed S] [--out DIR] [--no-live]
    karn inspect RUN_DIR
    karn replay RUN_DIR

A missing or corrupt run directory gets a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections import Counter
from pathlib import Path

EXIT_OK, EXIT_DIFFERENT, EXIT_USAGE = 0, 1, 2
CURVE_FILE = "reference_curve.json"  # written by `karn calibrate` into --out, read by `karn run`


def _run(args: argparse.Namespace) -> int:
    import karn_otel
    from karn_otel.config import KarnConfig
    from karn_otel.contracts import OperatingMode
    from karn_otel.reference.trainer import RunConfig, policy_head_sizes, run_reference

    try:
        cfg = RunConfig(
            epochs=args.epochs,
            seed=args.seed,
            controller=args.controller,
            num_threads=args.threads,
            research=args.research,
            episodes=args.episodes,
            nproc=args.nproc,
            inject_loss_spike_epoch=args.inject_loss_spike or 0,
            inject_entropy_collapse=args.inject_entropy_collapse,
            device=args.device,
        )
        curve = Path(args.out) / CURVE_FILE
        kcfg = KarnConfig(
            reference_curve=curve if curve.is_file() else None,
            out_dir=Path(args.out),
            console="plain" if args.no_live else "auto",
            strict=args.strict,
            mode=OperatingMode.RESEARCH if args.research else OperatingMode.STANDARD,
            policy_head_sizes=policy_head_sizes(cfg),
            otlp_endpoint=args.otlp_endpoint,
            otlp_protocol=args.otlp_protocol,
            prometheus_port=args.prometheus_port,
            prometheus_host=args.prometheus_host,
            service_name=args.service_name,
        )
    except ValueError as exc:
        print(f"karn run: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if cfg.nproc > 1:
        return _run_ranks(cfg, kcfg, args)
    collector = karn_otel.configure(kcfg)
    run_dir = Path(args.out) / collector.run_id
    for sink in collector.sinks:
        port = getattr(sink, "prometheus_port", None)
        if port is not None:
            print(f"metrics: http://{kcfg.prometheus_host}:{port}/metrics", flush=True)
    try:
        try:
            run_reference(cfg, checkpoint_dir=run_dir / "checkpoints")
        except KeyboardInterrupt:
            print("\nkarn run: interrupted; the run log holds everything up to now", file=sys.stderr)
            return 130
        if args.serve_after > 0 and args.prometheus_port is not None:
            print(f"training done; serving metrics for {args.serve_after:g} s more (Ctrl-C to stop)", flush=True)
            time.sleep(args.serve_after)
    except KeyboardInterrupt:
        pass
    finally:
        karn_otel.shutdown()
    stats = collector.stats()
    print(f"run dir: {run_dir}")
    print(
        f"events: {stats.accepted} accepted, {sum(stats.rejected.values())} rejected, {sum(stats.dropped.values())} dropped"
    )
    print(f"next:    {_me()} inspect {run_dir}    {_me()} replay {run_dir}")
    return EXIT_OK


def _me() -> str:
    """How this command was invoked (e.g. .venv/bin/karn), for copy-pasteable hints."""
    arg0 = sys.argv[0] if sys.argv and sys.argv[0] else "karn"
    return "karn" if arg0.endswith(".py") or arg0 == "-m" or arg0 == "-c" else arg0


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _run_ranks(cfg, kcfg, args: argparse.Namespace) -> int:
    """`karn run --nproc N`: N DDP ranks on this machine, each reporting through Karn."""
    import dataclasses

    from karn_otel.collector import new_run_id
    from karn_otel.reference.launch import run_ranks

    kcfg = dataclasses.replace(kcfg, run_id=new_run_id())
    run_dir = Path(args.out) / kcfg.run_id
    print(f"starting {cfg.nproc} ranks (DDP, gloo) for run {kcfg.run_id} ...", flush=True)
    if kcfg.prometheus_port is not None:
        last = kcfg.prometheus_port + cfg.nproc - 1
        print(
            f"metrics: http://{kcfg.prometheus_host}:{kcfg.prometheus_port}..{last}/metrics (one port per rank)",
            flush=True,
        )
    # SIGTERM (a job scheduler, a test harness) takes the same path as Ctrl-C: the launcher
    # then terminates the ranks instead of leaving them orphaned.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        result = run_ranks(cfg, kcfg, serve_after=args.serve_after)
    except KeyboardInterrupt:
        print("\nkarn run: interrupted; the ranks were stopped", file=sys.stderr)
        return 130
    if not result.ok:
        print(f"karn run: {result.describe()}", file=sys.stderr)
        print(f"run dir (incomplete): {run_dir}", file=sys.stderr)
        return 1
    print(f"run dir: {run_dir}  (rank 0 here; ranks 1..{cfg.nproc - 1} under {run_dir / 'ranks'})")
    print(f"next:    {_me()} inspect {run_dir}    {_me()} replay {run_dir}")
    return EXIT_OK


def _calibrate(args: argparse.Namespace) -> int:
    from karn_otel.reference.trainer import calibrate

    try:
        multipliers = tuple(float(m) for m in args.multipliers.split(","))
        if len(multipliers) < 2 or min(multipliers) <= 0:
            raise ValueError("need at least two positive width multipliers")
    except ValueError as exc:
        print(f"karn calibrate: error: --multipliers: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"training {len(multipliers)} seedless reference hosts for {args.epochs} epochs each ...", flush=True)
    curve = calibrate(args.epochs, args.seed, multipliers, progress=lambda m: print(m, flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curve.save(out / CURVE_FILE)
    print(f"reference curve: {out / CURVE_FILE} (karn run --out {out} uses it for equivalent traditional params)")
    return EXIT_OK


def _inspect(args: argparse.Namespace) -> int:
    from karn_otel.contracts import TelemetryEventType as ET
    from karn_otel.sinks.runlog import RunDirError, read_run

    try:
        rec = read_run(args.run_dir)
    except RunDirError as exc:
        print(f"karn inspect: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"run {rec.run_id}  ({rec.run_dir})")
    for ep_id, ctx in rec.episodes.items():
        slots = " ".join(f"{k}={v}" for k, v in ctx.slot_config.items())
        print(
            f"episode {ep_id}  started {ctx.timestamp.isoformat(timespec='seconds')}  git {ctx.git_commit[:12]}"
            f"  seed {ctx.base_seed}"
        )
        print(f"  host {ctx.host_architecture}, {ctx.host_params:,} params; slots {slots}; max epochs {ctx.max_epochs}")
        hp = ", ".join(f"{k}={v}" for k, v in ctx.hyperparameters.items())
        print(f"  hyperparameters: {hp}")
        events = [e for e in rec.events if e.episode_id == ep_id]
        hosts = [e.payload for e in events if e.event_type is ET.HOST_SNAPSHOT]
        summary = next((e.payload for e in events if e.event_type is ET.EPISODE_ENDED), None)
        if hosts:
            h = hosts[-1]
            print(
                f"  last epoch {h.epoch}: val acc {100 * h.val_accuracy:.2f}%  val loss {h.val_loss:.4f}"
                f"  train loss {h.train_loss:.4f}  params {h.total_params:,} ({h.total_params / h.host_params:.3f}x host,"
                f" {h.fossilized_params:,} fossilized)"
            )
        if summary is not None:
            host = summary.host_only_accuracy
            delta = (
                ""
                if host is None
                else f" ({100 * (summary.final_val_accuracy - host):+.2f} pts vs host-only {100 * host:.2f}%)"
            )
            print(f"  finished: {summary.epochs_completed} epochs in {summary.wall_time_s:.1f}s{delta}")
        else:
            print("  not finished (no episode_ended event: the run was interrupted or is still going)")
        counts = Counter(e.event_type.value for e in events)
        print("  events: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        stats = [e.payload for e in events if e.event_type is ET.TELEMETRY_STATS]
        if stats:
            s = stats[-1]
            rej = ", ".join(f"{k} {v}" for k, v in sorted(s.rejected.items())) or "none"
            drop = ", ".join(f"{k} {v}" for k, v in sorted(s.dropped.items())) or "none"
            print(f"  rejected: {rej}; dropped: {drop}")
        alerts = [e.payload for e in events if e.event_type is ET.HEALTH_ALERT]
        if alerts:
            print(f"  alerts: {len(alerts)} (" + ", ".join(sorted({a.check for a in alerts})) + ")")
    print(
        f"lines skipped: {len(rec.skipped)}"
        + (f" (first: line {rec.skipped[0][0]}: {rec.skipped[0][1]})" if rec.skipped else "")
    )
    return EXIT_OK


def _replay(args: argparse.Namespace) -> int:
    from karn_otel.replay import replay_run
    from karn_otel.sinks.runlog import RunDirError, read_run

    try:
        rec = read_run(args.run_dir)
    except RunDirError as exc:
        print(f"karn replay: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not rec.episodes:
        print(f"karn replay: error: {args.run_dir}: no episode context recorded", file=sys.stderr)
        return EXIT_USAGE
    if rec.skipped:
        print(
            f"note: {len(rec.skipped)} undecodable line(s) skipped (first: line {rec.skipped[0][0]}: {rec.skipped[0][1]})"
        )
    print(f"replaying {len(rec.episodes)} episode(s) of run {rec.run_id} ...", flush=True)
    try:
        report = replay_run(rec)
    except (ValueError, KeyError) as exc:
        print(f"karn replay: error: cannot rebuild the run from its context: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for note in report.notes:
        print(f"note: {note}")
    if report.identical:
        print(f"identical: {report.compared} events compared, every recorded value reproduced")
        return EXIT_OK
    print(f"DIFFERENT after {report.compared} identical events: {report.first_difference}")
    return EXIT_DIFFERENT


def _export(args: argparse.Namespace) -> int:
    from karn_otel.export import ExportError, ExportOptions, export
    from karn_otel.sinks.runlog import RunDirError

    default_out = {"parquet": "export", "openmetrics": "export.om"}
    out = Path(args.out or (Path(args.source) / default_out[args.to]))
    progress = (lambda msg: print(f"karn export: {msg}", file=sys.stderr)) if not args.quiet else (lambda _m: None)
    try:
        report = export(args.to, args.source, out, ExportOptions(progress=progress))
    except (RunDirError, ExportError) as exc:
        print(f"karn export: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"karn export: error: cannot write {out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {len(report.written)} file(s), {report.total:,} rows/samples, to {out}")
    for note in report.notes:
        print(note)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="karn", description="Karn: research telemetry for morphogenetic training", allow_abbrev=False
    )
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", allow_abbrev=False, help="train the reference morphogenetic system with Karn recording")
    r.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    r.add_argument("--seed", type=int, default=0, help="master random seed (default 0)")
    r.add_argument("--out", default="runs", help="parent directory of the run directory (default ./runs)")
    r.add_argument("--no-live", action="store_true", help="one plain line per epoch instead of the live dashboard")
    r.add_argument(
        "--controller",
        choices=["heuristic", "ppo", "none"],
        default="heuristic",
        help="seed controller: the heuristic (default), a PPO policy learning across episodes, or none (host only)",
    )
    r.add_argument("--episodes", type=int, default=1, help="episodes in the run (PPO learns across them)")
    r.add_argument("--nproc", type=int, default=1, help="data-parallel ranks on this machine (DDP; gloo on CPU)")
    r.add_argument(
        "--inject-entropy-collapse", action="store_true", help="fault injection: a (near-)deterministic PPO policy"
    )
    r.add_argument("--threads", type=int, default=1, help="torch CPU threads (recorded; replay uses the same)")
    r.add_argument("--strict", action="store_true", help="raise on an invalid telemetry event instead of counting it")
    r.add_argument("--research", action="store_true", help="research mode: dense traces on every batch")
    r.add_argument(
        "--inject-loss-spike", type=int, metavar="EPOCH", help="fault injection: shuffle the labels for one epoch"
    )
    r.add_argument("--device", default="cpu", help="torch device for the reference system (default cpu)")
    o = r.add_argument_group("OpenTelemetry export (also configurable with the standard OTEL_* variables)")
    o.add_argument(
        "--otlp-endpoint", metavar="URL", help="send traces and metrics over OTLP, e.g. http://127.0.0.1:4317"
    )
    o.add_argument("--otlp-protocol", choices=["grpc", "http/protobuf"], help="OTLP protocol (default grpc)")
    o.add_argument(
        "--prometheus-port",
        type=int,
        metavar="PORT",
        help="serve /metrics on 127.0.0.1:PORT+local_rank (0 = any free port)",
    )
    o.add_argument(
        "--prometheus-host",
        default="127.0.0.1",
        help="address /metrics binds (default 127.0.0.1; e.g. the docker bridge 172.17.0.1 for the compose stack)",
    )
    o.add_argument("--service-name", help="OTel service.name (default karn)")
    o.add_argument(
        "--serve-after", type=float, default=0.0, metavar="SECONDS", help="keep /metrics up this long after training"
    )
    r.set_defaults(func=_run)

    c = sub.add_parser(
        "calibrate", allow_abbrev=False, help="train seedless hosts of several widths: accuracy vs parameter curve"
    )
    c.add_argument("--epochs", type=int, default=20)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default="runs", help=f"directory for {CURVE_FILE} (default ./runs)")
    c.add_argument("--multipliers", default="0.5,1,1.5,2,3", help="host width multipliers (default 0.5,1,1.5,2,3)")
    c.set_defaults(func=_calibrate)

    i = sub.add_parser("inspect", allow_abbrev=False, help="summarise a run directory")
    i.add_argument("run_dir", type=Path)
    i.set_defaults(func=_inspect)

    rp = sub.add_parser(
        "replay", allow_abbrev=False, help="re-run a run from its context and compare every recorded value"
    )
    rp.add_argument("run_dir", type=Path)
    rp.set_defaults(func=_replay)

    ex = sub.add_parser(
        "export", allow_abbrev=False, help="write a run (or an experiment's runs) as Parquet or OpenMetrics"
    )
    ex.add_argument("source", type=Path, help="a run directory, or a directory of run directories")
    ex.add_argument("--to", required=True, choices=["parquet", "openmetrics"], help="output format (docs/export.md)")
    ex.add_argument(
        "--out", type=Path, help="output directory (parquet) or file (openmetrics); default SOURCE/export[.om]"
    )
    ex.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    ex.set_defaults(func=_export)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
