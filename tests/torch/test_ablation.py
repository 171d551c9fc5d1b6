"""The two counterfactual evaluators agree, and leave the model as they found it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from karn_otel.contracts import SeedStage
from karn_otel.reference.data import load_digits_data
from karn_otel.reference.host import HostCNN
from karn_otel.torch.ablation import evaluate_configurations, evaluate_shared_prefix


@pytest.fixture(scope="module")
def model_and_data():
    torch.manual_seed(0)
    model = HostCNN((4, 8, 16))
    for sid, bp in zip(model.slots, ("conv_light", "attention", "norm")):
        slot = model.slots[sid]
        slot.germinate(bp, model.host_params, 0.0)
        for p in slot.seed.parameters():
            torch.nn.init.normal_(p, std=0.5)  # seeds that actually change the output
        slot.stage, slot.alpha = SeedStage.BLENDING, 0.7
    d = load_digits_data(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for i in range(60):  # a host that predicts something, so switching seeds changes answers
        idx = torch.arange(i * 64, (i + 1) * 64) % d.x_train.shape[0]
        loss = torch.nn.functional.cross_entropy(model(d.x_train[idx]), d.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.slots["mid"].stage = SeedStage.TRAINING  # an isolated seed: never switched
    return model, d


@pytest.mark.parametrize("batch_leaves", [False, True], ids=["leaves-apart", "leaves-batched"])
@pytest.mark.parametrize("active", [("early", "mid", "late"), ("early", "late"), ("late",)])
def test_shared_prefix_equals_generic(model_and_data, active, batch_leaves):
    model, d = model_and_data
    if "mid" in active:
        model.slots["mid"].stage = SeedStage.BLENDING
    try:
        configs = list(itertools.product([True, False], repeat=len(active)))
        generic = evaluate_configurations(model, model.slots, active, configs, d.x_val, d.y_val, batch_size=100)
        slots = [model.slots[s] for s in model.slots]
        branching = [s in active for s in model.slots]
        shared = evaluate_shared_prefix(
            model,
            model.segments(),
            slots,
            branching,
            configs,
            d.x_val,
            d.y_val,
            batch_size=100,
            batch_leaves=batch_leaves,
        )
    finally:
        model.slots["mid"].stage = SeedStage.TRAINING
    accs = set()
    for (c1, l1), (c2, l2) in zip(generic, shared):
        assert np.array_equal(c1, c2)
        np.testing.assert_allclose(l1, l2, rtol=1e-5, atol=1e-6)
        accs.add(c1.mean())
    assert len(accs) > 1, "the seeds must matter, or agreement proves nothing"


def test_only_requested_configurations_in_request_order(model_and_data):
    model, d = model_and_data
    slots = [model.slots[s] for s in model.slots]
    branching = [True, False, True]
    configs = [(False, True), (True, True)]
    out = evaluate_shared_prefix(model, model.segments(), slots, branching, configs, d.x_val, d.y_val)
    ref = evaluate_configurations(model, model.slots, ["early", "late"], configs, d.x_val, d.y_val)
    assert len(out) == 2
    for (a, _), (b, _) in zip(out, ref):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("fn", ["generic", "shared"])
def test_training_state_restored_exactly(model_and_data, fn):
    model, d = model_and_data
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    alphas = {s: model.slots[s].alpha for s in model.slots}
    configs = [(True, False), (False, False)]
    if fn == "generic":
        evaluate_configurations(model, model.slots, ["early", "late"], configs, d.x_val, d.y_val)
    else:
        evaluate_shared_prefix(
            model,
            model.segments(),
            [model.slots[s] for s in model.slots],
            [True, False, True],
            configs,
            d.x_val,
            d.y_val,
        )
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {s: model.slots[s].alpha for s in model.slots} == alphas
    assert all(model.slots[s]._forced_alpha is None for s in model.slots)


def test_bad_configuration_length_is_a_clear_error(model_and_data):
    model, d = model_and_data
    with pytest.raises(ValueError, match="has 1 entries for 2 switched slots"):
        evaluate_shared_prefix(
            model,
            model.segments(),
            [model.slots[s] for s in model.slots],
            [True, False, True],
            [(True,)],
            d.x_val,
            d.y_val,
        )
    with pytest.raises(ValueError, match="has 1 entries for 2 slots"):
        evaluate_configurations(model, model.slots, ["early", "late"], [(True,)], d.x_val, d.y_val)
