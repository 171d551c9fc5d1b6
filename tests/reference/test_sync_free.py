"""No host-device sync in the per-batch path (standard and research mode), and torch.compile works.

On the CPU there is no device to wait for, so syncs are counted instead: every Tensor
method that would move a value to the host (item, tolist, __float__, __int__, __bool__,
cpu, numpy) is patched to count its calls while the batch loop runs. The optimiser's
own bookkeeping (torch.optim reads its CPU step counters) is not Karn's and is excluded
by call site. On a GPU the same loop runs under torch.cuda.set_sync_debug_mode("error").
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch

import karn_otel
from karn_otel.config import KarnConfig
from karn_otel.contracts import OperatingMode, SeedStage
from karn_otel.contracts import TelemetryEventType as ET
from karn_otel.reference.trainer import ReferenceTrainer, RunConfig
from karn_otel.sinks import MemorySink

SYNC_METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")


@contextlib.contextmanager
def count_syncs():
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def wrap(name, fn):
        def counted(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if "/torch/optim/" not in caller:
                calls.append(f"{name} from {caller}:{sys._getframe(1).f_lineno}")
            return fn(self, *a, **k)

        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def _trainer(research: bool, **kw) -> ReferenceTrainer:
    sink = MemorySink()
    # Research mode as configured: with no trigger engine (processors=False), the configured
    # mode is the mode (the engine is its only other owner).
    mode = OperatingMode.RESEARCH if research else OperatingMode.STANDARD
    karn_otel.configure(KarnConfig(out_dir=None, console="off", strict=True, mode=mode), sinks=[sink], processors=False)
    cfg = RunConfig(
        epochs=kw.pop("epochs", 6), warmup_epochs=0, min_training_epochs=1, blend_epochs=1, plateau_threshold=1.0, **kw
    )
    t = ReferenceTrainer(cfg)
    t.sink = sink  # type: ignore[attr-defined]
    return t


@pytest.mark.parametrize("research", [False, True], ids=["standard", "research"])
def test_batch_loop_has_no_sync(research):
    t = _trainer(research)
    t.run()  # grows seeds: isolated (TRAINING) and blending slots are both exercised
    stages = {s.stage for s in t.model.slots.values()}
    assert SeedStage.BLENDING in stages or SeedStage.PROBATIONARY in stages, stages
    # Add an isolated seed too, so the metered isolation gate is on the measured path.
    late = next(s for s in t.model.slots.values() if s.seed is None)
    seed = late.germinate("norm", t.host_params, 0.0)
    late.stage = SeedStage.TRAINING
    t.seed_opts[late.slot_id] = torch.optim.Adam(seed.parameters())
    t.update_dense_window(99)
    assert (t.dense is not None) == research
    with count_syncs() as calls:
        t.train_batches(99)
    assert calls == [], f"{len(calls)} host-device syncs in the batch loop: {calls[:5]}"
    assert len(t.data.x_train) // t.cfg.batch_size > 10, "many batches were measured"


def test_counter_detects_a_sync():
    with count_syncs() as calls:
        torch.ones(3).sum().item()
    assert calls and calls[0].startswith("item")


def test_research_mode_produces_a_dense_trace():
    t = _trainer(research=True)
    t.run()
    traces = [e.payload for e in t.sink.events if e.event_type is ET.DENSE_TRACE]
    assert len(traces) == 1
    tr = traces[0]
    assert tr.trigger_reason == "force_dense" and (tr.window_start_epoch, tr.window_end_epoch) == (1, 6)
    n_batches = -(-len(t.data.x_train) // t.cfg.batch_size)
    assert len(tr.batch_metrics) == 6 * n_batches
    assert set(tr.gradient_histograms) >= {"host"} and len(tr.gradient_histograms["host"]) == 48
    assert sum(tr.gradient_histograms["host"]) > 0
    assert set(tr.activation_means) == {"block1", "block2", "block3"}
    assert all(v >= 0 for v in tr.activation_stds.values())
    assert "block1.0.weight" in tr.gradient_flow and tr.gradient_flow["block1.0.weight"] > 0


def test_compiled_model_trains_with_hooks_attached():
    t = _trainer(research=True, compile="aot_eager")
    result = t.run()
    traces = [e.payload for e in t.sink.events if e.event_type is ET.DENSE_TRACE]
    assert traces and traces[0].activation_means, "hooks fired under torch.compile"
    assert 0 <= result.final_val_accuracy <= 1
