"""The algorithm against independent, hand-unrolled reference computations (float64).

The references below use a plain `nn.Sequential` (nn.Conv2d, nn.BatchNorm2d without running
statistics, ...) run through `torch.func.functional_call`, one task at a time, and follow
CXGRAD.md step by step. They share nothing with the project's code but the initial weights.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from conftest import random_tasks, tiny_system
from data import TaskBatch
from few_shot_learning_system import MAMLFewShotClassifier, multi_step_loss_weights

WAYS, SHOTS, QUERIES, SIZE, FILTERS, STAGES = 3, 2, 2, 8, 4, 2


def make_system(**overrides) -> MAMLFewShotClassifier:
    return tiny_system(ways=WAYS, shots=SHOTS, queries=QUERIES, size=SIZE, dtype=torch.float64, **{
        "cnn_num_filters": FILTERS, "num_stages": STAGES, "number_of_training_steps_per_iter": 2,
        "number_of_evaluation_steps_per_iter": 2, "batch_size": 2, "init_inner_loop_learning_rate": 0.3,
        "num_context_params": 6, **overrides})


def make_tasks(num_tasks: int = 2, seed: int = 0) -> TaskBatch:
    return random_tasks(num_tasks, ways=WAYS, shots=SHOTS, queries=QUERIES, size=SIZE, seed=seed, dtype=torch.float64)


def reference_network(activation: str = "leaky_relu") -> nn.Sequential:
    """The official conv block: conv -> BatchNorm -> leaky ReLU (slope 0.01) -> max-pool."""
    layers, channels = [], 1
    for _ in range(STAGES):
        nonlinearity = nn.LeakyReLU(0.01) if activation == "leaky_relu" else nn.ReLU()
        layers += [nn.Conv2d(channels, FILTERS, 3, padding=1, bias=False),
                   nn.BatchNorm2d(FILTERS, track_running_stats=False), nonlinearity, nn.MaxPool2d(2)]
        channels = FILTERS
    layers += [nn.Flatten(), nn.Linear(FILTERS * (SIZE >> STAGES) ** 2, WAYS)]
    return nn.Sequential(*layers).double()


def reference_names(system: MAMLFewShotClassifier) -> dict[str, str]:
    """Project parameter name -> nn.Sequential parameter name."""
    names = {"linear.weight": f"{4 * STAGES + 1}.weight", "linear.bias": f"{4 * STAGES + 1}.bias"}
    for stage in range(STAGES):
        names[f"layer{stage}.conv.weight"] = f"{4 * stage}.weight"
        names[f"layer{stage}.norm.weight"] = f"{4 * stage + 1}.weight"
        names[f"layer{stage}.norm.bias"] = f"{4 * stage + 1}.bias"
    return names


def reference_meta_loss(system, task: TaskBatch, steps: int, second_order: bool, cxgrad: bool):
    """Mean query loss over the tasks, unrolled by hand one task at a time (CXGRAD.md, 'One task')."""
    network = reference_network(system.config.activation)
    names = reference_names(system)
    own = dict(system.classifier.named_parameters())
    meta = {names[n]: (p[0] if ".norm." in n else p) for n, p in own.items()}  # BN rows: one step
    adapted_names = [names[n] for n in own if ".norm." not in n]
    conv_names = [names[f"layer{s}.conv.weight"] for s in range(STAGES)]
    alpha = system.config.init_inner_loop_learning_rate
    beta = system.config.context_params_learning_rate

    def loss(params, images, labels):
        return F.cross_entropy(functional_call(network, params, (images,)), labels)

    def rescale(fast, context):
        gamma = system.context.scaling_network(context)
        return {n: (gamma[conv_names.index(n)] * w / w.norm() if n in conv_names else w) for n, w in fast.items()}

    losses = []
    for t in range(task.num_tasks):
        support, support_labels = task.support_images[t], task.support_labels[t]
        fast = {n: meta[n] for n in adapted_names}
        frozen = {n: p for n, p in meta.items() if n not in fast}
        if cxgrad:
            context = torch.zeros(system.config.num_context_params, dtype=torch.float64, requires_grad=True)
            warmup, = torch.autograd.grad(loss({**frozen, **rescale(fast, context)}, support, support_labels),
                                          context)
            context = context - beta * warmup
        for _ in range(steps):
            if cxgrad:
                fast = rescale(fast, context)
            inputs = list(fast.values()) + ([context] if cxgrad else [])
            grads = torch.autograd.grad(loss({**frozen, **fast}, support, support_labels), inputs,
                                        create_graph=second_order, retain_graph=True)
            fast = {n: w - alpha * g for (n, w), g in zip(fast.items(), grads)}
            if cxgrad:
                context = context - beta * grads[-1]
        losses.append(loss({**frozen, **fast}, task.query_images[t], task.query_labels[t]))
    return torch.stack(losses).mean()


def system_meta_gradients(system, task, second_order: bool) -> dict[str, torch.Tensor]:
    steps = system.config.number_of_training_steps_per_iter
    system.zero_grad(set_to_none=True)
    result = system.inner_loop(task, steps, second_order, np.eye(steps)[-1])
    result.query_loss.mean().backward()
    return {n: p.grad.clone() for n, p in system.named_parameters() if p.grad is not None}


def reference_meta_gradients(system, task, second_order: bool, cxgrad: bool) -> dict[str, torch.Tensor]:
    params = dict(system.named_parameters())
    loss = reference_meta_loss(system, task, system.config.number_of_training_steps_per_iter, second_order, cxgrad)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: g for n, g in zip(params, grads) if g is not None}


def assert_same_gradients(ours, reference, tolerance=1e-9):
    assert set(ours) == set(reference)
    for name in reference:
        error = (ours[name] - reference[name]).norm() / reference[name].norm().clamp_min(1e-30)
        assert error < tolerance, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.parametrize("cxgrad", [False, True], ids=["maml", "cxgrad"])
@pytest.mark.parametrize("batching", ["batched", "loop"])
def test_meta_gradients_match_hand_unrolled_reference(second_order, cxgrad, batching):
    system = make_system(contextual_grad=cxgrad, task_batching=batching)
    assert system.config.activation == "leaky_relu"  # the official default
    task = make_tasks()
    ours = system_meta_gradients(system, task, second_order)
    reference = reference_meta_gradients(system, task, second_order, cxgrad)
    assert_same_gradients(ours, reference)
    if cxgrad:
        for name, grad in ours.items():
            if name.startswith("context."):
                assert grad.abs().sum() > 0, f"{name} receives no meta-gradient"


@pytest.mark.parametrize("cxgrad", [False, True], ids=["maml", "cxgrad"])
def test_relu_activation_matches_a_relu_reference(cxgrad):
    system = make_system(contextual_grad=cxgrad, activation="relu")
    task = make_tasks()
    ours = system_meta_gradients(system, task, second_order=True)
    assert_same_gradients(ours, reference_meta_gradients(system, task, second_order=True, cxgrad=cxgrad))
    leaky = make_system(contextual_grad=cxgrad)
    assert not torch.allclose(leaky.classifier(task.support_images), system.classifier(task.support_images))


@pytest.mark.parametrize("cxgrad", [False, True], ids=["maml", "cxgrad"])
def test_second_order_differs_from_first_order_and_matches_finite_differences(cxgrad):
    system = make_system(contextual_grad=cxgrad)
    task = make_tasks()
    second = system_meta_gradients(system, task, second_order=True)
    first = system_meta_gradients(system, task, second_order=False)
    params = dict(system.named_parameters())
    generator = torch.Generator().manual_seed(1)
    direction = {n: torch.randn(p.shape, generator=generator, dtype=p.dtype) for n, p in params.items() if n in second}

    def loss_at(epsilon):
        with torch.no_grad():
            for n, v in direction.items():
                params[n].add_(epsilon * v)
        steps = system.config.number_of_training_steps_per_iter
        value = system.inner_loop(task, steps, True, np.eye(steps)[-1]).query_loss.mean().item()
        with torch.no_grad():
            for n, v in direction.items():
                params[n].sub_(epsilon * v)
        return value

    epsilon = 1e-7  # small: ReLU and max-pool kinks are near at larger steps
    numeric = (loss_at(epsilon) - loss_at(-epsilon)) / (2 * epsilon)
    analytic_second = sum((second[n] * v).sum().item() for n, v in direction.items())
    analytic_first = sum((first[n] * v).sum().item() for n, v in direction.items())
    assert abs(analytic_second - numeric) < 1e-5 * max(1.0, abs(numeric))
    assert abs(analytic_first - numeric) > 1e-3 * max(1.0, abs(numeric)), "first order should be an approximation"


def randomly_scaled_copies(system, tasks: int) -> dict:
    """Per-task copies of the inner-loop parameters, each task's scaled differently (none of norm 0)."""
    generator = torch.Generator().manual_seed(3)
    return {n: (p.detach() + 0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype)).unsqueeze(0).repeat(
                tasks, *[1] * p.dim()) * (1 + torch.rand(tasks, generator=generator).double().view(-1, *[1] * p.dim()))
            for n, p in system.classifier.named_parameters() if n in system.inner_loop_param_names}


