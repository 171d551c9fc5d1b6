"""Tier-3 (dense trace) collection: gradient histograms, gradient flow, activation statistics.

Everything is accumulated on the device and materialised once, when the window closes
(review P1 #8: histograms are ``torch.histc`` tensors, never ``.item()``). Forward hooks
exist only while a window is open, and every hook and per-batch collector runs under
``torch.compiler.disable`` (review P1 #7) so a compiled model takes a graph break at the
hook instead of recompiling the training step around telemetry.

Histograms are of log10|g| (gradient *magnitude*, default 48 bins over [-10, 2]): gradient
scales vary over many orders of magnitude between layers and during training, so a fixed
linear range such as [-1, 1] puts almost everything in one or two bins. For large models a
fixed random sample of at most ``max_hist_elements`` gradient entries per parameter is
histogrammed (the sample indices are drawn once, with their own generator).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from karn_otel.contracts import BatchMetrics, DenseTrace, GateEvaluationTrace


@dataclass(frozen=True)
class DenseConfig:
    hist_bins: int = 48
    hist_min_log10: float = -10.0
    hist_max_log10: float = 2.0
    max_hist_elements: int = 100_000  # per parameter tensor; larger tensors are sampled
    max_batch_metrics: int = 512  # per dense trace; further batches are counted, not kept
    dead_threshold: float = 0.0  # a unit is dead in a batch if its activation never exceeds this
    # Activation statistics are sampled every k-th training batch: they describe a
    # distribution that moves slowly within a window, and the hooks are the costliest part
    # of a dense window on small models. Per-batch metrics and gradients cover every batch.
    activation_every: int = 4


class _ActivationStats:
    """Running sums for one hooked module: [sum, sum of squares, dead units] on the device,
    plus element and batch counts kept in Python (they come from shapes: no sync)."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.count = 0
        self.batches = 0


