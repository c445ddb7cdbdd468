"""The ResNet-12 backbone: its architecture against a plain nn.Module one, and MAML, MAML++ and CxGrad on it.

Tiny widths (4 per block) and 16x16 / 32x32 images keep every test to seconds.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from conftest import random_tasks, tiny_system
from data import TaskBatch
from experiment_builder import ExperimentBuilder
from few_shot_learning_system import MAMLFewShotClassifier
from meta_neural_network_architectures import ResNet12
from utils.checkpoints import CheckpointError

WAYS, SHOTS, QUERIES, SIZE, CHANNELS = 3, 2, 2, 16, 3
WIDTHS = [4, 4, 4, 4]
METHODS = {
    "maml": {},
    "maml++": dict(use_multi_step_loss_optimization=True, multi_step_loss_num_epochs=4, per_step_bn_statistics=True,
                   learnable_per_layer_per_step_inner_loop_learning_rate=True),
    "cxgrad": dict(contextual_grad=True, num_context_params=6),
}
# The conv weights shallow to deep: per block the main path's three convs, then the 1x1 shortcut.
CONV_WEIGHTS = [f"block{b}.{unit}.conv.weight" for b in range(4)
                for unit in ("layer0", "layer1", "layer2", "shortcut")]


def make_system(**overrides) -> MAMLFewShotClassifier:
    return tiny_system(ways=WAYS, shots=SHOTS, queries=QUERIES, size=SIZE, channels=CHANNELS, dtype=torch.float64,
                       **{"backbone": "resnet12", "resnet_widths": WIDTHS, "batch_size": 3,
                          "number_of_training_steps_per_iter": 2, "number_of_evaluation_steps_per_iter": 2,
                          "init_inner_loop_learning_rate": 0.3, **overrides})


def make_tasks(num_tasks: int = 3, size: int = SIZE) -> TaskBatch:
    return random_tasks(num_tasks, ways=WAYS, shots=SHOTS, queries=QUERIES, size=size, channels=CHANNELS, seed=1,
                        dtype=torch.float64)


class ReferenceBlock(nn.Module):
    """MetaOptNet's BasicBlock without DropBlock, from torch.nn layers."""

    def __init__(self, in_channels: int, width: int, slope: float):
        super().__init__()
        conv = lambda i, o: nn.Conv2d(i, o, 3, padding=1, bias=False)
        norm = lambda: nn.BatchNorm2d(width, track_running_stats=False)
        self.conv1, self.bn1 = conv(in_channels, width), norm()
        self.conv2, self.bn2 = conv(width, width), norm()
        self.conv3, self.bn3 = conv(width, width), norm()
        self.downsample = nn.Sequential(nn.Conv2d(in_channels, width, 1, bias=False), norm())
        self.relu = nn.LeakyReLU(slope)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.max_pool2d(self.relu(out + self.downsample(x)), 2)


def reference_resnet12(slope: float) -> nn.Module:
    blocks, in_channels = [], CHANNELS
    for width in WIDTHS:
        blocks.append(ReferenceBlock(in_channels, width, slope))
        in_channels = width
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, WAYS)).double()


def reference_parameters(network: ResNet12) -> dict[str, torch.Tensor]:
    """The project's parameters under the reference's names (BatchNorm: the step-0 row)."""
    own = dict(network.named_parameters())
    mapped = {"6.weight": own["linear.weight"], "6.bias": own["linear.bias"]}  # 4 blocks, pool, flatten, head
    for block in range(4):
        units = {"layer0": ("conv1", "bn1"), "layer1": ("conv2", "bn2"), "layer2": ("conv3", "bn3"),
                 "shortcut": ("downsample.0", "downsample.1")}
        for unit, (conv, norm) in units.items():
            prefix = f"block{block}.{unit}"
            mapped[f"{block}.{conv}.weight"] = own[f"{prefix}.conv.weight"]
            mapped[f"{block}.{norm}.weight"] = own[f"{prefix}.norm.weight"][0]
            mapped[f"{block}.{norm}.bias"] = own[f"{prefix}.norm.bias"][0]
    return mapped


