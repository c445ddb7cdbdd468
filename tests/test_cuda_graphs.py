"""utils/cuda_graphs.py: what can be checked without a GPU. The capture itself (a real CUDA graph against
eager, losses and meta-gradients within float32 rounding) is checked by benchmarks/gpu_checks.sh."""
from __future__ import annotations

import pytest
import torch

from conftest import random_tasks
from few_shot_learning_system import MAMLFewShotClassifier
from utils.config import load_config
from utils.cuda_graphs import CapturedMetaGradient, captured_meta_gradient_for


class ReplayingGraph:
    """A CUDA graph's contract on the CPU: a replay reruns what was recorded, writing its results into the
    tensors of the capture (the outputs and the gradients), never into new ones."""

    def __init__(self, parameters):
        self.parameters = parameters

    def warm_up(self, run):
        run()

    def capture(self, record):
        self.record = record
        self.outputs = record()
        self.gradients = [p.grad for p in self.parameters]
        return self.outputs

    def replay(self):
        held = [p.grad for p in self.parameters]
        assert all(a is b for a, b in zip(held, self.gradients)), "the parameters must hold the capture's gradients"
        outputs = self.record()
        for static, new in zip(self.outputs, outputs):
            static.copy_(new)
        for parameter, static in zip(self.parameters, self.gradients):
            static.copy_(parameter.grad)
            parameter.grad = static


def tasks(config, seed):
    return random_tasks(config.batch_size, ways=config.num_classes_per_set, shots=config.num_samples_per_class,
                        queries=config.num_target_samples, size=config.image_height, seed=seed)


def models(config_overrides):
    config = load_config(overrides={"device": "cpu", "batch_size": 2, "num_classes_per_set": 3,
                                    "num_samples_per_class": 1, "num_target_samples": 2, "image_height": 12,
                                    "image_width": 12, "image_channels": 1, "cnn_num_filters": 4,
                                    "num_stages": 2, "number_of_training_steps_per_iter": 2,
                                    "contextual_grad": True, **config_overrides})
    built = []
    for _ in range(2):
        torch.manual_seed(0)
        built.append(MAMLFewShotClassifier(config, torch.device("cpu")))
    eager, captured = built
    trained = [p for p in captured.parameters() if p.requires_grad]

    def compute(key, task):
        weights, second_order = key
        losses, correct, _ = captured.meta_gradient(task, torch.tensor(weights).numpy(), second_order)
        return losses, correct

    captured.captured_meta_gradient = CapturedMetaGradient(compute, trained, torch.device("cpu"),
                                                           graph_factory=lambda: ReplayingGraph(trained))
    return eager, captured


def test_replays_train_exactly_like_the_eager_iterations():
    """Over epochs whose multi-step-loss weights differ (one capture each), with a statistics-logging
    iteration in between that runs eagerly and replaces the gradients."""
    eager, captured = models({"use_multi_step_loss_optimization": True, "multi_step_loss_num_epochs": 2,
                              "second_order": True})
    for iteration, epoch in enumerate([0, 0, 1, 1, 2, 2]):
        task = tasks(eager.config, seed=iteration)
        eager.config.log_inner_loop_statistics = iteration == 3  # one config object, shared by both
        expected, got = eager.run_train_iter(task, epoch), captured.run_train_iter(task, epoch)
        assert (got["loss"], got["accuracy"], got["skipped"]) == (expected["loss"], expected["accuracy"], False)
    for (name, mine), theirs in zip(captured.named_parameters(), eager.parameters()):
        assert torch.equal(mine, theirs), name
    # Epochs 0, 1 and 2 weight the steps differently (the last two alike: the multi-step loss has ended).
    assert captured.captured_meta_gradient.captures == 3


def test_a_new_shape_or_order_is_recorded_anew_and_a_same_one_is_not():
    _, captured = models({})
    capture = captured.captured_meta_gradient
    captured.run_train_iter(tasks(captured.config, seed=0), 0)
    captured.run_train_iter(tasks(captured.config, seed=1), 0)
    assert capture.captures == 1
    captured.config.batch_size = 3  # another meta-batch size: other shapes
    captured.run_train_iter(tasks(captured.config, seed=2), 0)
    assert capture.captures == 2
    other_order = (tuple(captured.query_step_weights(0)), not captured.use_second_order(0))
    capture(other_order, tasks(captured.config, seed=3))
    assert capture.captures == 3


def test_cuda_graphs_is_ignored_with_a_warning_where_it_cannot_run():
    config = load_config(overrides={"device": "cpu", "cuda_graphs": True, "cnn_num_filters": 4})
    with pytest.warns(UserWarning, match="cuda_graphs is ignored: it needs CUDA and this run is on the cpu"):
        model = MAMLFewShotClassifier(config, torch.device("cpu"))
    assert model.captured_meta_gradient is None
    assert captured_meta_gradient_for(model, False, torch.device("cuda"), distributed=False) is None
    with pytest.warns(UserWarning, match="all-reduced between ranks"):
        assert captured_meta_gradient_for(model, True, torch.device("cuda"), distributed=True) is None
