"""The console sink: the spec's live dashboard ("Live Dashboard Output").

On a terminal the dashboard is a ``rich.live.Live`` display: a daemon thread re-renders it
from the TelemetryStore, at most ``refresh_hz`` times a second and only when something
changed (``handle`` on the training thread only marks it dirty). While it is up, and when
the sink writes to the process's own stdout on a terminal, ``sys.stdout`` (and
``sys.stderr``, when that is a terminal too) are redirected through the display, so the
script's own prints appear above the dashboard, intact, and the dashboard is redrawn below
them; ``close()`` restores both (idempotent, also at exit). Writes that bypass
``sys.stdout`` (a logging handler created before ``init``, a child process) are not
redirected. When stdout is not a terminal (CI, a log file) it prints one plain line per
epoch, and one per alert.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from typing import Any, TextIO

from karn_otel.contracts import SeedStage, TelemetryEvent, TelemetryEventType
from karn_otel.pipeline import AnalyticsView, StoreView
from karn_otel.store import is_global_host_snapshot

ET = TelemetryEventType
WIDTH = 72  # inner width of the box (the spec draws 67; seed rows need a little more)


class ConsoleSink:
    def __init__(
        self,
        view: StoreView,
        live: bool | None = None,
        stream: TextIO | None = None,
        refresh_hz: float = 4.0,
    ) -> None:
        if view.analytics is None:
            raise ValueError("ConsoleSink needs a view with analytics (build it with karn_otel.configure)")
        self.store = view
        self.analytics: AnalyticsView = view.analytics
        self.stream = stream or sys.stdout
        self.live = _isatty(self.stream) if live is None else live
        self._period = 1.0 / refresh_hz
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._closed = False
        self._close_lock = threading.Lock()
        self._live: _LiveDisplay | None = None  # while the dashboard is up
        self._thread: threading.Thread | None = None
        if self.live:
            # Redirect only the real process stdout on a terminal (an explicit stream= is left alone),
            # and stderr only when it is a terminal too (2>file keeps going to the file).
            redirect = stream is None and _is_process_stdout(self.stream)
            self._live = _start_live(self.stream, refresh_hz, redirect, redirect and _isatty(sys.stderr))
            if self._live is not None:
                _LIVE_SINKS.add(self)
            self._thread = threading.Thread(target=self._loop, name="karn-console", daemon=True)
            self._thread.start()

    # -- sink protocol ----------------------------------------------------------------

    def handle(self, event: TelemetryEvent) -> None:
        if self.live:
            self._dirty.set()
            return
        if event.event_type is ET.HOST_SNAPSHOT:
            if is_global_host_snapshot(event):  # several ranks: one line, for the reduced snapshot
                self._write(self.plain_line() + "\n")
        elif event.event_type is ET.HEALTH_ALERT:
            a = event.payload
            self._write(f"[karn] ALERT {a.severity.value} {a.check}: {a.message}\n")
        elif event.event_type is ET.EPISODE_ENDED:
            s = event.payload
            finals = s.final_metrics
            ctx = self.store.context
            # a plain loop without a model: the parameter counts are placeholders, not zeros
            unknown_params = ctx is not None and "host_params" in ctx.unknown_fields and s.total_params == 0
            params = "params unknown" if unknown_params else f"{s.total_params:,} params"
            if s.final_val_accuracy != s.final_val_accuracy and finals:  # no accuracy (an RL task): its own headline
                shown = ", ".join(f"{k} {v:.4g}" for k, v in list(finals.items())[:6])
                self._write(f"[karn] episode done: {s.epochs_completed} epochs, {shown}, {params}\n")
            else:
                host = "n/a" if s.host_only_accuracy is None else f"{100 * s.host_only_accuracy:.1f}%"
                fossilized = "" if unknown_params else f" ({s.fossilized_params:,} fossilized)"
                self._write(
                    f"[karn] episode done: {s.epochs_completed} epochs, val acc {100 * s.final_val_accuracy:.1f}% "
                    f"(host-only removal {host}), {params}{fossilized}\n"
                )
            verdict = self.verdict_line()
            if verdict:
                self._write(verdict + "\n")

    def flush(self, timeout: float | None = None) -> None:
        if self.live and not self._closed:
            self._draw()

    def close(self) -> None:
        """Stop the refresh thread, draw the final dashboard, restore sys.stdout/sys.stderr.

        Idempotent, safe from atexit or another thread; never raises."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self._thread is not None:
            self._stop.set()
            self._dirty.set()
            if self._thread is not threading.current_thread():
                self._thread.join(timeout=2.0)
        if not self.live:
            return
        self._draw()
        live, self._live = self._live, None
        _LIVE_SINKS.discard(self)
        if live is not None:
            live.stop()

    # -- rendering --------------------------------------------------------------------

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # closed pipe: the dashboard is best-effort
            pass

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._dirty.wait(timeout=1.0):
                self._dirty.clear()
                if self._stop.is_set():
                    break
                self._draw()
                self._stop.wait(self._period)

    def _draw(self) -> None:
        """Render the store and redraw the live display (on the refresh thread, at flush and close)."""
        live = self._live
        if live is None:  # rich could not start, or closed: draw nothing rather than break the terminal
            return
        try:
            live.update("\n".join(self.render()))
        except Exception:  # noqa: BLE001  # a closed stream, a store mid-update: skip this frame
            pass

    def verdict_line(self) -> str | None:
        """The claims of the latest matrix, with the rule and level that made them.

        During the episode the live rule (alpha spending), after it the final-epoch Holm
        verdict; None when no slot has an interval to test.
        """
        claims = [c.claim for c in self.analytics.seed_contributions().values() if c.claim is not None]
        if not claims:
            return None
        first = claims[0]
        which = "final verdict" if first.rule == "final-epoch Holm" else "live claims"
        slots = self.store.slots()

        def said(c: Any) -> str:
            text = f"{c.slot_id} {'helps' if c.helps else 'no claim'}"
            s = slots.get(c.slot_id)
            if s is not None and s.stage is SeedStage.CULLED:  # measured, then culled by the controller
                text += " (then culled: not in the final model)"
            return text

        parts = ", ".join(said(c) for c in claims)
        return f"[karn] {which} ({first.rule}, {100 * first.alpha:g}% false-claim rate per run): {parts}"

    def plain_line(self) -> str:
        h = self.store.latest_host()
        if h is None:
            return "[karn] (no epoch yet)"
        a = self.analytics
        ctx = self.store.context
        total = f"/{ctx.max_epochs}" if ctx else ""
        delta = a.accuracy_delta()
        ratio = a.param_ratio()
        contributions = a.seed_contributions()
        parts = []
        for sid, s in sorted(self.store.slots().items(), key=lambda kv: _slot_order(self.store, kv[0])):
            c = contributions.get(sid)
            part = f"{sid}:{s.stage.value[:5]}" + (f"@{_alpha(s.alpha, c)}" if s.stage is SeedStage.BLENDING else "")
            if c is not None and c.contribution is not None:
                part += _pts(c.contribution)
                if c.ci_low is not None and c.ci_high is not None:
                    part += f"[{_pts(c.ci_low)},{_pts(c.ci_high)}]"
                if c.helps:  # the claim rule's verdict, never the descriptive interval alone
                    part += "(helps)"
            parts.append(part)
        seeds = " ".join(parts)
        dec = self.store.recent_decisions(1)
        action = _decided(dec[-1][1]) if dec else "-"
        ratio_s = "n/a" if ratio is None else f"{ratio:.3f}x"
        control = _control_delta(self.store.scalars())
        vs_control = "" if control is None else f", {_pts(control)} vs control (causal)"
        has_slots = bool(ctx and ctx.slot_config)
        vs = f" ({_pts(delta)} vs host-only removal{vs_control})" if has_slots or control is not None else ""
        return (
            f"[karn] epoch {h.epoch}{total}  val_acc {100 * h.val_accuracy:5.1f}%"
            f"{vs}  val_loss {h.val_loss:.4f}"
            f"  params {ratio_s}  seeds {seeds or '-'}  action {action}"
        )

    def render(self) -> list[str]:
        """The dashboard as lines of text (also used by tests)."""
        a = self.analytics
        st = self.store
        ctx = st.context
        h = st.latest_host()
        rows: list[str | None] = []  # None draws a separator
        epoch = f"Epoch {h.epoch}/{ctx.max_epochs}" if (h and ctx) else "starting"
        mode = st.mode.value.upper()
        rows.append(_lr("KARN · MORPHOGENETIC TRAINING MONITOR", f"{mode}  {epoch}"))
        rows.append(None)
        if h is None:
            rows.append("  waiting for the first epoch...")
        else:
            delta = a.accuracy_delta()
            control = _control_delta(st.scalars())
            rows.append(
                _lr(
                    f"ACCURACY        {100 * h.val_accuracy:.1f}% ({_pts(delta)} vs host-only removal, not causal)",
                    _verdict(delta is not None and delta > 0, delta is None) if control is None else "",
                )
            )
            if control is not None:  # a control twin (karn run --control): the causal comparison
                rows.append(
                    _lr(
                        f"VS CONTROL      {_pts(control)} vs the host-only twin (causal)",
                        _verdict(control > 0, False),
                    )
                )
            ratio = a.param_ratio()
            rows.append(f"PARAM RATIO     {ratio:.2f}x host params" if ratio else "PARAM RATIO     n/a")
            equiv = a.equivalent_traditional_params()
            if a.reference_curve is not None:
                rows.append(
                    f"EQUIV. TRADITIONAL {equiv:,} params ({equiv / h.total_params:.2f}x ours)"
                    if equiv
                    else f"EQUIV. TRADITIONAL unknown ({a.equivalent_traditional_note()})"
                )
            eff = a.params_efficiency_ratio()
            rows.append(
                _lr(
                    f"EFFICIENCY      {eff:.2f}x acc/param vs host-only" if eff else "EFFICIENCY      n/a",
                    _verdict(eff is not None and eff > 1.0, eff is None),
                )
            )
        rows.append(None)
        cf = st.latest_counterfactual()
        label = "Shapley, descriptive 95% CI" if cf is not None and cf.shapley_values else "removal cost"
        rows.append(f"SEEDS ({label})")
        contributions = a.seed_contributions()
        slots = st.slots()
        advanced = False  # a row shows "a->b": measured at alpha a, blending now at b
        if not slots:
            rows.append("  no slots reported yet")
        for sid in sorted(slots, key=lambda s: _slot_order(st, s)):
            s = slots[sid]
            head = f"  {sid + ':':<7}{s.stage.value:<13}"
            if s.seed_id is None:
                rows.append(head + "-")
                continue
            c = contributions.get(sid)
            contrib = "n/a"
            if c is not None and c.contribution is not None:
                contrib = _pts(c.contribution)
                if c.ci_low is not None and c.ci_high is not None:
                    contrib += f" [{100 * c.ci_low:+.1f},{100 * c.ci_high:+.1f}]"
                eff = c.efficiency
                if eff is not None:
                    # ★ right after the interval it qualifies, so a long row cannot cut it off
                    star = "★" if c.helps and eff >= 1.0 else ""
                    contrib += f"{star} eff {eff:.3g}"
            alpha = _alpha(s.alpha, c)
            advanced = advanced or "→" in alpha
            rows.append(f"{head}α={alpha} {contrib} {s.blueprint_id} {_k(s.seed_params)}")
        rule = next((c.claim for c in contributions.values() if c.claim is not None), None)
        if rule is not None:
            # Which rule made the ★, and at what level (karn_otel.claims).
            rows.append(f"  ★ = helps by {rule.rule}, {100 * rule.alpha:g}% false claims/run; eff >= 1")
        if advanced:
            rows.append("  α=a→b: the contribution was measured at a; the blend is now at b")
        rows.append(None)
        rows.append("POLICY HEALTH")
        upd = st.ppo_updates()
        if upd:
            u = upd[-1]
            ent = sum(v for v in u.entropy.values() if v == v)  # heads unused in an update are NaN
            value_word = _verdict_word(a, "value_collapse", "healthy", "COLLAPSED")
            entropy_word = _verdict_word(a, "entropy_collapse", "exploring", "COLLAPSED")
            rows.append(f"  Value variance: {u.value_variance:.3f}{value_word}   Entropy: {ent:.2f}{entropy_word}")
            clip = u.ratio_stats.fraction_clipped_high + u.ratio_stats.fraction_clipped_low
            rows.append(
                f"  KL: {u.kl_divergence:.2g}   Explained var: {u.explained_variance:.2f}   clip: {clip:.2f}"
                f"   update {u.update_index}"
            )
        else:
            dec = st.recent_decisions(1)
            who = dec[-1][1].controller if dec else "-"
            # The store holds this episode: a PPO controller's statistics (and their health
            # checks) arrive with its first update in it.
            rows.append(
                f"  controller: {who} (no PPO update yet this episode)"
                if who == "ppo"
                else f"  controller: {who} (no PPO updates)"
            )
        recent = " ".join(_decided(d) for _, d in st.recent_decisions(4))
        rows.append(f"  Recent actions: {recent or '-'}")
        rows.append(None)
        # The store holds one episode (it resets at each EpisodeContext); Karn's accounting
        # is the run's.
        alerts = st.recent_alerts(3)
        if not alerts:
            rows.append("ALERTS (this episode): None")
        else:
            n = len(st.recent_alerts())
            rows.append(f"ALERTS (this episode): {n}" + (f", the latest {len(alerts)}:" if n > len(alerts) else ""))
            for ep, al in alerts:
                rows.append(f"  e{ep} {al.severity.value.upper()} {al.check}: {al.message}")
        stats = st.stats()
        rows.append(
            f"TELEMETRY (run): {stats.accepted} events, {sum(stats.rejected.values())} rejected,"
            f" {sum(stats.dropped.values())} dropped"
        )
        return _box(rows)


