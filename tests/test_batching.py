"""The batched meta-batch against the per-task loop, and the speed options, in float32.

Both paths must give the same losses, accuracies and meta-gradients (relative difference below
1e-4) for MAML, MAML++ and CxGrad, first and second order, training and evaluation.
"""
from __future__ import annotations

import pytest
import torch

import few_shot_learning_system
import meta_neural_network_architectures
from conftest import random_tasks, tiny_system
from data import TaskBatch
from few_shot_learning_system import MAMLFewShotClassifier

WAYS, SHOTS, QUERIES, SIZE = 3, 2, 3, 12
METHODS = {
    "maml": {},
    "maml++": dict(use_multi_step_loss_optimization=True, multi_step_loss_num_epochs=4, per_step_bn_statistics=True,
                   learnable_per_layer_per_step_inner_loop_learning_rate=True),
    "cxgrad": dict(contextual_grad=True, num_context_params=8),
}


def make_system(**overrides) -> MAMLFewShotClassifier:
    return tiny_system(ways=WAYS, shots=SHOTS, queries=QUERIES, size=SIZE, **{
        "cnn_num_filters": 6, "num_stages": 3, "number_of_training_steps_per_iter": 3,
        "number_of_evaluation_steps_per_iter": 3, "batch_size": 3, "init_inner_loop_learning_rate": 0.2, **overrides})


def make_tasks(num_tasks: int = 3) -> TaskBatch:
    return random_tasks(num_tasks, ways=WAYS, shots=SHOTS, queries=QUERIES, size=SIZE, seed=1)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def assert_same_meta_gradients(ours: dict, reference: dict) -> None:
    """The whole meta-gradient within 1e-4; each parameter within 1e-2.

    Per parameter the bound is looser because some gradients are tiny sums of cancelling float32
    terms (the first layer of CxGrad's g sees a context only one small step away from zero, and
    its gradient is 1e-7 of the others); a wrong gradient is off by far more than 1e-2.
    """
    assert set(ours) == set(reference)
    names = sorted(reference)
    for name in names:
        assert reference[name].norm() > 0, f"{name} got no meta-gradient"
        assert relative_difference(ours[name], reference[name]) < 1e-2, name
    flat = lambda gradients: torch.cat([gradients[name].flatten() for name in names])
    assert relative_difference(flat(ours), flat(reference)) < 1e-4


def train_once(**overrides):
    system = make_system(**overrides)
    metrics = system.run_train_iter(make_tasks(), epoch=1)
    gradients = {name: p.grad.clone() for name, p in system.named_parameters() if p.grad is not None}
    return system, metrics, gradients


@pytest.mark.parametrize("second_order", [False, True], ids=["first_order", "second_order"])
@pytest.mark.parametrize("method", list(METHODS))
def test_batched_training_matches_the_per_task_loop(method, second_order):
    results = {batching: train_once(task_batching=batching, second_order=second_order, **METHODS[method])
               for batching in ("loop", "batched")}
    _, loop_metrics, loop_gradients = results["loop"]
    _, batched_metrics, batched_gradients = results["batched"]
    assert abs(batched_metrics["loss"] - loop_metrics["loss"]) <= 1e-4 * abs(loop_metrics["loss"])
    assert batched_metrics["accuracy"] == pytest.approx(loop_metrics["accuracy"], abs=1e-6)
    if method == "cxgrad":
        assert any(name.startswith("context.") for name in loop_gradients)
    assert_same_meta_gradients(batched_gradients, loop_gradients)


@pytest.mark.parametrize("method", list(METHODS))
def test_batched_evaluation_matches_the_per_task_loop(method):
    outputs = {}
    for batching in ("loop", "batched"):
        outputs[batching] = make_system(task_batching=batching, **METHODS[method]).run_validation_iter(make_tasks())
    for key in ("loss", "probabilities"):
        assert relative_difference(outputs["batched"][key], outputs["loop"][key]) < 1e-4, key
    assert torch.equal(outputs["batched"]["accuracy"], outputs["loop"]["accuracy"])


