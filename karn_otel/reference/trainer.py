"""Tolaria's role: train the host with its seeds for one episode, reporting through Karn.

One epoch, in order: train over the batches (metrics accumulated on the device), evaluate,
run the counterfactual pass, advance the lifecycle (G1-G3, alpha), let the controller act
(G0/G4/G5), then emit the slot snapshots and the host snapshot that closes the epoch.
Deterministic on CPU for a given RunConfig: `karn replay` depends on it.

With ``RunConfig.attribution_split = f > 0`` the validation set is split once per episode
(:func:`karn_otel.counterfactual.split_examples`): the lifecycle gates and the controller
decide on the decision examples (1 - f), and everything reported — the counterfactual
matrix, its intervals, the slots' contributions, the validation loss and accuracy — is
computed on the attribution examples (f) the decisions never saw. Each configuration is
still evaluated once per epoch, on all examples; both views come from the same per-example
results (:func:`split_attribution`).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from karn_otel import emit
from karn_otel.analytics import all_on
from karn_otel.collector import dense_requested, get_collector
from karn_otel.config import CounterfactualConfig
from karn_otel.contracts import (
    ActionOp,
    ControllerDecision,
    CounterfactualMatrix,
    CounterfactualResult,
    EpisodeContext,
    EpisodeSummary,
    HostBaseline,
    HostSnapshot,
    PolicySnapshot,
    Scalars,
    SeedStage,
    SlotSnapshot,
)
from karn_otel.counterfactual import ConfigEvaluation, Evaluate, attribute, split_examples, with_on_alphas
from karn_otel.distributed.episode import shared_episode_id
from karn_otel.distributed.evaluation import (
    WaitClock,
    distributed_attribute,
    make_distributed_evaluate,
    shard_indices,
)
from karn_otel.distributed.liveness import RankHeartbeat
from karn_otel.distributed.reduction import reduce_epoch
from karn_otel.ranks import discover
from karn_otel.reference.controller import (
    ControllerObservation,
    HeuristicConfig,
    HeuristicController,
    NoGrowthController,
    SlotView,
)
from karn_otel.reference.data import DigitsData, load_digits_data
from karn_otel.reference.host import HostCNN
from karn_otel.reference.ppo import compute_reward
from karn_otel.reference.slots import LifecycleConfig
from karn_otel.torch.ablation import evaluate_shared_prefix
from karn_otel.torch.accumulate import EpochAccumulator
from karn_otel.torch.checkpoints import save_checkpoint
from karn_otel.torch.diagnostics import DenseCollector

CONTROLLERS = ("heuristic", "none", "ppo")  # "none": never grows a seed (host-only reference)


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines an episode. Stored in EpisodeContext.hyperparameters."""

    epochs: int = 20
    seed: int = 0
    batch_size: int = 64
    lr: float = 3e-3
    seed_lr: float = 3e-3
    widths: tuple[int, int, int] = (4, 8, 16)
    controller: str = "heuristic"
    num_threads: int = 1
    warmup_epochs: int = 2
    min_training_epochs: int = 2
    blend_epochs: int = 3
    probation_epochs: int = 2
    plateau_threshold: float = 0.02  # germinate when val accuracy gained less than this over 2 epochs
    episodes: int = 1  # episodes in the run; a PPO controller learns across them
    nproc: int = 1  # data-parallel ranks (DDP, gloo on CPU); batch_size is the global batch
    heartbeat_timeout_s: float = 60.0  # a rank silent this long is reported missing, and the job ended (nproc > 1)
    collective_timeout_s: float = 300.0  # DDP collectives give up after this long (gloo's default is 30 min)
    inject_loss_spike_epoch: int = 0  # fault injection: shuffle labels for this epoch (0 = off)
    inject_fault_rank: int = -1  # fault injection on this rank only (-1 = every rank): the loss spike
    inject_slow_rank_s: float = 0.0  # fault injection: inject_fault_rank sleeps this long before each validation
    inject_entropy_collapse: bool = False  # fault injection: a (near-)deterministic PPO policy
    # fault injection: the policy collapses in the first N episodes only, then recovers (0 = off)
    inject_entropy_collapse_episodes: int = 0
    research: bool = False  # research mode: dense traces every batch (recorded for replay)
    device: str = "cpu"
    compile: str = ""  # torch.compile backend ("" = eager; e.g. "inductor", "aot_eager")
    counterfactual_strategy: str = "auto"  # auto / full_factorial / shapley / ablation_only
    shapley_samples: int = 20
    # Fraction of the validation examples held out for attribution (0 = off): the gates and the
    # controller decide on the rest, the reported matrix, intervals and accuracies use these.
    attribution_split: float = 0.0
    checkpoint_retention: str = "keep_last"
    # Experiments (karn_otel/experiment/runner.py): which experiment and arm this run belongs
    # to, and the control twin's validation accuracy per epoch (recorded beside this run's own).
    experiment_id: str = ""
    experiment_arm: str = ""  # "morph" | "control" | "" (not part of an experiment)
    control_curve: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError("epochs must be >= 1")
        if self.episodes < 1:
            raise ValueError("episodes must be >= 1")
        if self.nproc < 1 or self.batch_size < self.nproc:
            raise ValueError("nproc must be >= 1 and <= batch_size")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.controller not in CONTROLLERS:
            raise ValueError(f"unknown controller {self.controller!r}")
        if not 0.0 <= self.attribution_split < 1.0:
            raise ValueError(f"attribution_split must be in [0, 1) (0 = off), got {self.attribution_split}")
        if self.checkpoint_retention not in ("keep_all", "keep_last", "delete_after_run"):
            raise ValueError(f"unknown checkpoint_retention {self.checkpoint_retention!r}")

    def to_hyperparameters(self) -> dict[str, bool | int | float | str]:
        out: dict[str, bool | int | float | str] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = ",".join(str(i) for i in v)
            out[f.name] = v
        return out

    @classmethod
    def from_hyperparameters(cls, hp: dict[str, bool | int | float | str]) -> RunConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for k, v in hp.items():
            if k not in known:
                continue
            if k == "widths":
                v = tuple(int(i) for i in str(v).split(","))
            elif k == "control_curve":
                v = tuple(float(i) for i in str(v).split(",") if i)
            kwargs[k] = v
        return cls(**kwargs)

    @property
    def lifecycle(self) -> LifecycleConfig:
        return LifecycleConfig(
            min_training_epochs=self.min_training_epochs,
            blend_epochs=self.blend_epochs,
            probation_epochs=self.probation_epochs,
        )


