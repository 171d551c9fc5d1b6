"""Karn's configuration: KarnConfig, CounterfactualConfig, DenseTraceTrigger.

Invalid configuration raises ``ValueError`` at construction (bad values at emit time are
rejected and counted by the collector instead). Imports neither torch nor opentelemetry.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from karn_otel.codec import id_problem
from karn_otel.contracts import OperatingMode

SECRET_PATTERNS: tuple[str, ...] = ("token", "secret", "password", "api_key", "key", "credential")
"""Hyperparameter names that look like secrets (KarnConfig.secret_patterns; see is_secret_name)."""
REDACTED = "[redacted]"

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SEP = re.compile(r"[^a-z0-9]+")


def _words(name: str) -> list[str]:
    return [w for w in _SEP.split(_CAMEL.sub("_", name).lower()) if w]


def is_secret_name(name: str, patterns: tuple[str, ...] = SECRET_PATTERNS) -> bool:
    """Whether a hyperparameter name matches a secret pattern.

    Names and patterns are split into words (``_``, ``-``, ``.``, spaces, camelCase): a
    one-word pattern matches a word equal to it or to its plural, or, for patterns of five
    letters or more, a word ending with it (``hftoken``, ``dbpassword``); a several-word pattern
    (``api_key``) matches those words in a row or written as one (``apikey``). So ``api_key``,
    ``WANDB_API_KEY``, ``apiKey``, ``hf_token``, ``db_password``, ``aws_credentials`` and
    ``key`` match (and, by the plural rule, ``max_tokens``); ``monkey``, ``keep_last``, ``tokenizer`` and ``batch_size`` do not.
    """
    words = _words(name)
    compact = "".join(words)
    for pattern in patterns:
        pw = _words(pattern)
        if not pw:
            continue
        if len(pw) == 1:
            p = pw[0]
            if any(w == p or w == p + "s" or (len(p) >= 5 and w.endswith(p)) for w in words):
                return True
        else:
            n = len(pw)
            if any(words[i : i + n] == pw for i in range(len(words) - n + 1)) or "".join(pw) in compact:
                return True
    return False


V = TypeVar("V")


def redact_hyperparameters(
    hp: Mapping[str, V], patterns: tuple[str, ...] = SECRET_PATTERNS
) -> tuple[dict[str, V | str], int]:
    """``hp`` with the value of every secret-looking name replaced by ``"[redacted]"``, and
    how many were. Non-string keys are left alone (the validator rejects them)."""
    out: dict[str, V | str] = {}
    n = 0
    for k, v in hp.items():
        if isinstance(k, str) and is_secret_name(k, patterns) and v != REDACTED:
            out[k] = REDACTED
            n += 1
        else:
            out[k] = v
    return out, n


Strategy = Literal["auto", "full_factorial", "shapley", "ablation_only"]
_STRATEGIES = ("auto", "full_factorial", "shapley", "ablation_only")


@dataclass(frozen=True)
class CounterfactualConfig:
    """User-configurable counterfactual strategy (spec "Counterfactual Capture")."""

    strategy: Strategy = "auto"
    # Auto threshold: full factorial up to this many active seeds, Shapley sampling above.
    # 5, not the spec's 4: with shapley_samples=20 the memoised sampler already evaluates
    # about 30 of the 32 configurations at n=5 (benchmarks/bench_shapley_sampling.py and the
    # cost model in counterfactual.py), so exact enumeration costs ~7% more and is exact.
    full_factorial_max_seeds: int = 5
    shapley_samples: int = 20  # permutations (antithetic pairs count as two)
    force_full_factorial: bool = False
    max_configurations: int | None = None  # hard cap on distinct evaluations; None = unlimited
    timeout_seconds: float | None = None  # abort (and mark the result partial) past this
    confidence: float = 0.95
    bootstrap_samples: int = 200  # resamples of validation examples for validation-set noise
    seed: int = 0  # RNG seed for permutation sampling and the bootstrap

    def __post_init__(self) -> None:
        if self.strategy not in _STRATEGIES:
            raise ValueError(f"strategy must be one of {_STRATEGIES}, got {self.strategy!r}")
        if self.full_factorial_max_seeds < 0:
            raise ValueError("full_factorial_max_seeds must be >= 0")
        if self.shapley_samples < 2:
            raise ValueError("shapley_samples must be >= 2 (one antithetic pair)")
        if self.max_configurations is not None and self.max_configurations < 1:
            raise ValueError("max_configurations must be >= 1 or None")
        if self.timeout_seconds is not None and not self.timeout_seconds > 0:
            raise ValueError("timeout_seconds must be > 0 or None")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError("confidence must be in (0, 1)")
        if self.bootstrap_samples < 0:
            raise ValueError("bootstrap_samples must be >= 0")

    def effective_strategy(self, n_active_seeds: int) -> str:
        """Determine strategy based on config and seed count (verbatim from the spec)."""
        if self.force_full_factorial:
            return "full_factorial"
        if self.strategy != "auto":
            return self.strategy
        if n_active_seeds <= self.full_factorial_max_seeds:
            return "full_factorial"
        return "shapley"


@dataclass(frozen=True)
class DenseTraceTrigger:
    """When to open a dense-trace window (spec "Tier 3: Dense Traces")."""

    stage_transition: bool = True
    loss_spike_threshold: float = 2.0  # loss > 2x rolling average
    accuracy_drop_threshold: float = 5.0  # percentage points, epoch over epoch
    gradient_explosion: float = 100.0  # grad norm > 100x typical
    gate_failure: bool = True
    value_collapse: bool = True
    entropy_collapse: bool = True
    force_dense: bool = False  # research mode toggle

    def __post_init__(self) -> None:
        if self.loss_spike_threshold <= 1.0:
            raise ValueError("loss_spike_threshold must be > 1 (a multiple of the rolling average)")
        if self.accuracy_drop_threshold <= 0:
            raise ValueError("accuracy_drop_threshold must be > 0 percentage points")
        if self.gradient_explosion <= 1.0:
            raise ValueError("gradient_explosion must be > 1 (a multiple of the typical norm)")


@dataclass(frozen=True)
class KarnConfig:
    """Everything `configure()` needs.

    ``out_dir=None`` disables the run log; ``console`` is "auto" (live dashboard on a
    terminal, one line per epoch otherwise), "live", "plain" or "off".
    """

    run_id: str | None = None  # None: generated (UTC time + random suffix)
    out_dir: Path | None = Path("runs")
    console: Literal["auto", "live", "plain", "off"] = "auto"
    strict: bool = False  # raise on invalid events instead of rejecting and counting
    mode: OperatingMode = OperatingMode.STANDARD
    max_dense_traces: int = 10  # ring size of dense traces kept in memory
    max_epoch_snapshots: int = 10_000  # tier-2 history kept in memory (the run log keeps all)
    max_recent_events: int = 256  # decisions, alerts, transitions kept for the console
    runlog_queue_size: int = 100_000  # events buffered for the writer thread before drops
    # The write-ahead run log (docs/reliability.md): at most the events of one flush interval
    # are lost on SIGKILL; "block" waits up to runlog_block_timeout_s for room before dropping.
    runlog_flush_interval_s: float = 0.1
    runlog_backpressure: Literal["drop", "block"] = "drop"
    runlog_block_timeout_s: float = 0.1
    shutdown_timeout_s: float = 5.0  # shutdown() returns within this, whatever the disk or network does
    console_refresh_hz: float = 4.0
    rank: int | None = None  # None: discovered from the environment
    world_size: int | None = None
    counterfactual: CounterfactualConfig = field(default_factory=CounterfactualConfig)
    dense_trigger: DenseTraceTrigger = field(default_factory=DenseTraceTrigger)
    # Sizes of the policy's action heads (e.g. {"op": 4, "slot": 3}); lets entropy-collapse
    # checks use a fraction of each head's maximum entropy log(n) instead of a fixed floor.
    policy_head_sizes: dict[str, int] | None = None
    # `karn calibrate` output: host-only accuracy vs parameters, for equivalent_traditional_params.
    reference_curve: Path | None = None
    # OpenTelemetry export (sinks/otel/). OTLP is on when an endpoint is given here or in
    # OTEL_EXPORTER_OTLP_ENDPOINT; the embedded Prometheus endpoint when prometheus_port is set.
    service_name: str | None = None  # None: OTEL_SERVICE_NAME, else "karn"
    otlp_endpoint: str | None = None
    otlp_protocol: Literal["grpc", "http/protobuf"] | None = None  # None: OTEL_EXPORTER_OTLP_PROTOCOL, else grpc
    prometheus_port: int | None = None  # base port; each rank listens on base + local_rank
    prometheus_host: str = "127.0.0.1"
    # After shutdown the embedded endpoint waits for one more scrape, at most this long
    # (None: KARN_PROMETHEUS_FINAL_SCRAPE_S, else two 15 s scrape intervals; 0: stop at once).
    prometheus_final_scrape_s: float | None = None
    # Which ranks export their own series (docs/scaling.md): "all", "reduced", "sampled:K",
    # or "auto" (all up to 64 ranks, sampled:8 beyond); None: KARN_EXPORT_RANKS, else auto.
    export_ranks: str | None = None
    otel_export_interval_s: float = 5.0
    otel_shutdown_timeout_s: float = 5.0
    # Safety (docs/security.md). Hyperparameters whose names match one of these patterns
    # are redacted at the door, before any sink sees them (() turns redaction off).
    secret_patterns: tuple[str, ...] = SECRET_PATTERNS
    # Permissions of what Karn creates in the run directory (the run log, checkpoints).
    file_mode: int = 0o600
    dir_mode: int = 0o700

    def __post_init__(self) -> None:
        if self.run_id is not None:
            problem = id_problem(self.run_id)
            if problem is not None:
                raise ValueError(f"run_id: {problem.detail}")
        if isinstance(self.secret_patterns, str) or not all(isinstance(p, str) for p in self.secret_patterns):
            raise ValueError("secret_patterns must be a tuple of strings")
        object.__setattr__(self, "secret_patterns", tuple(self.secret_patterns))
        for name in ("file_mode", "dir_mode"):
            mode = getattr(self, name)
            if type(mode) is not int or not 0 <= mode <= 0o777:
                raise ValueError(f"{name} must be a permission mode such as 0o600, got {mode!r}")
        try:  # accept "research" as well as OperatingMode.RESEARCH
            object.__setattr__(self, "mode", OperatingMode(self.mode))
        except ValueError:
            raise ValueError(f"mode must be 'standard' or 'research', got {self.mode!r}") from None
        if self.console not in ("auto", "live", "plain", "off"):
            raise ValueError(f"console must be auto/live/plain/off, got {self.console!r}")
        for name in ("max_dense_traces", "max_epoch_snapshots", "max_recent_events", "runlog_queue_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.console_refresh_hz > 0:
            raise ValueError("console_refresh_hz must be > 0")
        for name in ("runlog_flush_interval_s", "runlog_block_timeout_s", "shutdown_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.runlog_backpressure not in ("drop", "block"):
            raise ValueError(f"runlog_backpressure must be 'drop' or 'block', got {self.runlog_backpressure!r}")
        if self.otlp_protocol not in (None, "grpc", "http/protobuf"):
            raise ValueError(f"otlp_protocol must be grpc or http/protobuf, got {self.otlp_protocol!r}")
        if self.prometheus_port is not None and not 0 <= self.prometheus_port <= 65535:
            raise ValueError(f"prometheus_port {self.prometheus_port} is not a TCP port")
        if not self.otel_export_interval_s > 0 or not self.otel_shutdown_timeout_s > 0:
            raise ValueError("otel_export_interval_s and otel_shutdown_timeout_s must be > 0")
        if self.export_ranks is not None:
            from karn_otel.distributed.export_policy import RankExportPolicy

            RankExportPolicy.parse(self.export_ranks, 1)  # raises ValueError naming the accepted forms
        if self.rank is not None and self.rank < 0:
            raise ValueError("rank must be >= 0")
        if self.world_size is not None and self.world_size < 1:
            raise ValueError("world_size must be >= 1")
        if self.rank is not None and self.world_size is not None and self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} out of range for world_size {self.world_size}")