@pytest.mark.parametrize("second_order", [False, True], ids=["first_order", "second_order"])
@pytest.mark.parametrize("channels_last", [True, None], ids=["everywhere", "unset"])
def test_channels_last_changes_nothing_but_the_memory_format(channels_last, second_order):
    # Unset, the CPU's batched path runs channels-last where no double backward runs through the pass.
    _, plain_metrics, plain_gradients = train_once(contextual_grad=True, channels_last=False, second_order=second_order)
    _, metrics, gradients = train_once(contextual_grad=True, channels_last=channels_last, second_order=second_order)
    assert metrics["loss"] == pytest.approx(plain_metrics["loss"], rel=1e-4)
    assert_same_meta_gradients(gradients, plain_gradients)


def test_mixed_precision_warns_and_keeps_float32_where_bf16_is_slow(monkeypatch):
    monkeypatch.setattr(few_shot_learning_system, "has_fast_bf16", lambda device: False)
    with pytest.warns(UserWarning, match="mixed_precision needs CUDA or a CPU with bf16 instructions"):
        system = make_system(mixed_precision=True)
    assert not system.use_bf16


def test_fast_bf16_devices():
    assert few_shot_learning_system.has_fast_bf16(torch.device("cuda"))
    assert not few_shot_learning_system.has_fast_bf16(torch.device("meta"))
    assert isinstance(few_shot_learning_system.has_fast_bf16(torch.device("cpu")), bool)


def test_mixed_precision_on_the_cpu_computes_the_network_in_bf16(monkeypatch):
    # bf16 autocast runs on any CPU (emulated where the instructions are missing), so this test does not
    # depend on the machine; second-order CxGrad differentiates twice through the bf16 convolutions.
    monkeypatch.setattr(few_shot_learning_system, "has_fast_bf16", lambda device: True)
    system, metrics, gradients = train_once(contextual_grad=True, second_order=True, mixed_precision=True)
    assert system.use_bf16 and not metrics["skipped"]
    assert all(torch.isfinite(gradient).all() for gradient in gradients.values())
    tasks = make_tasks()
    params = dict(system.classifier.named_parameters())
    logits = system.network(tasks.query_images, params, 0, double_backward=False)
    assert logits.dtype == torch.float32  # the losses stay float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(logits, system.classifier(tasks.query_images, params).float())
    float32_logits = system.classifier(tasks.query_images, params)
    # bf16 keeps 8 bits of mantissa: about 1% off float32 after three layers, and never bit-identical.
    assert 0 < relative_difference(logits.detach(), float32_logits.detach()) < 3e-2
    # The meta-gradient of this tiny noise task is itself a small difference of large terms, so bf16 moves
    # it a lot (37-120% relative here, by method); what bf16 does to accuracy is measured on real training
    # (docs/PERFORMANCE.md).


@pytest.mark.parametrize("second_order", [False, True], ids=["first_order", "second_order"])
def test_compiled_backbone_gives_the_same_meta_gradients(monkeypatch, second_order):
    # aot_eager runs torch.compile's whole graph capture and AOTAutograd, without code generation.
    monkeypatch.setattr(few_shot_learning_system, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    _, plain_metrics, plain_gradients = train_once(contextual_grad=True, second_order=second_order)
    system, metrics, gradients = train_once(contextual_grad=True, second_order=second_order, compile_backbone=True)
    assert system.compiled_classifier is not None
    assert not any("compiled" in key or "_orig_mod" in key for key in system.state_dict())
    assert metrics["loss"] == pytest.approx(plain_metrics["loss"], rel=1e-4)
    assert_same_meta_gradients(gradients, plain_gradients)
    evaluation = system.run_validation_iter(make_tasks())
    assert torch.isfinite(evaluation["probabilities"]).all()


def test_unset_channels_last_keeps_nchw_where_a_double_backward_runs(monkeypatch):
    """Second order on the CPU's batched path: NCHW support passes (a double backward runs through them),
    channels-last query passes; first order: channels-last throughout."""
    seen = []
    along_channels = meta_neural_network_architectures._tasks_along_channels

    def recording(images, memory_format):
        seen.append(memory_format)
        return along_channels(images, memory_format)

    monkeypatch.setattr(meta_neural_network_architectures, "_tasks_along_channels", recording)
    steps = 3
    for second_order, support_format in ((True, torch.contiguous_format), (False, torch.channels_last)):
        seen.clear()
        train_once(second_order=second_order)
        assert seen == [support_format] * steps + [torch.channels_last], second_order