@dataclass(frozen=True)
class EpisodeResult:
    episode_id: str
    final_val_accuracy: float
    host_only_accuracy: float
    total_params: int
    host_params: int
    wall_time_s: float
    val_accuracy_by_epoch: tuple[float, ...] = ()  # after epochs 1, 2, ... (karn calibrate)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def software_versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}


class ReferenceTrainer:
    """One episode. ``controller`` may be passed in to persist across episodes (PPO);
    ``episode_index`` offsets the seed so each episode trains a fresh host on new shuffles."""

    def __init__(
        self,
        cfg: RunConfig,
        checkpoint_dir: Path | None = None,
        controller=None,
        episode_index: int = 0,
        heartbeat_dir: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.dist = discover()
        if self.dist.world_size != cfg.nproc:
            raise ValueError(f"RunConfig.nproc={cfg.nproc} but this process is one of {self.dist.world_size} ranks")
        self.heartbeat = RankHeartbeat(heartbeat_dir, self.dist.rank) if (heartbeat_dir and cfg.nproc > 1) else None
        if self.heartbeat is not None:
            self.heartbeat.beat(0)  # alive from the start: no file reads as "missing"
            # Pulse from a thread: a rank waiting in a collective for a hung peer stays alive.
            self.heartbeat.start_pulse(max(cfg.heartbeat_timeout_s / 6, 0.2))
        self.episode_index = episode_index
        self.seed = cfg.seed + episode_index
        self.checkpoint_dir = checkpoint_dir
        self.initial_checkpoint: Path | None = None  # written at episode start (checkpoint_dir set)
        self.last_wait_s: float | None = None  # the latest distributed counterfactual's wait for other ranks
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
        torch.set_num_threads(cfg.num_threads)
        torch.use_deterministic_algorithms(True)
        torch.manual_seed(self.seed)
        self.rng = torch.Generator().manual_seed(self.seed)
        self.data: DigitsData = load_digits_data(self.seed).to(self.device)
        self.model = HostCNN(cfg.widths, cfg.lifecycle).to(self.device)
        # This rank's validation shard (contiguous, so gathering in rank order restores the set).
        n_val = self.data.x_val.shape[0]
        self.val_shard = shard_indices(n_val, self.dist.rank, self.dist.world_size)
        # Decision / attribution split of the *global* validation set (indices into the gathered
        # results, the same on every rank); fixed for the episode. None: no split.
        self.decision_examples: npt.NDArray[np.int64] | None = None
        self.attribution_examples: npt.NDArray[np.int64] | None = None
        if cfg.attribution_split > 0:
            self.decision_examples, self.attribution_examples = split_examples(
                n_val, cfg.attribution_split, seed=self.seed
            )
        self.forward = self._wrap_model()
        self.dense: DenseCollector | None = None
        self.dense_reason = ""
        self.dense_start = 0
        self._last_acc: tuple[int, EpochAccumulator] | None = None
        self.slot_ids = list(self.model.slots)
        self.host_params = self.model.host_params
        self.host_opt = torch.optim.Adam(self.model.host_parameters(), lr=cfg.lr)
        self.seed_opts: dict[str, torch.optim.Optimizer] = {}
        heuristic = HeuristicController(
            HeuristicConfig(
                warmup_epochs=cfg.warmup_epochs,
                probation_epochs=cfg.probation_epochs,
                plateau_threshold=cfg.plateau_threshold,
            )
        )
        if controller is not None:
            self.controller = controller
        elif cfg.controller == "ppo":
            self.controller = make_ppo_controller(cfg, self.slot_ids)
        else:
            self.controller = NoGrowthController() if cfg.controller == "none" else heuristic
        if cfg.inject_entropy_collapse_episodes and cfg.controller == "ppo":
            # Fault injection that recovers: collapsed in the first N episodes, healthy after.
            collapse = cfg.inject_entropy_collapse or episode_index < cfg.inject_entropy_collapse_episodes
            self.controller.cfg = dataclasses.replace(self.controller.cfg, force_entropy_collapse=collapse)
        # The heuristic decides beside a learned policy (its shadow) for policy_vs_heuristic.
        self.shadow = heuristic if self.controller is not heuristic and cfg.controller == "ppo" else None
        self._pending: dict[int, tuple] = {}  # PPO decision index -> (info, components, reward, shadow)
        self.cf_config = CounterfactualConfig(
            strategy=cfg.counterfactual_strategy,  # type: ignore[arg-type]
            shapley_samples=cfg.shapley_samples,
            seed=cfg.seed,
        )
        self.accuracy_history: list[float] = []
        self.val_accuracy_by_epoch: list[float] = []  # the reported accuracy after each epoch
        self.fossilized_params = 0

    # -- evaluation ------------------------------------------------------------------

    def _wrap_model(self):
        """The module the batch loop calls: DDP across ranks, optionally torch.compile'd."""
        if self.cfg.nproc > 1:
            from torch.nn.parallel import DistributedDataParallel

            # Rebuilt at every epoch start (DDP registers parameters when built, and seeds come
            # and go). A germinated or culled seed has parameters the forward pass skips.
            unused = any(
                s.seed is not None and s.stage in (SeedStage.GERMINATED, SeedStage.CULLED)
                for s in self.model.slots.values()
            )
            return DistributedDataParallel(self.model, find_unused_parameters=unused, gradient_as_bucket_view=True)
        # torch.compile is optional; telemetry hooks run under torch.compiler.disable.
        return torch.compile(self.model, backend=self.cfg.compile) if self.cfg.compile else self.model

    def _local_evaluate(self, switched: list[str]):
        """Evaluate configurations of the ``switched`` slots on this rank's validation shard."""
        slots = [self.model.slots[sid] for sid in self.slot_ids]
        branching = [sid in switched for sid in self.slot_ids]
        x, y = self.data.x_val[self.val_shard], self.data.y_val[self.val_shard]

        def evaluate(configs: list[tuple[bool, ...]]) -> list[ConfigEvaluation]:
            results = evaluate_shared_prefix(self.model, self.model.segments(), slots, branching, configs, x, y)
            return [ConfigEvaluation(correct, loss) for correct, loss in results]

        return evaluate

    def _evaluate_one(
        self, switched: list[str], config: tuple[bool, ...], clock: WaitClock | None = None
    ) -> ConfigEvaluation:
        """Per-example validation result of one configuration, gathered across ranks."""
        evaluate = self._local_evaluate(switched)
        if self.cfg.nproc > 1:
            evaluate = make_distributed_evaluate(evaluate, clock=clock)
        (r,) = evaluate([config])
        return r

    def _mean(self, r: ConfigEvaluation, examples: npt.NDArray[np.int64] | None) -> tuple[float, float]:
        """(loss, accuracy) of one result over ``examples`` (None: all of them)."""
        correct, loss = (r.correct, r.loss) if examples is None else (r.correct[examples], r.loss[examples])
        return float(loss.mean()), float(correct.mean())

    def evaluate_split(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """The model as it is, one pass: ((loss, acc) reported, (loss, acc) decided on).

        Without an attribution split both are over the whole validation set."""
        r = self._evaluate_one([], ())
        return self._mean(r, self.attribution_examples), self._mean(r, self.decision_examples)

    def evaluate(self) -> tuple[float, float]:
        """Validation loss/accuracy of the model as it is (the attribution examples under a split)."""
        return self.evaluate_split()[0]

    def host_only(self) -> tuple[float, float]:
        """Validation loss/accuracy with every seed's alpha forced to 0 (the attribution examples
        under a split)."""
        return self._mean(self._evaluate_one(self.slot_ids, (False,) * len(self.slot_ids)), self.attribution_examples)

    def counterfactual(self, epoch: int) -> CounterfactualMatrix:
        """The epoch's reported counterfactual matrix (:meth:`counterfactual_pair`)."""
        return self.counterfactual_pair(epoch)[0]

    def counterfactual_pair(self, epoch: int) -> tuple[CounterfactualMatrix, CounterfactualMatrix]:
        """Attribution over the active seeds (alpha > 0); with none, the host-only pass. An
        "on" seed is evaluated as the model runs it, at its current blend alpha, which each
        configuration's ``alpha_settings`` records (:func:`with_on_alphas`)."""
        alphas = {sid: float(self.model.slots[sid].alpha) for sid in self.slot_ids if self.model.slots[sid].is_active}
        reported, decision = self._counterfactual_pair(epoch)
        on = with_on_alphas(reported, alphas)
        return on, (on if decision is reported else with_on_alphas(decision, alphas))

    def _counterfactual_pair(self, epoch: int) -> tuple[CounterfactualMatrix, CounterfactualMatrix]:
        """The matrices of :meth:`counterfactual_pair`, "on" recorded as alpha 1.0.

        Returns ``(reported, decision)``: the matrix that is emitted and the one the gates
        and the controller read. Without an attribution split they are the same object; with
        one, the reported matrix is over the attribution examples and the decision matrix
        over the decision examples, both from one evaluation of each configuration
        (:func:`split_attribution`). Its all-on configuration is also the epoch's validation
        result. Across ranks each evaluates its shard and the per-example results are
        gathered: every rank gets the single-process matrices (the split indexes the gathered,
        global example order).
        """
        if self.cfg.inject_slow_rank_s > 0 and self.cfg.inject_fault_rank in (-1, self.dist.rank):
            time.sleep(self.cfg.inject_slow_rank_s)  # fault injection: a straggler before validation
        active = [sid for sid in self.slot_ids if self.model.slots[sid].is_active]
        local = self._local_evaluate(active)
        split = self.attribution_examples is not None
        if active and not split:
            if self.cfg.nproc > 1:
                matrix = distributed_attribute(local, active, self.cf_config, epoch=epoch)
                self.last_wait_s = matrix.wait_s  # this rank's wait for the others (its busy time excludes it)
                return matrix, matrix
            matrix = attribute(local, active, self.cf_config, epoch=epoch)
            return matrix, matrix
        t0 = time.perf_counter()
        clock = WaitClock() if self.cfg.nproc > 1 else None
        evaluate = make_distributed_evaluate(local, clock=clock) if clock is not None else local
        if active:
            # cf_config never has a wall-clock budget here (distributed_attribute refuses one:
            # ranks would stop at different points), so every rank requests the same configs.
            reported, decision = split_attribution(
                evaluate,
                active,
                self.cf_config,
                epoch=epoch,
                decision_examples=self.decision_examples,  # type: ignore[arg-type]
                attribution_examples=self.attribution_examples,  # type: ignore[arg-type]
            )
            self.last_wait_s = clock.seconds if clock is not None else None
            if clock is not None:
                reported = dataclasses.replace(reported, wait_s=clock.seconds)
            return reported, decision
        (r,) = evaluate([()])
        self.last_wait_s = clock.seconds if clock is not None else None
        elapsed = time.perf_counter() - t0

        def host_pass(examples: npt.NDArray[np.int64] | None) -> CounterfactualMatrix:
            loss, acc = self._mean(r, examples)
            row = CounterfactualResult((), {}, loss, acc)
            return CounterfactualMatrix(
                epoch,
                (),
                (row,),
                {},
                {},
                None,
                strategy="none",
                n_evaluations=1,
                elapsed_s=elapsed,
                wait_s=self.last_wait_s,
            )

        reported = host_pass(self.attribution_examples)
        return reported, (host_pass(self.decision_examples) if split else reported)

    # -- training --------------------------------------------------------------------

    def train_batches(self, epoch: int) -> EpochAccumulator:
        """The per-batch path: forward, backward, step. No host-device sync in here
        (tests/reference/test_sync_free.py counts them): metrics stay on the device."""
        model, d = self.model, self.data
        model.train()
        seed_params = {sid: list(s.seed.parameters()) for sid, s in model.slots.items() if s.seed is not None}
        host_params = model.host_parameters()
        isolated = [s for s in model.slots.values() if s.is_isolated]
        acc = EpochAccumulator(self.slot_ids, self.device)
        for s in model.slots.values():
            s.leak_meter.zero_()
        opts = [self.host_opt, *self.seed_opts.values()]
        perm = torch.randperm(d.x_train.shape[0], generator=self.rng)
        # Every rank draws the same permutation and takes its stride: one global batch of
        # batch_size is split over the ranks, as a single process would see it.
        perm = perm[self.dist.rank :: self.dist.world_size].to(self.device)
        batch = self.cfg.batch_size // self.dist.world_size
        y_train = d.y_train
        faulty = self.cfg.inject_fault_rank in (-1, self.dist.rank)
        if epoch == self.cfg.inject_loss_spike_epoch and faulty:
            # Fault injection: one epoch of shuffled labels, a real loss spike that resolves.
            y_train = y_train[
                torch.randperm(y_train.shape[0], generator=torch.Generator().manual_seed(epoch)).to(self.device)
            ]
        if self.cfg.nproc > 1:
            self.forward = self._wrap_model()
        dense = self.dense
        forward = self.forward
        for idx in perm.split(batch):
            xb, yb = d.x_train[idx], y_train[idx]
            logits = forward(xb)
            loss = F.cross_entropy(logits, yb)
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            leak = sum(s.leak_meter for s in isolated) if isolated else None
            acc.update(loss, logits, yb, host_params, seed_params, leak)
            if dense is not None:
                dense.after_backward()
            for opt in opts:
                opt.step()
        return acc

    def train_epoch(self, epoch: int) -> dict:
        started = time.perf_counter()
        acc = self.train_batches(epoch)
        metrics = acc.materialize()  # the epoch's one sync
        metrics["started_at"] = started  # this rank's epoch duration, up to the reduction
        if not any(s.is_isolated for s in self.model.slots.values()):
            metrics["leakage"] = None
        if self.dense is not None:
            seeded = {sid for sid, s in self.model.slots.items() if s.seed is not None}
            self.dense.add_batch_metrics(acc.batch_metrics(epoch, seeded, metrics["leakage"] is not None))
        self._last_acc = (epoch, acc)
        return metrics

    # -- PPO (Simic) ------------------------------------------------------------------

    @property
    def is_ppo(self) -> bool:
        return getattr(self.controller, "name", "") == "ppo"

    def after_decision(self, obs: ControllerObservation, action, shadow) -> None:
        if self.is_ppo:
            self._prev = (obs, action, self.controller.last_decision, shadow)
            self.ppo_update(force=False)

    def reward_previous_decision(self, obs: ControllerObservation, done: bool) -> None:
        """Judge the previous decision on the observation that followed it (PPO only)."""
        prev = getattr(self, "_prev", None)
        if not self.is_ppo or prev is None:
            return
        prev_obs, prev_action, info, shadow = prev
        components = compute_reward(prev_obs, obs, prev_action, self.controller.cfg)
        total = self.controller.record_reward(components, done=done)
        self._pending[info.decision_index] = (info, components, total, shadow)
        self._prev = None

    def ppo_update(self, force: bool) -> None:
        """Run a PPO update when due; emit its stats and the PolicySnapshots of its decisions."""
        t0 = time.perf_counter()
        stats = self.controller.maybe_update(force=force)
        if stats is None:
            return
        stats = dataclasses.replace(stats, elapsed_s=time.perf_counter() - t0)
        emit(stats)
        advantages = self.controller.last_advantages() or []
        for idx, adv in zip(self.controller.last_update_decisions, advantages):
            info, components, total, shadow = self._pending.pop(idx)
            emit(
                PolicySnapshot(
                    observation_vector=tuple(info.observation_vector),
                    action=info.action,
                    action_log_probs=dict(info.action_log_probs),
                    action_was_masked=info.action_was_masked,
                    value_estimate=info.value_estimate,
                    advantage=adv,
                    reward_total=total,
                    reward_components=components,
                    kl_divergence=stats.kl_divergence,
                    explained_variance=stats.explained_variance,
                    per_head_kl=dict(stats.per_head_kl),
                    advantage_stats=stats.advantage_stats,
                    ratio_stats=stats.ratio_stats,
                    lstm_health=stats.lstm_health,
                    entropy=dict(info.entropy),
                    shadow_action=shadow,
                )
            )

    # -- dense windows (tier 3) ------------------------------------------------------

    def update_dense_window(self, epoch: int) -> None:
        """Open or close the dense-trace window as Karn's mode says (adaptive escalation).

        An anomaly detected at the end of epoch e switches Karn to research mode; the window
        then starts with epoch e's batches (still on the device) and records every batch
        until the mode returns to standard.
        """
        want, reason = dense_requested()
        if want and self.dense is None:
            self.dense = DenseCollector(self.model, self.param_groups(), self.model.activation_modules())
            self.dense.attach()
            self.dense_reason = reason or "research_mode"
            self.dense_start = epoch
            if self._last_acc is not None:
                prev_epoch, prev = self._last_acc
                seeded = {sid for sid, s in self.model.slots.items() if s.seed is not None}
                self.dense.add_batch_metrics(prev.batch_metrics(prev_epoch, seeded, False))
                self.dense_start = prev_epoch
        elif not want and self.dense is not None:
            self.close_dense_window(epoch - 1)

    def close_dense_window(self, end_epoch: int) -> None:
        if self.dense is None:
            return
        failed = [
            s.last_gate_trace for s in self.model.slots.values() if s.last_gate_trace and not s.last_gate_trace.passed
        ]
        trace = self.dense.finish(self.dense_reason, self.dense_start, end_epoch, failed[-1] if failed else None)
        self.dense = None
        emit(trace)

    def param_groups(self) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
        groups: dict[str, list[tuple[str, torch.nn.Parameter]]] = {"host": []}
        for name, p in self.model.named_parameters():
            if name.startswith("slots."):
                groups.setdefault(f"seed:{name.split('.')[1]}", []).append((name, p))
            else:
                groups["host"].append((name, p))
        return groups

    # -- the episode -----------------------------------------------------------------

    def run(self) -> EpisodeResult:
        cfg, model = self.cfg, self.model
        t_start = time.perf_counter()
        # One id per job: rank 0 chooses it, so every rank's spans share the episode's trace.
        episode_id = shared_episode_id()
        emit(
            EpisodeContext(
                episode_id=episode_id,
                timestamp=datetime.now(timezone.utc),
                git_commit=git_commit(),
                base_seed=self.seed,
                torch_seed=self.seed,
                numpy_seed=self.seed,
                host_architecture="cnn_3block",
                host_params=self.host_params,
                slot_config=model.slot_config,
                max_epochs=cfg.epochs,
                task_type="classification",
                hyperparameters=cfg.to_hyperparameters(),
                software=software_versions(),
                experiment_id=cfg.experiment_id or None,
                experiment_arm=cfg.experiment_arm or None,
            )
        )
        (init_loss, init_acc), (_, init_decision_acc) = self.evaluate_split()
        ckpt = Path(self.checkpoint_dir or ".") / f"ep{self.episode_index:03d}-{episode_id}-initial.pt"
        if self.checkpoint_dir is not None:
            # Guarded (bounded, never raises): a full, read-only or frozen disk costs no training step.
            if save_checkpoint(model.state_dict(), ckpt):
                self.initial_checkpoint = ckpt
        baseline = HostBaseline(init_loss, init_acc, ckpt, cfg.checkpoint_retention)  # type: ignore[arg-type]
        emit(baseline, epoch=0)
        # The controller's accuracy history is on the examples it decides on.
        self.accuracy_history.append(init_decision_acc)

        val_loss, val_acc = init_loss, init_acc
        decision_loss, decision_acc = val_loss, val_acc
        culled = False  # the last epoch's action culled a seed (see the summary below)
        for epoch in range(1, cfg.epochs + 1):
            self.update_dense_window(epoch)
            m = self.train_epoch(epoch)
            # Reported (emitted) and decided-on views of one evaluation; the same matrix
            # unless RunConfig.attribution_split is set.
            cf, decision = self.counterfactual_pair(epoch)
            val_loss, val_acc = all_on_result(cf)
            self.val_accuracy_by_epoch.append(val_acc)
            decision_loss, decision_acc = all_on_result(decision)
            self.accuracy_history.append(decision_acc)
            emit(cf, is_reduced=self.cfg.nproc > 1)  # opens the epoch for the events below
            for sid, slot in model.slots.items():
                slot.counterfactual_contribution = cf.marginal_contributions.get(sid)
                slot.decision_contribution = decision.marginal_contributions.get(sid)

            # The automatic lifecycle first (G1-G3, alpha), then the controller's decision on
            # the resulting state, so a germination or cull is visible in this epoch's snapshot.
            for sid, slot in model.slots.items():
                slot.step_epoch(decision_loss, m["seed_grad_norms"][sid])
            obs = self.observation(epoch, decision_acc, decision_loss)
            self.reward_previous_decision(obs, done=False)
            action, reason = self.controller.decide(obs)
            shadow = self.shadow.decide(obs)[0] if self.shadow is not None else None
            applied = self.apply(action, val_acc)
            culled = applied and action.op is ActionOp.CULL
            emit(
                ControllerDecision(
                    self.controller.name,
                    action,
                    reason,
                    shadow_action=shadow,
                    applied=None if action.op is ActionOp.WAIT else applied,
                )
            )
            self.after_decision(obs, action, shadow)
            if self.heartbeat is not None:
                self.heartbeat.beat(epoch)
            self.emit_snapshots(epoch, m, val_loss, val_acc)

        self.close_dense_window(cfg.epochs)
        if self.is_ppo:
            # The last decision is judged on the state it produced; then learn from the episode.
            self.reward_previous_decision(self.observation(cfg.epochs, decision_acc, decision_loss), done=True)
            self.ppo_update(force=True)
            self.controller.reset_episode()
        if culled:
            # The last epoch's matrix (and its snapshot) measured the model before the
            # controller's cull; the summary describes the model the run ends with.
            val_loss, val_acc = self.evaluate()
        host_loss, host_acc = self.host_only()
        emit(dataclasses.replace(baseline, final_host_only_loss=host_loss, final_host_only_accuracy=host_acc))
        total = self.host_params + sum(s.seed_params for s in model.slots.values() if s.stage is not SeedStage.CULLED)
        wall = time.perf_counter() - t_start
        emit(
            EpisodeSummary(
                epochs_completed=cfg.epochs,
                final_val_loss=val_loss,
                final_val_accuracy=val_acc,
                host_only_accuracy=host_acc,
                host_params=self.host_params,
                total_params=total,
                fossilized_params=self.fossilized_params,
                wall_time_s=wall,
            )
        )
        return EpisodeResult(
            episode_id, val_acc, host_acc, total, self.host_params, wall, tuple(self.val_accuracy_by_epoch)
        )

    def observation(self, epoch: int, val_acc: float, val_loss: float) -> ControllerObservation:
        """What the controller sees: accuracies and contributions on the decision examples."""
        return ControllerObservation(
            epoch=epoch,
            max_epochs=self.cfg.epochs,
            val_accuracy=val_acc,
            val_loss=val_loss,
            accuracy_history=tuple(self.accuracy_history),
            slots=tuple(
                SlotView(
                    s.slot_id,
                    s.stage,
                    s.epochs_in_stage,
                    s.alpha,
                    s.decision_contribution,
                    s.consecutive_gate_failures,
                    s.seed_params,
                )
                for s in self.model.slots.values()
            ),
            host_params=self.host_params,
        )

    def apply(self, action, val_acc: float) -> bool:
        """Carry out the controller's action; True when it changed a slot (a refused one, a
        failed gate or a busy slot, changes nothing)."""
        slots = self.model.slots
        if action.op is ActionOp.GERMINATE:
            seed = slots[action.slot].germinate(action.blueprint, self.host_params, val_acc)
            if seed is not None:
                self.seed_opts[action.slot] = torch.optim.Adam(seed.parameters(), lr=self.cfg.seed_lr)
            return seed is not None
        if action.op is ActionOp.FOSSILIZE:
            if slots[action.slot].try_fossilize():
                self.fossilized_params += slots[action.slot].seed_params
                return True
            return False
        if action.op is ActionOp.CULL:
            if slots[action.slot].cull("culled by controller"):
                self.seed_opts.pop(action.slot, None)
                return True
        return False

    def emit_snapshots(self, epoch: int, m: dict, val_loss: float, val_acc: float) -> None:
        seed_norms: dict[str, float] = {}
        total_seed = 0
        for sid, s in self.model.slots.items():
            contribution = s.counterfactual_contribution if s.is_active else None
            improvement = 0.0
            if contribution is not None and s.last_contribution is not None:
                improvement = contribution - s.last_contribution
            s.last_contribution = contribution
            gate = s.last_gate
            emit(
                SlotSnapshot(
                    slot_id=sid,
                    stage=s.stage,
                    epochs_in_stage=s.epochs_in_stage,
                    seed_id=s.seed_id,
                    blueprint_id=s.blueprint_id,
                    seed_params=s.seed_params,
                    alpha=s.alpha if s.is_active else 0.0,
                    counterfactual_contribution=contribution,
                    total_improvement=(val_acc - s.accuracy_at_germination)
                    if (s.seed is not None and s.accuracy_at_germination is not None)
                    else None,
                    improvement_this_epoch=improvement,
                    last_gate_attempted=gate[0] if gate else None,
                    last_gate_passed=gate[1] if gate else None,
                    last_gate_reason=gate[2] if gate else None,
                )
            )
            if s.seed is not None and s.stage is not SeedStage.CULLED:
                seed_norms[sid] = m["seed_grad_norms"][sid]
                total_seed += s.seed_params
        local = HostSnapshot(
            epoch=epoch,
            train_loss=m["loss"],
            train_accuracy=m["accuracy"],
            val_loss=val_loss,
            val_accuracy=val_acc,
            host_params=self.host_params,
            total_seed_params=total_seed,
            total_params=self.host_params + total_seed,
            fossilized_params=self.fossilized_params,
            host_grad_norm=m["host_grad_norm"],
            seed_grad_norms=seed_norms,
            grad_isolation_leakage=m["leakage"],
        )
        if epoch <= len(self.cfg.control_curve):
            # The control twin's accuracy at this epoch (causal baseline), before the snapshot
            # that closes the epoch.
            c = self.cfg.control_curve[epoch - 1]
            emit(Scalars(epoch, {"control_val_accuracy": c, "accuracy_delta_vs_control": val_acc - c}))
        emit(local)
        if self.cfg.nproc > 1:
            # One fixed-schema collective: every rank's numbers, reduced honestly (sample-
            # weighted means, max of gradient norms), plus each rank's epoch time and own
            # health for the spread across ranks. Rank 0 reports the global snapshot; every
            # rank records the summary (its gather time is its share of the reduction).
            collector = get_collector()
            report = collector.view.health_report() if collector is not None else None
            reduced, summary = reduce_epoch(
                local,
                n_examples=m["examples"],
                busy_s=time.perf_counter() - m["started_at"] - (self.last_wait_s or 0.0),
                health=report.overall if report is not None else None,
            )
            emit(summary, is_reduced=True)
            if self.dist.rank == 0:
                emit(reduced, is_reduced=True)


def run_episode(cfg: RunConfig, checkpoint_dir: Path | None = None) -> EpisodeResult:
    """One episode of the reference system (the first of ``run_reference``)."""
    return ReferenceTrainer(cfg, checkpoint_dir).run()


def run_reference(
    cfg: RunConfig, checkpoint_dir: Path | None = None, heartbeat_dir: Path | None = None
) -> list[EpisodeResult]:
    """``cfg.episodes`` episodes; one controller instance learns across all of them."""
    results: list[EpisodeResult] = []
    checkpoints: list[Path] = []
    controller = None
    try:
        for k in range(cfg.episodes):
            trainer = ReferenceTrainer(
                cfg, checkpoint_dir, controller=controller, episode_index=k, heartbeat_dir=heartbeat_dir
            )
            controller = trainer.controller
            results.append(trainer.run())
            if trainer.heartbeat is not None and k < cfg.episodes - 1:
                trainer.heartbeat.stop_pulse()  # the next episode's trainer pulses
            if trainer.initial_checkpoint is not None:
                checkpoints.append(trainer.initial_checkpoint)
            if trainer.heartbeat is not None and k == cfg.episodes - 1:
                trainer.heartbeat.finish(cfg.epochs)
    finally:
        apply_checkpoint_retention(checkpoints, cfg.checkpoint_retention, root=checkpoint_dir)
    return results


# The only files retention may delete: the initial checkpoints this trainer names.
_CHECKPOINT_NAME = re.compile(r"ep\d{3}-[0-9a-f]{32}-initial\.pt")


def apply_checkpoint_retention(checkpoints: list[Path], policy: str, root: Path | None = None) -> list[Path]:
    """Apply the run's ``checkpoint_retention`` to the initial checkpoints this trainer wrote,
    in episode order, once the run is over; returns the paths deleted.

    ``keep_all`` keeps every one, ``keep_last`` only the last episode's (what ``karn replay``
    compares against), ``delete_after_run`` none. The trainer wrote them, so the trainer
    deletes them; a file that cannot be removed is left in place. Only a file named as the
    trainer names its checkpoints is ever deleted, and with ``root`` only one directly in it.
    """
    if policy == "keep_all":
        doomed: list[Path] = []
    elif policy == "keep_last":
        doomed = checkpoints[:-1]
    else:
        doomed = list(checkpoints)
    deleted = []
    for path in doomed:
        if not _CHECKPOINT_NAME.fullmatch(path.name):
            continue
        if root is not None and os.path.realpath(path.parent) != os.path.realpath(root):
            continue
        try:
            path.unlink(missing_ok=True)
            deleted.append(path)
        except OSError:
            pass
    return deleted


def split_attribution(
    evaluate: Evaluate,
    slot_ids: list[str],
    config: CounterfactualConfig,
    *,
    epoch: int,
    decision_examples: npt.ArrayLike,
    attribution_examples: npt.ArrayLike,
) -> tuple[CounterfactualMatrix, CounterfactualMatrix]:
    """``(reported, decision)`` matrices from one evaluation of each configuration.

    ``evaluate`` returns per-example results over the whole validation set. The reported
    matrix is :func:`~karn_otel.counterfactual.attribute` restricted to
    ``attribution_examples`` (with its bootstrap intervals); the decision matrix is the same
    configurations' recorded results restricted to ``decision_examples`` — point values only
    (``bootstrap_samples=0``: the controller reads removal costs and accuracies, and the extra
    cost is one pass of numpy means, no model evaluation). ``attribute`` is deterministic given
    its config and the number of slots, so the second pass asks for exactly the configurations
    the first one evaluated; one it did not (never, today) would be evaluated, once.
    """
    recorded: dict[tuple[bool, ...], ConfigEvaluation | np.ndarray] = {}

    def recording(configs: list[tuple[bool, ...]]) -> list[ConfigEvaluation | np.ndarray]:
        results = list(evaluate(configs))
        for c, r in zip(configs, results):
            recorded[tuple(c)] = r
        return results

    reported = attribute(recording, slot_ids, config, epoch=epoch, attribution_examples=attribution_examples)

    def replay(configs: list[tuple[bool, ...]]) -> list[ConfigEvaluation | np.ndarray]:
        missing = [c for c in configs if tuple(c) not in recorded]
        if missing:
            recording(missing)
        return [recorded[tuple(c)] for c in configs]

    decision = attribute(
        replay,
        slot_ids,
        dataclasses.replace(config, bootstrap_samples=0),
        epoch=epoch,
        attribution_examples=decision_examples,
    )
    return reported, decision


def all_on_result(cf: CounterfactualMatrix) -> tuple[float, float]:
    """(val loss, val accuracy) of the model as it is: the matrix's all-on configuration."""
    row = all_on(cf)
    if row is None:
        raise ValueError(f"the epoch-{cf.epoch} matrix has no all-on configuration")
    return row.val_loss, row.val_accuracy


def policy_head_sizes(cfg: RunConfig) -> dict[str, int] | None:
    """Action-head sizes of the run's learned controller (for entropy-collapse floors)."""
    if cfg.controller != "ppo":
        return None
    from karn_otel.reference.ppo import PPOConfig
    from karn_otel.reference.slots import BLUEPRINTS

    return {"op": 4, "slot": len(cfg.widths), "blueprint": len(BLUEPRINTS), "blend": len(PPOConfig().blend_schedules)}


def make_ppo_controller(cfg: RunConfig, slot_ids: list[str]):
    from karn_otel.reference.ppo import PPOConfig, PPOController
    from karn_otel.reference.slots import BLUEPRINTS

    return PPOController(
        PPOConfig(seed=cfg.seed, force_entropy_collapse=cfg.inject_entropy_collapse, device=cfg.device),
        slot_ids,
        BLUEPRINTS,
    )


def calibrate(
    epochs: int = 20,
    seed: int = 0,
    multipliers: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0),
    base_widths: tuple[int, int, int] = (4, 8, 16),
    progress=print,
):
    """Train seedless reference hosts of several widths; return their accuracy-vs-params curve."""
    from karn_otel.analytics import ReferenceCurve

    rows = []
    for m in multipliers:
        widths = tuple(max(1, int(round(w * m))) for w in base_widths)
        cfg = RunConfig(epochs=epochs, seed=seed, widths=widths, controller="none")  # type: ignore[arg-type]
        r = run_episode(cfg)
        rows.append(((r.host_params, r.final_val_accuracy), r.val_accuracy_by_epoch))
        progress(f"  widths {widths}: {r.host_params:,} params, val acc {100 * r.final_val_accuracy:.2f}%")
    rows.sort()
    return ReferenceCurve(tuple(p for p, _ in rows), epochs, seed, tuple(c for _, c in rows))