# Sinks whose Live display is up: a forked child (a DataLoader worker) gets the real streams
# back, since the parent's display and its locks (possibly held at the fork) are not its own.
_LIVE_SINKS: weakref.WeakSet[ConsoleSink] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for sink in list(_LIVE_SINKS):
        live, sink._live = sink._live, None
        sink._closed = True
        if live is not None:
            live.unredirect()
    _LIVE_SINKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


def _is_process_stdout(stream: Any) -> bool:
    """The process's own stdout (fd 1), on a terminal."""
    try:
        return stream.fileno() == 1 and _isatty(stream)
    except (AttributeError, OSError, ValueError):
        return False


class _LiveDisplay:
    """A started rich Live display writing to ``stream``, and the streams it replaced.

    Refreshed by the sink's own thread only when the store changed (no auto-refresh: an
    unchanged dashboard is not redrawn); a script's print, redirected, redraws it below."""

    def __init__(self, stream: TextIO, refresh_hz: float, redirect_stdout: bool, redirect_stderr: bool) -> None:
        from rich.console import Console
        from rich.live import Live

        console = Console(file=stream, force_terminal=True, force_jupyter=False, highlight=False, markup=False)
        self.live = Live(
            console=console,
            auto_refresh=False,
            refresh_per_second=refresh_hz,
            redirect_stdout=redirect_stdout,
            redirect_stderr=redirect_stderr,
            transient=False,
        )
        self.saved = (sys.stdout, sys.stderr)
        self.proxies: tuple[Any, Any] = (None, None)
        started = False
        try:
            self.live.start()
            started = True
        finally:
            # What Live put in their place (None: not redirected), to restore only its own proxies.
            self.proxies = (
                sys.stdout if sys.stdout is not self.saved[0] else None,
                sys.stderr if sys.stderr is not self.saved[1] else None,
            )
            if not started:  # Live.start raised: put the streams back, the sink runs without it
                self.unredirect()

    def update(self, text: str) -> None:
        from rich.text import Text

        # No wrapping: a narrow terminal crops the box instead of breaking its redraw.
        self.live.update(Text(text, no_wrap=True, overflow="crop"), refresh=True)

    def stop(self) -> None:
        try:
            for proxy in self.proxies:  # a last write without its newline is printed, not lost
                if proxy is not None:
                    proxy.flush()
            self.live.stop()  # restores sys.stdout / sys.stderr in its own finally
        except Exception:  # noqa: BLE001  # a closed stream: the dashboard is best-effort
            pass
        finally:
            self.unredirect()

    def unredirect(self) -> None:
        """Put back the streams Live replaced where they are still its proxies (not a stream
        the script installed since), whatever state Live itself is in."""
        if self.proxies[0] is not None and sys.stdout is self.proxies[0]:
            sys.stdout = self.saved[0]
        if self.proxies[1] is not None and sys.stderr is self.proxies[1]:
            sys.stderr = self.saved[1]


