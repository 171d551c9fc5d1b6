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
    from karn_otel.config import KarnConfig
    from karn_otel.contracts import OperatingMode
    from karn_otel.reference.trainer import RunConfig, policy_head_sizes

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
            inject_fault_rank=args.inject_fault_rank,
            inject_slow_rank_s=args.inject_slow_rank,
            inject_entropy_collapse=args.inject_entropy_collapse,
            inject_entropy_collapse_episodes=args.inject_entropy_collapse_episodes,
            device=args.device,
            heartbeat_timeout_s=args.heartbeat_timeout,
            attribution_split=args.attribution_split,
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
            export_ranks=args.export_ranks,
        )
    except ValueError as exc:
        print(f"karn run: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    busy = _busy_port(kcfg.prometheus_host, kcfg.prometheus_port, cfg.nproc)
    if busy is not None:  # before any run dir exists: nothing to clean up
        print(
            f"karn run: error: {kcfg.prometheus_host}:{busy} is in use (another karn run?); "
            "choose another --prometheus-port, or 0 for any free port",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.seeds is not None or args.repeats is not None or args.control:
        return _run_experiment(cfg, kcfg, args)
    if cfg.nproc > 1:
        return _run_ranks(cfg, kcfg, args)
    return _train(cfg, kcfg, args)


def _busy_port(host: str, base: int | None, n: int) -> int | None:
    """The first of ``base .. base + n - 1`` that cannot be bound on ``host`` (None: all free, or no port)."""
    import socket

    if not base:  # None: no endpoint; 0: the OS picks a free port
        return None
    for port in range(base, base + n):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server binds it
            try:
                s.bind((host, port))
            except OSError:
                return port
    return None


def _train(cfg, kcfg, args: argparse.Namespace) -> int:
    """One run of the reference system with Karn recording, in this process."""
    import karn_otel
    from karn_otel.reference.trainer import run_reference

    collector = karn_otel.configure(kcfg)
    run_dir = Path(kcfg.out_dir) / collector.run_id
    for sink in collector.sinks:
        port = getattr(sink, "prometheus_port", None)
        if port is not None:
            print(f"metrics: http://{kcfg.prometheus_host}:{port}/metrics", flush=True)
    previous_sigterm = _on_sigterm_interrupt()  # SIGTERM flushes and exits like Ctrl-C
    try:
        try:
            run_reference(cfg, checkpoint_dir=run_dir / "checkpoints")
        except KeyboardInterrupt as exc:
            what = "terminated (SIGTERM)" if isinstance(exc, _Terminated) else "interrupted"
            print(f"\nkarn run: {what}; the run log holds everything up to now", file=sys.stderr)
            return 143 if isinstance(exc, _Terminated) else 130
        if args.serve_after > 0 and args.prometheus_port is not None:
            print(f"training done; serving metrics for {args.serve_after:g} s more (Ctrl-C to stop)", flush=True)
            time.sleep(args.serve_after)
    except KeyboardInterrupt:
        pass
    finally:
        _ignore_sigterm()  # the shutdown is bounded (5 s): let it finish
        karn_otel.shutdown()
        _restore_sigterm(previous_sigterm)
    stats = collector.stats()
    print(f"run dir: {run_dir}")
    print(
        f"events: {stats.accepted} accepted, {sum(stats.rejected.values())} rejected, {sum(stats.dropped.values())} dropped"
    )
    if stats.dropped:
        print("dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.dropped.items())))
    print(f"next:    {_me()} inspect {run_dir}    {_me()} replay {run_dir}")
    return EXIT_OK


def _seed_list(args: argparse.Namespace) -> list[int]:
    if args.seeds is not None:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"--seeds needs distinct integers, got {args.seeds!r}")
        return seeds
    if args.repeats is not None:
        if args.repeats < 1:
            raise ValueError("--repeats must be >= 1")
        return [args.seed + i for i in range(args.repeats)]
    return [args.seed]


def _run_experiment(cfg, kcfg, args: argparse.Namespace) -> int:
    """Several runs that belong together (seeds, control twins) under one experiment dir."""
    import dataclasses

    from karn_otel.experiment.runner import open_experiment, run_experiment

    try:
        seeds = _seed_list(args)
        if cfg.nproc > 1:
            raise ValueError("experiments run single-process ranks for now; drop --nproc (or run each seed yourself)")
        if args.control and cfg.controller == "none":
            raise ValueError("--control twins a run that grows seeds; --controller none is already host-only")
        settings = {k: v for k, v in cfg.to_hyperparameters().items() if k != "seed"}
        exp_dir, manifest, resumed = open_experiment(Path(args.out), args.experiment, seeds, args.control, settings)
    except ValueError as exc:
        print(f"karn run: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    arms = "morph + control twin" if args.control else "morph"
    print(
        f"experiment {manifest.experiment_id}: seeds {','.join(map(str, seeds))} ({arms}), "
        f"{len(manifest.runs)} runs{' — resuming' if resumed else ''}",
        flush=True,
    )

    def run_one(pr, curve: tuple[float, ...]) -> int:
        run_cfg = dataclasses.replace(
            cfg,
            seed=pr.seed,
            controller="none" if pr.arm == "control" else cfg.controller,
            experiment_id=manifest.experiment_id,
            experiment_arm=pr.arm,
            control_curve=curve,
        )
        run_kcfg = dataclasses.replace(kcfg, out_dir=exp_dir, run_id=pr.run_id)
        return _train(run_cfg, run_kcfg, args)

    try:
        rc = run_experiment(exp_dir, manifest, run_one, progress=lambda m: print(f"karn run: {m}", flush=True))
    except KeyboardInterrupt:
        print(f"\nkarn run: interrupted; run the same command with --experiment {manifest.experiment_id} to resume")
        return 130
    if rc == EXIT_OK:
        print(f"experiment dir: {exp_dir}")
        print(f"next:    {_me()} compare {exp_dir}    {_me()} report {exp_dir}")
    return rc


def _me() -> str:
    """How this command was invoked (e.g. .venv/bin/karn), for copy-pasteable hints."""
    arg0 = sys.argv[0] if sys.argv and sys.argv[0] else "karn"
    return "karn" if arg0.endswith(".py") or arg0 == "-m" or arg0 == "-c" else arg0


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


class _Terminated(KeyboardInterrupt):
    """SIGTERM, taking Ctrl-C's path (flush, close, exit status 143)."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated


def _on_sigterm_interrupt():
    try:
        return signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        return None


def _ignore_sigterm() -> None:
    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:
        pass


def _restore_sigterm(previous) -> None:
    if previous is not None:
        try:
            signal.signal(signal.SIGTERM, previous)
        except ValueError:
            pass


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
    """`karn inspect`: a run dir is untrusted input. Every string printed is escaped (no
    terminal control sequence gets through), secret-looking hyperparameters are redacted,
    and any failure is one line on stderr with exit status 2, never a traceback."""
    from karn_otel.codec import printable
    from karn_otel.sinks.runlog import RunDirError, read_run

    where = printable(str(args.run_dir))
    try:
        rec = read_run(args.run_dir)
        lines = _inspect_lines(rec)
    except RunDirError as exc:
        print(f"karn inspect: error: {printable(str(exc), 500)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 (untrusted input: one line, never a traceback)
        print(f"karn inspect: error: {where}: unreadable run directory ({_why(exc)})", file=sys.stderr)
        return EXIT_USAGE
    for line in lines:
        print(line)
    return EXIT_OK


def _why(exc: BaseException) -> str:
    from karn_otel.codec import printable, type_name

    try:
        text = str(exc)
    except Exception:  # noqa: BLE001
        text = ""
    return f"{type_name(exc)}: {printable(text, 200)}" if text else type_name(exc)


def _num(x: object, spec: str = "", scale: float = 1.0) -> str:
    """A recorded number formatted with ``spec``; anything else (a 10**5000 int, a str) shown
    safely instead of raising."""
    from karn_otel.codec import safe_repr

    try:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return safe_repr(x)
        if isinstance(x, int) and x.bit_length() > 64:
            return safe_repr(x)
        return format(x * scale if scale != 1.0 else x, spec)
    except (ValueError, OverflowError, TypeError):
        return safe_repr(x)


def _ratio(a: object, b: object) -> str:
    try:
        return f"{a / b:.3f}x"  # type: ignore[operator]
    except (ZeroDivisionError, TypeError, OverflowError, ValueError):
        return "n/a"


def _inspect_lines(rec) -> list[str]:
    from karn_otel.codec import printable as P
    from karn_otel.config import redact_hyperparameters
    from karn_otel.contracts import TelemetryEventType as ET

    out = [f"run {P(rec.run_id)}  ({P(str(rec.run_dir))})"]
    # Karn's accounting record (TelemetryStats) at each episode end holds the run's totals so
    # far: each episode is shown its own share, the difference from the episode before.
    before: tuple[Counter[str], Counter[str]] = (Counter(), Counter())
    for ep_id, ctx in rec.episodes.items():
        slots = " ".join(f"{P(k, 40)}={_num(v)}" for k, v in list(ctx.slot_config.items())[:32])
        started = P(ctx.timestamp.isoformat(timespec="seconds"))
        unknown = ctx.unknown_fields
        seed = "unknown" if "base_seed" in unknown else _num(ctx.base_seed)
        params = "params unknown" if "host_params" in unknown else f"{_num(ctx.host_params, ',')} params"
        max_epochs = "unknown" if "max_epochs" in unknown else _num(ctx.max_epochs)
        out.append(f"episode {P(ep_id)}  started {started}  git {P(ctx.git_commit[:12])}  seed {seed}")
        out.append(f"  host {P(ctx.host_architecture)}, {params}; slots {slots}; max epochs {max_epochs}")
        hp, _ = redact_hyperparameters(ctx.hyperparameters)
        shown = ", ".join(f"{P(k, 60)}={P(v, 100) if isinstance(v, str) else _num(v)}" for k, v in hp.items())
        out.append(f"  hyperparameters: {P(shown, 4000)}")
        software = ", ".join(f"{P(k, 40)} {P(v, 60)}" for k, v in list(ctx.software.items())[:16])
        out.append(f"  task {P(ctx.task_type, 40)}; software: {software or 'not recorded'}")
        if unknown:
            out.append("  not known to the script (recorded as placeholders): " + P(", ".join(map(str, unknown)), 1000))
        if ctx.experiment_id:
            out.append(f"  experiment {P(ctx.experiment_id, 80)} ({P(str(ctx.experiment_arm), 20)})")
        events = [e for e in rec.events if e.episode_id == ep_id]
        hosts = [e.payload for e in events if e.event_type is ET.HOST_SNAPSHOT]
        summary = next((e.payload for e in events if e.event_type is ET.EPISODE_ENDED), None)
        if hosts:
            h = hosts[-1]
            out.append(
                f"  last epoch {_num(h.epoch)}: val acc {_num(h.val_accuracy, '.2f', 100)}%"
                f"  val loss {_num(h.val_loss, '.4f')}  train loss {_num(h.train_loss, '.4f')}"
                f"  params {_num(h.total_params, ',')} ({_ratio(h.total_params, h.host_params)} host,"
                f" {_num(h.fossilized_params, ',')} fossilized)"
            )
        if summary is not None:
            host = summary.host_only_accuracy
            delta = ""
            if host is not None:
                diff = _num(summary.final_val_accuracy - host, "+.2f", 100)
                delta = f" ({diff} pts vs host-only removal {_num(host, '.2f', 100)}%, not causal)"
            out.append(
                f"  finished: {_num(summary.epochs_completed)} epochs in {_num(summary.wall_time_s, '.1f')}s{delta}"
            )
            finals = summary.final_metrics
            if finals:
                shown = ", ".join(f"{P(k, 60)}={_num(v)}" for k, v in list(finals.items())[:32])
                out.append(f"  final metrics: {P(shown, 2000)}")
        else:
            out.append("  not finished (no episode_ended event: the run was interrupted or is still going)")
        counts = Counter(e.event_type.value for e in events)
        out.append("  events: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        stats = [e.payload for e in events if e.event_type is ET.TELEMETRY_STATS]
        if stats:
            s = stats[-1]
            totals = (Counter(_counts(s.rejected)), Counter(_counts(s.dropped)))
            rejected, dropped = totals[0] - before[0], totals[1] - before[1]
            before = totals
            rej = ", ".join(f"{P(k, 60)} {_num(v)}" for k, v in sorted(rejected.items())) or "none"
            drop = ", ".join(f"{P(k, 60)} {_num(v)}" for k, v in sorted(dropped.items())) or "none"
            out.append(f"  rejected in this episode: {P(rej, 2000)}; dropped: {P(drop, 2000)}")
        alerts = [e.payload for e in events if e.event_type is ET.HEALTH_ALERT]
        if alerts:
            checks = ", ".join(sorted({P(a.check, 60) for a in alerts}))
            out.append(f"  alerts: {len(alerts)} ({P(checks, 2000)})")
    skipped = f"lines skipped: {len(rec.skipped)}"
    if rec.skipped:
        skipped += f" (first: line {_num(rec.skipped[0][0])}: {P(str(rec.skipped[0][1]), 300)})"
    out.append(skipped)
    for line in rec.accounting.lines() if rec.accounting is not None else ():
        out.append(P(line, 2000))  # emitted vs on disk, from the log's sequence numbers (sinks/runlog.py)
    return out


def _counts(d: object) -> dict[str, int]:
    """A recorded count mapping (untrusted input): its int values only."""
    if not isinstance(d, dict):
        return {}
    return {str(k): v for k, v in d.items() if isinstance(v, int) and not isinstance(v, bool)}


def _replay(args: argparse.Namespace) -> int:
    """`karn replay`: refuses at once (before torch is imported) a run the reference system
    did not produce; every recorded field is untrusted (one-line errors, no traceback)."""
    from karn_otel.codec import printable
    from karn_otel.replay import ReplayError, check_replayable, replay_run
    from karn_otel.sinks.runlog import RunDirError, read_run

    where = printable(str(args.run_dir))
    try:
        rec = read_run(args.run_dir)
        check_replayable(rec)
    except (RunDirError, ReplayError) as exc:
        prefix = f"{where}: " if isinstance(exc, ReplayError) else ""
        print(f"karn replay: error: {prefix}{printable(str(exc), 500)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 (untrusted input: one line, never a traceback)
        print(f"karn replay: error: {where}: unreadable run directory ({_why(exc)})", file=sys.stderr)
        return EXIT_USAGE
    if rec.skipped:
        first = f"line {rec.skipped[0][0]}: {printable(str(rec.skipped[0][1]), 300)}"
        print(f"note: {len(rec.skipped)} undecodable line(s) skipped (first: {first})")
    print(f"replaying {len(rec.episodes)} episode(s) of run {printable(rec.run_id)} ...", flush=True)
    try:
        report = replay_run(rec)
    except (ValueError, KeyError) as exc:
        print(f"karn replay: error: cannot rebuild the run from its context: {_why(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001
        print(f"karn replay: error: the replay failed ({_why(exc)})", file=sys.stderr)
        return EXIT_USAGE
    for note in report.notes:
        print(f"note: {printable(note, 1000)}")
    if report.identical:
        print(f"identical: {report.compared} events compared, every recorded value reproduced")
        return EXIT_OK
    print(f"DIFFERENT after {report.compared} identical events: {printable(str(report.first_difference), 1000)}")
    return EXIT_DIFFERENT


def _diff(args: argparse.Namespace) -> int:
    """`karn diff RUN_A RUN_B`: two runs of any script compared value by value (ids, wall-clock
    times and Karn's own accounting aside); names the first difference. Exit 0 when none,
    1 when one is found, 2 when a run dir cannot be read. Both dirs are untrusted input."""
    from karn_otel.codec import printable, to_jsonable
    from karn_otel.contracts import TelemetryEventType as ET
    from karn_otel.replay import SKIPPED_TYPES, comparable
    from karn_otel.sinks.runlog import RunDirError, read_run

    try:
        a, b = read_run(args.run_a), read_run(args.run_b)
    except RunDirError as exc:
        print(f"karn diff: error: {printable(str(exc), 500)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 (untrusted input: one line, never a traceback)
        print(f"karn diff: error: unreadable run directory ({_why(exc)})", file=sys.stderr)
        return EXIT_USAGE
    notes, first = [], None
    ctx_a, ctx_b = list(a.episodes.values()), list(b.episodes.values())
    if len(ctx_a) != len(ctx_b):
        first = f"episodes: A has {len(ctx_a)}, B has {len(ctx_b)}"
    for i, (x, y) in enumerate(zip(ctx_a, ctx_b)):
        cx, cy = to_jsonable(x), to_jsonable(y)
        for name in ("git_commit", "software"):  # what the code ran on: said, not the first difference
            if cx.get(name) != cy.get(name):
                notes.append(
                    f"{name} differs: A {printable(str(cx.get(name)), 300)}, B {printable(str(cy.get(name)), 300)}"
                )
        for name in ("episode_id", "timestamp", "git_commit", "software"):
            cx.pop(name, None)
            cy.pop(name, None)
        first = first or _first_diff(
            cx.pop("hyperparameters", {}), cy.pop("hyperparameters", {}), f"episode {i + 1} hyperparameters"
        )
        first = first or _first_diff(cx, cy, f"episode {i + 1} context")
    if first is None:
        # numbered as `karn replay` numbers them (Karn's own records left out); the contexts
        # were compared above, field by field, so a pair of episode starts is passed over here
        ea, eb = ([e for e in r.events if e.event_type not in SKIPPED_TYPES] for r in (a, b))
        for i, (x, y) in enumerate(zip(ea, eb)):
            if x.event_type is ET.EPISODE_STARTED and y.event_type is ET.EPISODE_STARTED:
                continue
            d = _first_diff(comparable(x), comparable(y), "")
            if d:
                first = f"event #{i + 1} ({x.event_type.value}, epoch {x.epoch}): {d.lstrip('.')}"
                break
        if first is None and len(ea) != len(eb):
            n = min(len(ea), len(eb))
            extra, who = (ea[n], "A") if len(ea) > n else (eb[n], "B")
            first = f"event #{n + 1}: only {who} has it ({extra.event_type.value}, epoch {extra.epoch}); A has {len(ea)} events, B {len(eb)}"
        compared = min(len(ea), len(eb))
    else:
        compared = 0
    for note in notes:
        print(f"note: {note}")
    if first is None:
        print(f"identical: {compared} events compared, every value equal")
        return EXIT_OK
    print(f"DIFFERENT: {printable(first, 1000)}")
    return EXIT_DIFFERENT


def _first_diff(a: object, b: object, path: str) -> str | None:
    """The first difference between run A and run B (the replay's walker, with A/B names)."""
    from karn_otel.replay import first_difference

    return first_difference(a, b, path, ("A", "B"))


def _export(args: argparse.Namespace) -> int:
    from karn_otel.export import ExportError, ExportOptions, export
    from karn_otel.sinks.runlog import RunDirError

    default_out = {"parquet": "export", "openmetrics": "export.om", "wandb": "export", "otlp": ""}
    out = Path(args.out or (Path(args.source) / default_out[args.to]))
    target: dict[str, object] = {}
    if args.to == "otlp":
        target = {"endpoint": args.endpoint, "protocol": args.protocol, "timeout_s": args.timeout}
    progress = (lambda msg: print(f"karn export: {msg}", file=sys.stderr)) if not args.quiet else (lambda _m: None)
    try:
        report = export(args.to, args.source, out, ExportOptions(progress=progress), **target)
    except (RunDirError, ExportError) as exc:
        print(f"karn export: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"karn export: error: cannot write {out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.to != "otlp":
        print(f"wrote {len(report.written)} file(s), {report.total:,} rows/samples, to {out}")
    for note in report.notes:
        print(note)
    return EXIT_OK


def _compare(args: argparse.Namespace) -> int:
    from karn_otel.experiment.compare import compare_runs, load_runs, render, to_json_text
    from karn_otel.sinks.runlog import RunDirError

    progress = (
        (lambda m: print(f"karn compare: {m}", file=sys.stderr))
        if len(args.dirs) > 1 or args.baseline
        else (lambda _m: None)
    )
    try:
        runs = load_runs(args.dirs, progress)
        baseline = load_runs(args.baseline, progress) if args.baseline else None
    except (RunDirError, ValueError) as exc:
        print(f"karn compare: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    res = compare_runs(runs, baseline, seed=args.bootstrap_seed, treatment=args.treatment or ())
    print(to_json_text(res) if args.json else render(res), end="" if not args.json else "\n")
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from karn_otel.experiment.report import write_report
    from karn_otel.sinks.runlog import RunDirError

    out = args.output or (args.source / "report.html")
    try:
        path = write_report(
            args.source, out, args.epoch, progress=lambda m: print(f"karn report: {m}", file=sys.stderr, flush=True)
        )
    except (RunDirError, ValueError) as exc:
        print(f"karn report: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"karn report: error: cannot write {out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"report: {path}")
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
        "--heartbeat-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="with --nproc: a rank silent this long is reported missing and the job is ended (default 60)",
    )
    r.add_argument(
        "--inject-entropy-collapse", action="store_true", help="fault injection: a (near-)deterministic PPO policy"
    )
    r.add_argument(
        "--inject-entropy-collapse-episodes",
        type=int,
        default=0,
        metavar="N",
        help="fault injection: the PPO policy collapses in the first N episodes, then recovers",
    )
    r.add_argument("--threads", type=int, default=1, help="torch CPU threads (recorded; replay uses the same)")
    r.add_argument("--strict", action="store_true", help="raise on an invalid telemetry event instead of counting it")
    r.add_argument("--research", action="store_true", help="research mode: dense traces on every batch")
    r.add_argument(
        "--attribution-split",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="hold out this fraction of the validation examples for attribution: the gates and the controller "
        "decide on the rest, so the reported contributions of kept seeds are not selection-biased "
        "(docs/counterfactual-validity.md, Selection; default 0 = off)",
    )
    r.add_argument(
        "--inject-loss-spike", type=int, metavar="EPOCH", help="fault injection: shuffle the labels for one epoch"
    )
    r.add_argument(
        "--inject-fault-rank",
        type=int,
        default=-1,
        metavar="RANK",
        help="fault injection: --inject-loss-spike and --inject-slow-rank apply to this rank only (default: every rank)",
    )
    r.add_argument(
        "--inject-slow-rank",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="fault injection: --inject-fault-rank sleeps this long every epoch (a straggler)",
    )
    r.add_argument("--device", default="cpu", help="torch device for the reference system (default cpu)")
    x = r.add_argument_group("Experiments (several runs under one experiment dir; docs/experiments.md)")
    x.add_argument("--seeds", metavar="LIST", help="run one run per seed, e.g. 0,1,2,3,4")
    x.add_argument("--repeats", type=int, metavar="N", help="run N seeds: --seed, --seed+1, ...")
    x.add_argument(
        "--control", action="store_true", help="also train each seed's host-only twin (causal baseline; ~2x cost)"
    )
    x.add_argument("--experiment", metavar="NAME", help="experiment dir name under --out; an existing one resumes")
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
        "--export-ranks",
        metavar="POLICY",
        help="which ranks export their own series: all, reduced, sampled:K or auto (default: KARN_EXPORT_RANKS "
        "or auto = all up to 64 ranks, sampled:8 beyond; docs/scaling.md)",
    )
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

    df = sub.add_parser(
        "diff", allow_abbrev=False, help="compare two runs of any script value by value; name the first difference"
    )
    df.add_argument("run_a", type=Path)
    df.add_argument("run_b", type=Path)
    df.set_defaults(func=_diff)

    ex = sub.add_parser(
        "export",
        allow_abbrev=False,
        help="write a run (or an experiment's runs) as Parquet, OpenMetrics or an offline W&B run",
    )
    ex.add_argument("source", type=Path, help="a run directory, or a directory of run directories")
    ex.add_argument(
        "--to",
        required=True,
        choices=["parquet", "openmetrics", "otlp", "wandb"],
        help="output format (docs/export.md)",
    )
    ex.add_argument("--endpoint", metavar="URL", help="otlp: the endpoint (default OTEL_EXPORTER_OTLP_ENDPOINT)")
    ex.add_argument(
        "--protocol", choices=["grpc", "http/protobuf"], help="otlp: default OTEL_EXPORTER_OTLP_PROTOCOL or grpc"
    )
    ex.add_argument("--timeout", type=float, default=10.0, metavar="S", help="otlp: seconds per request (default 10)")
    ex.add_argument(
        "--out", type=Path, help="output directory (parquet) or file (openmetrics); default SOURCE/export[.om]"
    )
    ex.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    ex.set_defaults(func=_export)

    cp = sub.add_parser(
        "compare", allow_abbrev=False, help="cross-run statistics: morph vs control (or vs --baseline runs)"
    )
    cp.add_argument("dirs", type=Path, nargs="+", help="experiment or run directories")
    cp.add_argument("--baseline", type=Path, nargs="+", help="compare against these runs instead of the control twins")
    cp.add_argument(
        "--treatment",
        action="append",
        metavar="KEY",
        help="a hyperparameter the two arms are meant to differ in (repeatable); paired runs differing in any "
        "other (beyond the arm itself) are not called causal",
    )
    cp.add_argument("--json", action="store_true", help="machine-readable output")
    cp.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap resampling (default 0)")
    cp.set_defaults(func=_compare)

    rr = sub.add_parser("report", allow_abbrev=False, help="one self-contained HTML report of a run or an experiment")
    rr.add_argument("source", type=Path, help="a run directory or an experiment directory")
    rr.add_argument("-o", "--output", type=Path, help="the HTML file to write (default SOURCE/report.html)")
    rr.add_argument("--epoch", type=int, help="epoch of the counterfactual-matrix heatmap (default: the last)")
    rr.set_defaults(func=_report)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