class DenseCollector:
    """Collects one dense window's gradient and activation details on the device.

    ``groups`` maps a bounded group name ("host", "seed:mid", ...) to its parameters; the
    histograms and gradient flow are reported per group and per layer.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: dict[str, list[tuple[str, nn.Parameter]]],
        activation_modules: dict[str, nn.Module],
        config: DenseConfig | None = None,
    ) -> None:
        self.cfg = config or DenseConfig()
        self.model = model
        self.groups = groups
        self.activation_modules = activation_modules
        self.device = next(model.parameters()).device
        self._hist_all = torch.zeros(self.cfg.hist_bins * len(groups), device=self.device)
        self._flow_names = [name for ps in groups.values() for name, _ in ps]
        self._flow_acc = torch.zeros(len(self._flow_names), dtype=torch.float64, device=self.device)
        self._flow_batches = 0
        self._layout_key: tuple[str, ...] | None = None
        self._offsets = torch.zeros(0, device=self.device)
        self._flow_index = torch.zeros(0, dtype=torch.long, device=self.device)
        self._acts = {name: _ActivationStats(self.device) for name in activation_modules}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._sample_idx: dict[int, torch.Tensor] = {}
        self._gen = torch.Generator(device="cpu").manual_seed(0)
        self.batch_metrics: list[BatchMetrics] = []
        self._batches_seen = 0
        self._sample_activations = True  # the first batch of a window is always sampled
        self.batches_dropped = 0

    # -- window lifecycle ------------------------------------------------------------------

    def attach(self) -> None:
        """Attach the forward hooks (only while a window is open)."""
        for name, module in self.activation_modules.items():
            self._hooks.append(module.register_forward_hook(self._make_hook(name)))

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _make_hook(self, name: str):
        stats = self._acts[name]
        thr = self.cfg.dead_threshold

        @torch.compiler.disable
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            if not module.training or not self._sample_activations:
                return  # validation passes are not part of the training trace
            with torch.no_grad():
                out = output.detach()
                flat = out.reshape(-1)
                # Units = channels (dim 1): dead if never above threshold anywhere in the batch.
                # Batch dim first (a contiguous outer reduction), then the spatial dims: several
                # times faster on CPU than one amax over (0, 2, 3), and no copy.
                per_unit = out.amax(dim=0).flatten(1).amax(dim=1) if out.dim() > 2 else out.amax(dim=0)
                stats.sums += torch.stack([flat.sum(), torch.dot(flat, flat), (per_unit <= thr).sum()]).to(
                    torch.float64
                )
                stats.count += out.numel()
                stats.batches += 1

        return hook

    # -- per batch -------------------------------------------------------------------------

    @torch.compiler.disable
    @torch.no_grad()
    def after_backward(self) -> None:
        """Accumulate gradient histograms and per-layer gradient norms (device only).

        Fused across groups so the op count does not grow with the number of groups: every
        group's log-magnitudes are shifted into a range of their own and binned by one
        ``histc`` (values outside [hist_min, hist_max] land in the edge bins).
        """
        c = self.cfg
        grads, names, group_of = [], [], []
        for gi, params in enumerate(self.groups.values()):
            for name, p in params:
                if p.grad is not None:
                    grads.append(p.grad)
                    names.append(name)
                    group_of.append(gi)
        if not grads:
            return
        key = tuple(names)
        if key != self._layout_key:
            self._set_layout(key, grads, group_of)
        norms = torch.stack(torch._foreach_norm(grads)).to(torch.float64)
        self._flow_acc.index_add_(0, self._flow_index, norms)
        flat = torch.cat([self._sample(g).flatten() for g in grads]).float()
        width = c.hist_max_log10 - c.hist_min_log10
        logmag = flat.abs().clamp_min_(1e-30).log10_().clamp_(c.hist_min_log10, c.hist_max_log10 - 1e-6 * width)
        logmag += self._offsets
        n_groups = len(self.groups)
        self._hist_all += torch.histc(
            logmag, bins=c.hist_bins * n_groups, min=c.hist_min_log10, max=c.hist_min_log10 + width * n_groups
        )
        self._flow_batches += 1
        self._batches_seen += 1
        self._sample_activations = self._batches_seen % self.cfg.activation_every == 0

    def _set_layout(self, key: tuple[str, ...], grads: list[torch.Tensor], group_of: list[int]) -> None:
        """(Re)build the per-element group offsets and flow indices: once per parameter layout."""
        width = self.cfg.hist_max_log10 - self.cfg.hist_min_log10
        sizes = [min(g.numel(), self.cfg.max_hist_elements) for g in grads]
        self._offsets = torch.cat([torch.full((n,), gi * width, device=self.device) for n, gi in zip(sizes, group_of)])
        flow_pos = {n: i for i, n in enumerate(self._flow_names)}
        self._flow_index = torch.cat([torch.full((1,), flow_pos[n], dtype=torch.long, device=self.device) for n in key])
        self._layout_key = key

    def _sample(self, g: torch.Tensor) -> torch.Tensor:
        if g.numel() <= self.cfg.max_hist_elements:
            return g
        key = id(g.shape), g.numel()
        idx = self._sample_idx.get(hash(key))
        if idx is None:
            idx = torch.randperm(g.numel(), generator=self._gen)[: self.cfg.max_hist_elements].to(g.device)
            self._sample_idx[hash(key)] = idx
        return g.flatten()[idx]

    def add_batch_metrics(self, metrics: list[BatchMetrics]) -> None:
        room = self.cfg.max_batch_metrics - len(self.batch_metrics)
        self.batch_metrics.extend(metrics[: max(room, 0)])
        self.batches_dropped += max(len(metrics) - max(room, 0), 0)

    # -- close -----------------------------------------------------------------------------

    def finish(
        self,
        trigger_reason: str,
        window_start_epoch: int,
        window_end_epoch: int,
        gate: GateEvaluationTrace | None = None,
    ) -> DenseTrace:
        """Detach hooks and materialise everything with one host transfer."""
        self.detach()
        groups = list(self.groups)
        act_names = list(self._acts)
        parts = [self._hist_all.to(torch.float64), self._flow_acc]
        parts += [self._acts[n].sums for n in act_names]
        flat = torch.cat(parts).tolist()  # the one sync
        nb = self.cfg.hist_bins
        hist = {g: tuple(flat[i * nb : (i + 1) * nb]) for i, g in enumerate(groups)}
        pos = nb * len(groups)
        batches = max(self._flow_batches, 1)
        flow = {n: flat[pos + i] / batches for i, n in enumerate(self._flow_names)}
        pos += len(self._flow_names)
        means, stds, dead = {}, {}, {}
        for n in act_names:
            s, sq, d = flat[pos : pos + 3]
            pos += 3
            a = self._acts[n]
            if a.count > 0:
                mean = s / a.count
                means[n] = mean
                stds[n] = max(sq / a.count - mean * mean, 0.0) ** 0.5
                dead[n] = int(round(d / max(a.batches, 1)))  # dead units per batch, averaged
        return DenseTrace(
            trigger_reason=trigger_reason,
            window_start_epoch=window_start_epoch,
            window_end_epoch=window_end_epoch,
            batch_metrics=tuple(self.batch_metrics),
            gradient_histograms=hist,
            gradient_flow=flow,
            activation_means=means,
            activation_stds=stds,
            dead_neuron_counts=dead,
            gate_evaluation_details=gate,
        )
