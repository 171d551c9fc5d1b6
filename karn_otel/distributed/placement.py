"""Where a rank runs: resource attributes from the scheduler's and launcher's environments.

Read once per process from environment variables (no network, no API server, no torch):

* **SLURM** (``SLURM_JOB_ID`` set): ``slurm.job.id``, ``slurm.job.name``, ``slurm.job.node_list``,
  ``slurm.job.num_nodes``, ``slurm.task.id`` (``SLURM_PROCID``), ``slurm.task.local_id``
  (``SLURM_LOCALID``), ``slurm.node.id`` (``SLURM_NODEID``), ``slurm.partition``,
  ``slurm.array.job_id`` / ``slurm.array.task_id`` when an array job;
* **Kubernetes** (``KUBERNETES_SERVICE_HOST`` set): the OpenTelemetry semantic conventions'
  ``k8s.pod.name`` (``POD_NAME``, else ``HOSTNAME``), ``k8s.namespace.name`` (``POD_NAMESPACE``,
  else the service account's namespace file), ``k8s.node.name`` (``NODE_NAME``), ``k8s.pod.uid``
  (``POD_UID``), ``k8s.job.name`` (``JOB_NAME``) — the downward API variables a pod spec sets
  (docs/metrics.md shows the snippet);
* **torchrun / torchelastic** (``TORCHELASTIC_RUN_ID`` or ``LOCAL_WORLD_SIZE`` set):
  ``karn.dl.local_rank``, ``karn.dl.node_rank`` (``GROUP_RANK``), ``karn.dl.local_world_size``,
  ``karn.dl.restart_count`` (``TORCHELASTIC_RESTART_COUNT``), ``karn.dl.elastic_run_id``;
* **the parallel layout**, when the user states it (:class:`ParallelLayout`, or
  ``KARN_DP_RANK``/``KARN_DP_SIZE``, ``KARN_TP_*``, ``KARN_PP_*``): ``karn.dl.dp.rank`` /
  ``.size``, ``karn.dl.tp.*``, ``karn.dl.pp.*``.

Karn's own attributes live under ``karn.dl.`` (NVIDIA's NeMo Lens, the closest peer, puts rank
and world size under ``nv.dl.``; Karn already exports ``rank`` and ``world_size`` on every
series and keeps one vendor-neutral prefix for the rest). SLURM has no OpenTelemetry semantic
convention; ``slurm.*`` follows the variable names, as NeMo Lens does. Values are strings
except counts and ranks (ints); an attribute whose variable is unset or malformed is left out.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ParallelLayout", "detect", "kubernetes", "layout_from_env", "slurm", "torchrun"]

Attributes = dict[str, str | int]

_K8S_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _int(v: str | None) -> int | None:
    try:
        return int(v) if v is not None and v.strip() else None
    except ValueError:
        return None


def _put(out: Attributes, key: str, value: str | int | None) -> None:
    if value is None or value == "":
        return
    out[key] = value if isinstance(value, int) else str(value)[:256]  # bounded: attributes are not logs


def slurm(env: Mapping[str, str]) -> Attributes:
    out: Attributes = {}
    if not env.get("SLURM_JOB_ID"):
        return out
    _put(out, "slurm.job.id", env.get("SLURM_JOB_ID"))
    _put(out, "slurm.job.name", env.get("SLURM_JOB_NAME"))
    _put(out, "slurm.job.node_list", env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST"))
    _put(out, "slurm.job.num_nodes", _int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")))
    _put(out, "slurm.task.id", _int(env.get("SLURM_PROCID")))
    _put(out, "slurm.task.local_id", _int(env.get("SLURM_LOCALID")))
    _put(out, "slurm.node.id", _int(env.get("SLURM_NODEID")))
    _put(out, "slurm.partition", env.get("SLURM_JOB_PARTITION"))
    _put(out, "slurm.array.job_id", env.get("SLURM_ARRAY_JOB_ID"))
    _put(out, "slurm.array.task_id", _int(env.get("SLURM_ARRAY_TASK_ID")))
    return out


def kubernetes(env: Mapping[str, str], namespace_file: Path = _K8S_NAMESPACE_FILE) -> Attributes:
    out: Attributes = {}
    if not env.get("KUBERNETES_SERVICE_HOST"):
        return out
    _put(out, "k8s.pod.name", env.get("POD_NAME") or env.get("HOSTNAME"))
    namespace = env.get("POD_NAMESPACE")
    if not namespace:
        try:
            namespace = namespace_file.read_text(encoding="utf-8").strip()
        except OSError:
            namespace = None
    _put(out, "k8s.namespace.name", namespace)
    _put(out, "k8s.node.name", env.get("NODE_NAME"))
    _put(out, "k8s.pod.uid", env.get("POD_UID"))
    _put(out, "k8s.job.name", env.get("JOB_NAME"))
    return out


def torchrun(env: Mapping[str, str]) -> Attributes:
    out: Attributes = {}
    if not (env.get("TORCHELASTIC_RUN_ID") or env.get("LOCAL_WORLD_SIZE")):
        return out
    _put(out, "karn.dl.local_rank", _int(env.get("LOCAL_RANK")))
    _put(out, "karn.dl.node_rank", _int(env.get("GROUP_RANK")))
    _put(out, "karn.dl.local_world_size", _int(env.get("LOCAL_WORLD_SIZE")))
    _put(out, "karn.dl.restart_count", _int(env.get("TORCHELASTIC_RESTART_COUNT")))
    _put(out, "karn.dl.elastic_run_id", env.get("TORCHELASTIC_RUN_ID"))
    return out


@dataclass(frozen=True)
class ParallelLayout:
    """The user's statement of the parallel layout (None = not stated / not used)."""

    dp_rank: int | None = None
    dp_size: int | None = None
    tp_rank: int | None = None
    tp_size: int | None = None
    pp_rank: int | None = None
    pp_size: int | None = None

    def __post_init__(self) -> None:
        for kind in ("dp", "tp", "pp"):
            rank, size = getattr(self, f"{kind}_rank"), getattr(self, f"{kind}_size")
            if size is not None and size < 1:
                raise ValueError(f"{kind}_size must be >= 1, got {size}")
            if rank is not None and (rank < 0 or (size is not None and rank >= size)):
                raise ValueError(f"{kind}_rank must be in [0, {kind}_size), got {rank} of {size}")

    def attributes(self) -> Attributes:
        out: Attributes = {}
        for kind in ("dp", "tp", "pp"):
            _put(out, f"karn.dl.{kind}.rank", getattr(self, f"{kind}_rank"))
            _put(out, f"karn.dl.{kind}.size", getattr(self, f"{kind}_size"))
        return out


def layout_from_env(env: Mapping[str, str]) -> ParallelLayout:
    vals = {
        f"{k}_{w}": _int(env.get(f"KARN_{k.upper()}_{w.upper()}")) for k in ("dp", "tp", "pp") for w in ("rank", "size")
    }
    try:
        return ParallelLayout(**vals)
    except ValueError:
        return ParallelLayout()  # a malformed statement is ignored rather than breaking telemetry


def detect(env: Mapping[str, str] | None = None, layout: ParallelLayout | None = None) -> Attributes:
    """Every attribute the environment gives (SLURM, Kubernetes, torchrun, the stated layout)."""
    env = os.environ if env is None else env
    out: Attributes = {}
    out.update(slurm(env))
    out.update(kubernetes(env))
    out.update(torchrun(env))
    out.update((layout or layout_from_env(env)).attributes())
    return out