def _start_live(stream: TextIO, refresh_hz: float, redirect_stdout: bool, redirect_stderr: bool) -> _LiveDisplay | None:
    try:
        return _LiveDisplay(stream, refresh_hz, redirect_stdout, redirect_stderr)
    except Exception:  # noqa: BLE001  # rich could not start: no live display, training goes on
        return None


def _verdict_word(a: AnalyticsView, check: str, good: str, bad: str) -> str:
    """ " (healthy)" / " (COLLAPSED)" from the health monitor's current status of ``check``."""
    report = a.training_health()
    if report is None:
        return ""
    try:
        result = report.check(check)
    except KeyError:
        return ""
    return f" ({good if result.ok else bad})"


def _slot_order(store: StoreView, slot_id: str) -> int:
    ctx = store.context
    if ctx is None or slot_id not in ctx.slot_config:
        return 1 << 30
    return list(ctx.slot_config).index(slot_id)


def _control_delta(scalars: dict[str, float]) -> float | None:
    """This epoch's accuracy minus the control twin's, when the run has one (docs/experiments.md)."""
    v = scalars.get("accuracy_delta_vs_control")
    return v if isinstance(v, float) and v == v else None


def _decided(d: Any) -> str:
    """A ControllerDecision as shown: the action, marked when it was refused (a requested
    FOSSILIZE whose gate failed did not fossilize anything)."""
    label: str = d.action.label()
    return label + " (refused)" if d.applied is False else label