# What the official code rescales: every inner-loop tensor but the head, one gamma each, in its order.
RESCALED_SETS = {
    "default": ({}, [f"layer{s}.conv.weight" for s in range(STAGES)]),
    "use_bias": ({"use_bias": True}, [f"layer{s}.conv.{k}" for s in range(STAGES) for k in ("weight", "bias")]),
    "inner_loop_bn": ({"enable_inner_loop_optimizable_bn_params": True},
                      [f"layer{s}.{k}" for s in range(STAGES) for k in ("conv.weight", "norm.bias", "norm.weight")]),
}


@pytest.mark.parametrize("setting", list(RESCALED_SETS))
def test_rescaled_backbone_tensors_have_norm_gamma_and_head_is_untouched(setting):
    overrides, expected_names = RESCALED_SETS[setting]
    system = make_system(contextual_grad=True, **overrides)
    assert system.context.scaled_param_names == expected_names
    tasks = 3
    fast = randomly_scaled_copies(system, tasks)
    assert set(fast) == set(expected_names) | {"linear.weight", "linear.bias"}
    context = torch.randn(tasks, system.config.num_context_params, dtype=torch.float64)
    rescaled, gamma = system.context.rescale(fast, context)
    assert gamma.shape == (tasks, len(expected_names)) and bool((gamma > 0).all())
    for index, name in enumerate(expected_names):
        norms = rescaled[name].flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, gamma[:, index], rtol=1e-12, atol=0)
        directions = rescaled[name].flatten(1) / norms[:, None]
        torch.testing.assert_close(directions, fast[name].flatten(1) / fast[name].flatten(1).norm(dim=1)[:, None])
    assert rescaled["linear.weight"] is fast["linear.weight"]
    assert rescaled["linear.bias"] is fast["linear.bias"]