@pytest.mark.parametrize("size", [16, 32])
def test_forward_shapes_and_parameter_layout(size):
    network = ResNet12((CHANNELS, size, size), WAYS, widths=[4, 6, 8, 10], bn_steps=3).double()
    images = make_tasks(size=size).support_images
    assert network(images).shape == (3, WAYS * SHOTS, WAYS)
    assert network(images[0]).shape == (WAYS * SHOTS, WAYS)  # one task without the task dimension
    params = dict(network.named_parameters())
    assert params["block0.layer0.conv.weight"].shape == (4, CHANNELS, 3, 3)
    assert params["block1.layer1.conv.weight"].shape == (6, 6, 3, 3)
    assert params["block3.shortcut.conv.weight"].shape == (10, 8, 1, 1)
    assert params["block2.layer2.norm.weight"].shape == (3, 8)  # one BatchNorm row per inner step
    assert params["linear.weight"].shape == (WAYS, 10)  # global average pooling: the last width
    assert network.conv_weight_names == CONV_WEIGHTS


@pytest.mark.parametrize("slope", [0.1, 0.01])
def test_forward_matches_a_plain_torch_resnet12(slope):
    network = ResNet12((CHANNELS, SIZE, SIZE), WAYS, widths=WIDTHS, leaky_relu_slope=slope).double()
    with torch.no_grad():  # non-trivial BatchNorm parameters and head bias, so that each one is checked
        for name, param in network.named_parameters():
            if ".norm." in name or name == "linear.bias":
                param.add_(0.3 * torch.randn_like(param))
    images = make_tasks().support_images
    reference = reference_resnet12(slope)
    expected = torch.stack([functional_call(reference, reference_parameters(network), (task,), strict=True) for task in images])
    torch.testing.assert_close(network(images), expected, rtol=1e-10, atol=1e-10)


def test_per_task_weights_give_each_task_its_own_network():
    network = ResNet12((CHANNELS, SIZE, SIZE), WAYS, widths=WIDTHS).double()
    images = make_tasks().support_images
    generator = torch.Generator().manual_seed(2)
    per_task = {name: torch.stack([p + 0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype)
                                   for _ in range(3)])
                for name, p in network.named_parameters()}
    batched = network(images, per_task)
    for task in range(3):
        alone = network(images[task], {name: value[task] for name, value in per_task.items()})
        torch.testing.assert_close(batched[task], alone, rtol=1e-10, atol=1e-10)


def test_per_step_batch_norm_rows_are_selected_by_step():
    system = make_system(per_step_bn_statistics=True)
    network = system.classifier
    images = make_tasks().support_images
    with torch.no_grad():
        network.block1.shortcut.norm.bias[1].fill_(2.0)
    assert not torch.allclose(network(images, step=0), network(images, step=1))
    torch.testing.assert_close(network(images, step=7), network(images, step=1))  # clamped to the last row


@pytest.mark.parametrize("unit", ["block1.layer2", "block2.shortcut"])
def test_loss_is_invariant_to_each_conv_weights_scale(unit):
    """CxGrad's premise holds here too: every conv, the shortcut's included, is followed by BatchNorm."""
    network = make_system().classifier
    task = make_tasks(num_tasks=1)
    weight = 50 * network.get_parameter(f"{unit}.conv.weight").detach()  # keeps BatchNorm's epsilon negligible

    def loss_and_grad(scale):
        scaled = (scale * weight).requires_grad_()
        loss = F.cross_entropy(network(task.support_images[0], {f"{unit}.conv.weight": scaled}),
                               task.support_labels[0])
        return loss.item(), torch.autograd.grad(loss, scaled)[0]

    (loss_1, grad_1), (loss_7, grad_7) = loss_and_grad(1.0), loss_and_grad(7.0)
    assert loss_7 == pytest.approx(loss_1, rel=1e-8)
    torch.testing.assert_close(grad_7, grad_1 / 7.0, rtol=1e-6, atol=1e-12)


