"""Adapters: Karn behind the interfaces training scripts already use.

* :mod:`karn_otel.adapters.tensorboard` — ``SummaryWriter``: change one import.
* :mod:`karn_otel.adapters.ppo` — :class:`~karn_otel.adapters.ppo.PPOLogger`: the PPO
  statistics from the tensors PPO already has, one device sync per update.
* :mod:`karn_otel.adapters.lightning` — ``KarnCallback`` for PyTorch Lightning's ``Trainer``
  (extra ``[lightning]``).
* :mod:`karn_otel.adapters.transformers` — ``KarnTrainerCallback`` for Hugging Face's
  ``Trainer`` (extra ``[transformers]``).

Each module imports only what it needs (the tensorboard shim needs neither tensorboard nor
torch; the PPO logger needs torch; the callbacks need their framework).
"""