def test_inner_loop_batch_norm_parameters_are_one_row_for_all_steps():
    """As in the official code: adapting BatchNorm in the inner loop replaces the per-step rows by one,
    and the run says that per_step_bn_statistics is then ignored."""
    with pytest.warns(UserWarning, match="per_step_bn_statistics has no effect with "
                                         "enable_inner_loop_optimizable_bn_params"):
        system = make_system(contextual_grad=True, enable_inner_loop_optimizable_bn_params=True,
                             per_step_bn_statistics=True)
    assert system.classifier.layer0.norm.weight.shape == (1, FILTERS)


@pytest.mark.parametrize("setting", ["use_bias", "inner_loop_bn"])
def test_cxgrad_trains_with_zero_initialised_rescaled_tensors(setting):
    """Conv biases and BatchNorm shifts start at zero: they stay zero when rescaled, never NaN."""
    system = make_system(contextual_grad=True, **RESCALED_SETS[setting][0])
    metrics = system.run_train_iter(make_tasks(), epoch=0)
    # The zero tensors' meta-gradients are of ordinary size (a clamped-norm division gave ~1e11).
    assert max(p.grad.abs().max().item() for p in system.parameters() if p.grad is not None) < 1e3
    assert not metrics["skipped"] and np.isfinite(metrics["loss"])
    metrics = system.run_train_iter(make_tasks(), epoch=0)
    assert not metrics["skipped"] and np.isfinite(metrics["loss"])
    assert all(torch.isfinite(p).all() for p in system.parameters())