def _alpha(now: float, c: Any) -> str:
    """The slot's alpha, with the one its contribution (``c``, a seed_contributions() entry)
    was measured at when that differs (a blending seed advances after its epoch's
    counterfactual matrix)."""
    at = c.measured_alpha if c is not None else None  # None without a measured contribution
    if at is None or abs(at - now) < 0.005:
        return f"{now:.2f}"
    return f"{at:.2f}→{now:.2f}"


def _pts(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def _k(n: int) -> str:
    return f"{n / 1000:.1f}Kp" if n >= 1000 else f"{n}p"


def _verdict(win: bool, unknown: bool) -> str:
    return "" if unknown else ("✓ WIN" if win else "✗ not yet")


def _lr(left: str, right: str) -> str:
    """``left`` and ``right`` on one box row; when they do not fit, ``left`` is shortened (with
    an ellipsis), never ``right`` (a verdict such as "✗ not yet" is read whole or not at all)."""
    room = WIDTH - 2 - len(right) - (1 if right else 0)
    if len(left) > room:
        left = left[: max(0, room - 1)] + "…"
    gap = WIDTH - 2 - len(left) - len(right)
    return left + " " * max(1 if right else 0, gap) + right


def _box(rows: list[str | None]) -> list[str]:
    out = ["┌" + "─" * WIDTH + "┐"]
    for r in rows:
        if r is None:
            out.append("├" + "─" * WIDTH + "┤")
        else:
            text = ("  " + r) if not r.startswith("  ") else r
            text = text[:WIDTH]
            out.append("│" + text + " " * (WIDTH - len(text)) + "│")
    out.append("└" + "─" * WIDTH + "┘")
    return out