def test_cxgrad_rescales_every_conv_weight_with_one_gamma_each():
    system = make_system(**METHODS["cxgrad"])
    # 4 blocks x (3 convs + 1 shortcut conv) = 16 conv weights, so g emits 16 gammas, shallow to deep.
    assert len(CONV_WEIGHTS) == 16
    assert system.context.scaled_param_names == CONV_WEIGHTS
    assert system.context.scaling_network.layers[2].out_features == 16
    assert system.inner_loop_param_names == [*CONV_WEIGHTS, "linear.weight", "linear.bias"]  # no BatchNorm
    fast = {name: system.classifier.get_parameter(name).detach().unsqueeze(0).repeat(3, *[1] * 4)
            for name in CONV_WEIGHTS}
    rescaled, gamma = system.context.rescale(fast, torch.randn(3, 6, dtype=torch.float64))
    assert gamma.shape == (3, 16)
    for index, name in enumerate(CONV_WEIGHTS):
        torch.testing.assert_close(rescaled[name].flatten(1).norm(dim=1), gamma[:, index])
    with_bias = make_system(use_bias=True, **METHODS["cxgrad"])
    assert len(with_bias.context.scaled_param_names) == 32  # and each conv bias too, as in the official code


def test_lslr_has_rates_for_every_conv_weight_and_the_head():
    system = make_system(**METHODS["maml++"])
    assert set(system.inner_loop_optimizer.learning_rates) == {
        name.replace(".", "-") for name in [*CONV_WEIGHTS, "linear.weight", "linear.bias"]}


def meta_gradients(method: str, batching: str, second_order: bool):
    system = make_system(task_batching=batching, second_order=second_order, **METHODS[method])
    metrics = system.run_train_iter(make_tasks(), epoch=1)
    assert not metrics["skipped"]
    return metrics, {name: p.grad for name, p in system.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("second_order", [False, True], ids=["first_order", "second_order"])
@pytest.mark.parametrize("method", list(METHODS))
def test_batched_meta_gradients_equal_the_per_task_loop(method, second_order):
    loop_metrics, loop = meta_gradients(method, "loop", second_order)
    batched_metrics, batched = meta_gradients(method, "batched", second_order)
    assert batched_metrics["loss"] == pytest.approx(loop_metrics["loss"], rel=1e-12)
    assert set(batched) == set(loop)
    # Every conv weight, BatchNorm parameter and the head get a meta-gradient (and g with CxGrad).
    assert {f"classifier.{name}" for name in CONV_WEIGHTS} <= set(loop)
    assert any(name.startswith("context.") for name in loop) == (method == "cxgrad")
    for name, reference in loop.items():
        assert reference.norm() > 0, f"{name} got no meta-gradient"
        error = float((batched[name] - reference).norm() / reference.norm())
        assert error < 1e-9, f"{name}: relative error {error:.1e}"


def test_second_order_differs_from_first_order():
    _, first = meta_gradients("cxgrad", "batched", second_order=False)
    _, second = meta_gradients("cxgrad", "batched", second_order=True)
    name = "classifier.block0.layer0.conv.weight"
    assert float((first[name] - second[name]).norm() / second[name].norm()) > 1e-3


def test_tiny_experiment_trains_tests_and_refuses_another_backbone_on_resume(tiny_config):
    config = tiny_config(backbone="resnet12", resnet_widths=WIDTHS, contextual_grad=True, total_epochs=2,
                         total_iter_per_epoch=2)
    builder = ExperimentBuilder(config)
    summary = builder.run_experiment()
    assert 0.0 <= summary["ensemble_test_accuracy"] <= 1.0
    assert builder.state["epoch_rows"][-1]["train_loss_mean"] > 0
    assert isinstance(builder.model.classifier, ResNet12)
    assert len(builder.model.context.scaled_param_names) == 16

    with pytest.raises(CheckpointError, match="backbone .*'resnet12'.*'4-CONV'"):
        ExperimentBuilder(tiny_config(total_epochs=3))._resume()
    with pytest.raises(CheckpointError, match="resnet_widths"):
        ExperimentBuilder(tiny_config(backbone="resnet12", resnet_widths=[4, 4, 4, 8], contextual_grad=True,
                                      total_epochs=3))._resume()
    with pytest.raises(CheckpointError, match="leaky_relu_slope"):
        ExperimentBuilder(tiny_config(backbone="resnet12", resnet_widths=WIDTHS, contextual_grad=True,
                                      leaky_relu_slope=0.01, total_epochs=3))._resume()
