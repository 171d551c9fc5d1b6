"""The only part of Karn that touches tensors and modules.

Everything here keeps values on the device and leaves materialisation (the one host-device
sync) to an explicit flush, so the per-batch path never blocks on the accelerator:

* ``accumulate``: per-batch training metrics (EpochAccumulator), one sync per epoch;
* ``diagnostics``: dense-trace collection (gradient histograms, flow, activations);
* ``ablation``: counterfactual evaluators (generic and shared-prefix);
* ``ppo``: PPO update statistics, one sync per update;
* ``collectives``: every torch.distributed call (all-gathers, process groups, spawn context);
* ``checkpoints``: state-dict comparison for ``karn replay``.
"""