def test_loss_is_scale_invariant_while_gradient_scales_by_inverse():
    system = make_system()
    task = make_tasks(num_tasks=1)
    # A large base weight keeps BatchNorm's epsilon (1e-5, which does not scale) negligible.
    weight = 50 * system.classifier.layer1.conv.weight.detach()

    def loss_and_grad(scale):
        scaled = (scale * weight).requires_grad_()
        logits = system.classifier(task.support_images[0], {"layer1.conv.weight": scaled})
        loss = F.cross_entropy(logits, task.support_labels[0])
        return loss.item(), torch.autograd.grad(loss, scaled)[0]

    loss_1, grad_1 = loss_and_grad(1.0)
    loss_7, grad_7 = loss_and_grad(7.0)
    assert loss_7 == pytest.approx(loss_1, rel=1e-8)
    torch.testing.assert_close(grad_7, grad_1 / 7.0, rtol=1e-6, atol=1e-12)
    assert not torch.allclose(grad_7, grad_1, rtol=0.5)


def test_context_starts_at_zero_for_every_task():
    system = make_system(contextual_grad=True)
    seen = []
    network = system.context.scaling_network
    original = network.forward
    network.forward = lambda context: (seen.append(context.detach().clone()), original(context))[1]
    calls_per_iteration = 1 + system.config.number_of_training_steps_per_iter  # warm-up + steps
    for seed in range(2):
        system.run_train_iter(make_tasks(seed=seed), epoch=0)
    assert len(seen) == 2 * calls_per_iteration
    for first in (0, calls_per_iteration):
        assert seen[first].shape == (2, system.config.num_context_params)
        assert bool((seen[first] == 0).all())
        assert bool((seen[first + 1] != 0).any()), "the warm-up step should move the context"


def test_evaluation_runs_first_order_and_leaves_no_gradients():
    system = make_system(contextual_grad=True)
    outputs = system.run_validation_iter(make_tasks())
    assert outputs["probabilities"].shape == (2, WAYS * QUERIES, WAYS)
    torch.testing.assert_close(outputs["probabilities"].sum(-1), torch.ones(2, WAYS * QUERIES, dtype=torch.float64))
    assert all(p.grad is None for p in system.parameters())


@pytest.mark.parametrize("epoch", [0, 5, 20])
def test_multi_step_loss_importance_vector_matches_the_formula(epoch):
    steps, msl_epochs = 5, 10
    weights = multi_step_loss_weights(steps, epoch, msl_epochs)
    decay = 1.0 / steps / msl_epochs
    expected_early = max(1.0 / steps - epoch * decay, 0.03 / steps)
    expected_last = min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * 0.03 / steps)
    np.testing.assert_allclose(weights[:-1], expected_early)
    assert weights[-1] == pytest.approx(expected_last)
    known = {0: [0.2] * 5, 5: [0.1] * 4 + [0.6], 20: [0.006] * 4 + [0.976]}
    np.testing.assert_allclose(weights, known[epoch], atol=1e-12)


def test_multi_step_loss_is_used_only_during_its_epochs():
    system = make_system(use_multi_step_loss_optimization=True, multi_step_loss_num_epochs=3)
    np.testing.assert_allclose(system.query_step_weights(0), [0.5, 0.5])
    np.testing.assert_allclose(system.query_step_weights(3), [0.0, 1.0])


def test_derivative_order_annealing():
    system = make_system(second_order=True, first_order_to_second_order_epoch=2)
    assert [system.use_second_order(epoch) for epoch in range(5)] == [False, False, False, True, True]


def test_lslr_rates_are_per_layer_per_step_and_meta_learned():
    system = make_system(learnable_per_layer_per_step_inner_loop_learning_rate=True)
    rates = system.inner_loop_optimizer.learning_rates
    assert set(rates) == {n.replace(".", "-") for n in system.inner_loop_param_names}
    assert all(r.shape == (2,) for r in rates.values())
    system.run_train_iter(make_tasks(), epoch=0)
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in rates.values())
    assert any(not torch.allclose(r, torch.full_like(r, 0.3)) for r in rates.values())


def test_per_step_batch_norm_weights_take_the_step_row():
    system = make_system(per_step_bn_statistics=True)
    norm = system.classifier.layer0.norm
    assert norm.weight.shape == (2, FILTERS)
    task = make_tasks(num_tasks=1)
    with torch.no_grad():
        norm.bias[1].fill_(3.0)
    step0 = system.classifier(task.support_images, step=0)
    step1 = system.classifier(task.support_images, step=1)
    assert not torch.allclose(step0, step1)
    torch.testing.assert_close(system.classifier(task.support_images, step=5), step1)  # clamped
