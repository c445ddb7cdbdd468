"""The meta-learner: MAML, MAML++ and CxGrad as one inner loop with small, named pieces.

- the update rule: `GradientDescentLearningRule` (MAML) or `LSLRGradientDescentLearningRule` (MAML++);
- the weight transform: none (MAML, MAML++) or `ContextualGradientScaling` (CxGrad);
- the query-loss weights per step: the last step only, or MAML++'s annealed multi-step loss.

`inner_loop` is a function of (meta-parameters, tasks) that returns the adapted parameters and the
losses; the outer loop (`run_train_iter`) averages the query losses over the tasks and steps Adam.
The method is specified in docs/CXGRAD.md; comments cite its steps. docs/METHOD.md describes this code.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data import TaskBatch
from inner_loop_optimizers import GradientDescentLearningRule, LSLRGradientDescentLearningRule
from meta_neural_network_architectures import ContextScalingNetwork, build_backbone
from utils.backend import resolve_memory_formats, resolve_task_batching
from utils.config import ExperimentConfig
from utils.cuda_graphs import captured_meta_gradient_for
from utils.inner_loop_statistics import InnerLoopRecorder, InnerLoopStatistics
from utils.nonfinite import finiteness_probe, poison_gradients_if_nonfinite

# torch.compile's backend for `compile_backbone` (tests swap in a cheaper one).
COMPILE_BACKEND = "inductor"


def multi_step_loss_weights(num_steps: int, epoch: int, multi_step_loss_num_epochs: int) -> np.ndarray:
    """MAML++'s per-step importance of the query loss (MSL) at `epoch`.

    Uniform (1/N) at epoch 0; every step but the last decays by 1/N/msl_epochs per epoch down to
    0.03/N, and the last step takes what they lose, up to 1 - (N-1)*0.03/N.
    """
    weights = np.full(num_steps, 1.0 / num_steps)
    decay = 1.0 / num_steps / multi_step_loss_num_epochs
    floor = 0.03 / num_steps
    weights[:-1] = np.maximum(weights[:-1] - epoch * decay, floor)
    weights[-1] = min(weights[-1] + epoch * (num_steps - 1) * decay, 1.0 - (num_steps - 1) * floor)
    return weights


def last_step_only(num_steps: int) -> np.ndarray:
    weights = np.zeros(num_steps)
    weights[-1] = 1.0
    return weights


def per_task_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of each task: logits [T, B, classes], labels [T, B] -> [T]."""
    tasks, batch, classes = logits.shape
    losses = F.cross_entropy(logits.reshape(tasks * batch, classes), labels.reshape(-1), reduction="none")
    return losses.view(tasks, batch).mean(dim=1)


class ContextualGradientScaling(nn.Module):
    """CxGrad (CXGRAD.md): task context phi -> gamma = g(phi); theta_l <- gamma_l * theta_l / ||theta_l||_F.

    Because BatchNorm follows every conv, fixing a conv weight's norm at gamma_l leaves the loss
    unchanged but scales that layer's inner-loop gradient by ||theta_l|| / gamma_l, task by task.

    As in the official code, every inner-loop tensor but the head is rescaled, one gamma each: the conv
    weights, and also the conv biases with `use_bias` and the BatchNorm shift and scale with
    `enable_inner_loop_optimizable_bn_params`. A conv bias is cancelled by the BatchNorm after it, but
    the BatchNorm scale and shift are not scale-invariant: rescaling them changes the function too.
    """

    # A tensor of norm zero (a conv bias or BatchNorm shift at initialisation) has no direction to
    # rescale: it passes through unscaled, gradient 1, where the official code divides by zero and trains on
    # NaN. (Dividing by a clamped norm instead would keep it zero but scale its meta-gradient by 1e12.)
    ZERO_NORM = 1e-12

    def __init__(self, num_context_params: int, scaled_param_names: list[str], context_learning_rate: float):
        super().__init__()
        self.scaled_param_names = list(scaled_param_names)
        self.context_learning_rate = context_learning_rate
        self.scaling_network = ContextScalingNetwork(num_context_params, len(scaled_param_names))

    def initial_context(self, num_tasks: int) -> Tensor:
        """Step 1: a fresh zero context for every task."""
        like = self.scaling_network.layers[0].weight
        return torch.zeros(num_tasks, self.scaling_network.num_context_params, dtype=like.dtype,
                           device=like.device, requires_grad=True)

    def rescale(self, fast_params: dict[str, Tensor], context: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Steps 2 and 3a: each backbone tensor rescaled to Frobenius norm gamma; the head untouched."""
        gamma = self.scaling_network(context)  # [T, number of scaled tensors]
        rescaled = dict(fast_params)
        for index, name in enumerate(self.scaled_param_names):
            weight = fast_params[name]  # [T, ...]: one copy per task
            norm = weight.flatten(1).norm(dim=1).view(-1, *([1] * (weight.dim() - 1)))
            scaled = gamma[:, index].view_as(norm) * weight / norm.clamp_min(self.ZERO_NORM)
            rescaled[name] = torch.where(norm > 0, scaled, weight)
        return rescaled, gamma

    def warm_up(self, context: Tensor, fast_params: dict[str, Tensor],
                support_loss: Callable[[dict[str, Tensor]], Tensor]) -> Tensor:
        """Step 2: one step of phi on the support loss, first order: the outer loop does not
        differentiate this step (g still learns through every later use of g(phi))."""
        rescaled, _ = self.rescale(fast_params, context)
        context_grad, = torch.autograd.grad(support_loss(rescaled).sum(), context)
        return self.step(context, context_grad)

    def step(self, context: Tensor, context_grad: Tensor) -> Tensor:
        """Step 3d: phi <- phi - beta * dL/dphi."""
        return context - self.context_learning_rate * context_grad


@dataclass
class InnerLoopResult:
    adapted_params: dict[str, Tensor]
    query_loss: Tensor  # [T], weighted over the steps, in the graph of the meta-parameters
    query_logits: Tensor  # [T, queries, classes] after the last step
    statistics: Optional[InnerLoopStatistics] = None  # with log_inner_loop_statistics, in training


def has_fast_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast pays on `device`: any CUDA GPU, or a CPU whose oneDNN has bf16 instructions
    (AVX512-BF16 or AMX); elsewhere bf16 convolutions are emulated and slower than float32."""
    if device.type == "cuda":
        return True
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without the query
        return False


def _keep_graph(tensor: Tensor) -> Tensor:
    """Meta-training: adapted tensors stay in the graph of the meta-parameters."""
    return tensor


def _evaluation_leaf(tensor: Tensor) -> Tensor:
    """Evaluation: no graph to the meta-parameters or across inner steps; each adapted tensor is a
    fresh leaf whose gradient the next step takes."""
    return tensor.detach().requires_grad_()


def keep_local_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """The gradient reducer of a single process: its gradients already are the meta-gradient."""


class MAMLFewShotClassifier(nn.Module):
    """Backbone, inner-loop rule, optional CxGrad scaling, and the outer Adam optimiser."""

    def __init__(self, config: ExperimentConfig, device: torch.device,
                 gradient_reducer: Optional[Callable[[Iterable[nn.Parameter]], None]] = None):
        super().__init__()
        self.config = config
        self.device = device
        # Called on the parameters between backward and the optimizer step: under torchrun it averages
        # the meta-gradients over the ranks (utils/distributed.py); alone, there is nothing to do.
        self.gradient_reducer = gradient_reducer or keep_local_gradients
        self.classifier = build_backbone(config)
        # Every backbone names its BatchNorm parameters '*.norm.*'; they adapt only when configured.
        self.inner_loop_param_names = [
            name for name, param in self.classifier.named_parameters()
            if param.requires_grad and (config.enable_inner_loop_optimizable_bn_params or ".norm." not in name)
        ]
        if config.learnable_per_layer_per_step_inner_loop_learning_rate:
            self.inner_loop_optimizer = LSLRGradientDescentLearningRule(
                self.inner_loop_param_names, config.number_of_training_steps_per_iter,
                config.init_inner_loop_learning_rate)
        else:
            self.inner_loop_optimizer = GradientDescentLearningRule(config.init_inner_loop_learning_rate)
        self.context: Optional[ContextualGradientScaling] = None
        if config.contextual_grad:
            self.context = ContextualGradientScaling(
                config.num_context_params, self.classifier.backbone_names(self.inner_loop_param_names),
                config.context_params_learning_rate)
        self.to(device)
        self._configure_speed(config, device)
        self.optimizer = torch.optim.Adam(
            [p for p in self.parameters() if p.requires_grad], lr=config.meta_learning_rate,
            weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=config.total_epochs, eta_min=config.min_learning_rate)
        self.captured_meta_gradient = captured_meta_gradient_for(
            self, config.cuda_graphs, device, distributed=self.gradient_reducer is not keep_local_gradients)

    def _configure_speed(self, config: ExperimentConfig, device: torch.device) -> None:
        """Speed options of this model; none of them changes what is computed, only how (and bf16 how
        precisely). Process-wide settings belong to utils/backend.py, configured once at start-up."""
        self.task_batching = resolve_task_batching(config, device)
        self.memory_formats = resolve_memory_formats(config, device)
        self.use_bf16 = config.mixed_precision and has_fast_bf16(device)
        if config.mixed_precision and not self.use_bf16:
            warnings.warn("mixed_precision needs CUDA or a CPU with bf16 instructions (AVX512-BF16 or AMX), "
                          f"which this {device.type} lacks; this run computes in float32")
        # A plain function, not a submodule: the compiled wrapper must not appear in the state dict.
        # AOTAutograd has no double backward, so second-order steps keep the eager network.
        self.compiled_classifier: Optional[Callable[..., Tensor]] = None
        if config.compile_backbone:
            self.compiled_classifier = torch.compile(self.classifier.forward, backend=COMPILE_BACKEND)

    def network(self, images: Tensor, params: dict[str, Tensor], step: int, double_backward: bool) -> Tensor:
        """The backbone's logits; under bf16 autocast they come back in float32 for the losses."""
        forward = self.classifier
        if self.compiled_classifier is not None and not double_backward:
            forward = self.compiled_classifier
        memory_format = self.memory_formats.double_backward if double_backward else self.memory_formats.single_backward
        if not self.use_bf16:
            return forward(images, params, step, memory_format)
        # Autocast's cache of cast weights must not outlive a CUDA graph's capture (PyTorch's rule).
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                            cache_enabled=self.captured_meta_gradient is None):
            logits = forward(images, params, step, memory_format)
        return logits.float()

    # ------------------------------------------------------------------ the inner loop
    def inner_loop(self, task: TaskBatch, num_steps: int, second_order: bool, query_step_weights: np.ndarray,
                   track_meta_graph: bool = True) -> InnerLoopResult:
        """Adapt to every task of `task` at once (tasks are the leading dimension); CXGRAD.md, "One task".

        `query_step_weights[k]` weights the query loss after step k (0 skips it). With
        `track_meta_graph` off (evaluation), no graph to the meta-parameters is kept at all: every
        adapted tensor becomes a fresh leaf after each step (`_evaluation_leaf`).
        """
        tasks = task.num_tasks
        cut = _keep_graph if track_meta_graph else _evaluation_leaf
        create_graph = second_order and track_meta_graph
        meta_params = dict(self.classifier.named_parameters())
        fast = {name: cut(meta_params[name].unsqueeze(0).expand(tasks, *meta_params[name].shape))
                for name in self.inner_loop_param_names}
        frozen = {name: value if track_meta_graph else value.detach()
                  for name, value in meta_params.items() if name not in fast}

        def support_loss(params: dict[str, Tensor], step: int, double_backward: bool) -> Tensor:
            logits = self.network(task.support_images, {**frozen, **params}, step, double_backward)
            return per_task_cross_entropy(logits, task.support_labels)

        context = None
        if self.context is not None:  # steps 1 and 2: a zero context per task, one warm-up step
            context = cut(self.context.warm_up(self.context.initial_context(tasks), fast,
                                               lambda params: support_loss(params, 0, double_backward=False)))

        recorder = None
        if self.config.log_inner_loop_statistics and track_meta_graph:  # the meta-training inner loop only
            scaled = self.context.scaled_param_names if self.context is not None else []
            recorder = InnerLoopRecorder(self.inner_loop_param_names, scaled)
        query_loss = torch.zeros(tasks, device=task.support_images.device)
        query_logits = None
        for step in range(num_steps):
            gamma = None
            if self.context is not None:
                fast, gamma = self.context.rescale(fast, context)  # step 3a: replace the backbone tensors
            losses = support_loss(fast, step, double_backward=create_graph)
            # Summing the per-task losses gives each task's own gradient for its own weights.
            inputs = [*fast.values(), *([context] if context is not None else [])]
            # First-order CxGrad still back-propagates through this step's rescaling (to g), whose
            # saved tensors this gradient would otherwise free.
            grads = torch.autograd.grad(losses.sum(), inputs, create_graph=create_graph,
                                        retain_graph=create_graph or (context is not None and track_meta_graph))
            if recorder is not None:
                recorder.record_step(grads[:len(fast)], gamma)
            fast = {name: cut(value) for name, value in
                    self.inner_loop_optimizer.update_params(fast, dict(zip(fast, grads)), step).items()}
            if context is not None:
                context = cut(self.context.step(context, grads[-1]))  # step 3d, with the weights
            weight = float(query_step_weights[step])
            if weight > 0.0 or step == num_steps - 1:  # step 3e, or the prediction after the last step
                with torch.set_grad_enabled(track_meta_graph):
                    logits = self.network(task.query_images, {**frozen, **fast}, step, double_backward=False)
                    if weight > 0.0:
                        query_loss = query_loss + weight * per_task_cross_entropy(logits, task.query_labels)
                query_logits = logits
        return InnerLoopResult(
            adapted_params=fast, query_loss=query_loss, query_logits=query_logits,
            statistics=recorder.result() if recorder is not None else None)

    # ------------------------------------------------------------------ the outer loop
    def query_step_weights(self, epoch: int) -> np.ndarray:
        steps = self.config.number_of_training_steps_per_iter
        if self.config.use_multi_step_loss_optimization and epoch < self.config.multi_step_loss_num_epochs:
            return multi_step_loss_weights(steps, epoch, self.config.multi_step_loss_num_epochs)
        return last_step_only(steps)

    def use_second_order(self, epoch: int) -> bool:
        """Derivative-order annealing: first order up to `first_order_to_second_order_epoch`."""
        return self.config.second_order and epoch > self.config.first_order_to_second_order_epoch

    def _chunks(self, task: TaskBatch) -> Iterator[TaskBatch]:
        """The whole meta-batch at once, or task by task (the readable reference path)."""
        if self.task_batching == "batched":
            yield task
        else:
            for index in range(task.num_tasks):
                yield task.select(index)

    def meta_gradient(self, task: TaskBatch, weights: np.ndarray,
                      second_order: bool) -> tuple[Tensor, Tensor, list[InnerLoopStatistics]]:
        """The device part of a meta-iteration: the inner loops and the meta-backward of the mean query loss.

        Leaves the meta-gradient in each parameter's `.grad` (made non-finite when a loss is) and returns
        the per-task query losses and accuracies as device tensors, with no host sync: what a CUDA graph
        captures (utils/cuda_graphs.py).
        """
        losses, correct, statistics = [], [], []
        for chunk in self._chunks(task):
            result = self.inner_loop(chunk, self.config.number_of_training_steps_per_iter, second_order, weights)
            # The meta-loss is the mean over all tasks; each chunk contributes its share.
            (result.query_loss.sum() / task.num_tasks).backward()
            losses.append(result.query_loss.detach())
            correct.append((result.query_logits.argmax(-1) == chunk.query_labels).float().mean(dim=1))
            if result.statistics is not None:
                statistics.append(result.statistics)
        all_losses = torch.cat(losses)
        # A non-finite loss poisons the gradients, so the reduced gradients alone tell every rank alike
        # whether this update is finite; one NaN/inf step would make every weight and Adam moment NaN for
        # good, so such an update is skipped (utils/nonfinite.py).
        poison_gradients_if_nonfinite(all_losses, [p for p in self.parameters() if p.grad is not None])
        return all_losses, torch.cat(correct), statistics

    def run_train_iter(self, task: TaskBatch, epoch: int) -> dict[str, Any]:
        """One meta-update on a meta-batch; returns the mean query loss and accuracy (floats), whether the
        update was skipped because the loss or a gradient was not finite, and with
        `log_inner_loop_statistics` the inner loop's `InnerLoopStatistics` over all its tasks."""
        self.train()
        weights = self.query_step_weights(epoch)
        second_order = self.use_second_order(epoch)
        if self.captured_meta_gradient is not None and not self.config.log_inner_loop_statistics:
            # Replays write the gradients into the buffers of the capture, so they are never set to None.
            all_losses, correct = self.captured_meta_gradient((tuple(weights), second_order), task)
            statistics = []
        else:
            task = task.to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            all_losses, correct, statistics = self.meta_gradient(task, weights, second_order)
        trained = [p for p in self.parameters() if p.grad is not None]
        self.gradient_reducer(trained)
        # One host sync per iteration reads the metrics and the finiteness probe (under torchrun the
        # experiment builder adds one small all-reduce of the stop request).
        probe = finiteness_probe(trained).to(all_losses.device)
        loss, accuracy, probe = torch.stack([all_losses.mean(), correct.mean(), probe]).tolist()
        skipped = not math.isfinite(probe)
        if not skipped:
            self.optimizer.step()
        metrics = {"loss": loss, "accuracy": accuracy, "skipped": skipped}
        if statistics:
            metrics["inner_loop_statistics"] = InnerLoopStatistics.concatenate(statistics)
        return metrics

    def run_validation_iter(self, task: TaskBatch) -> dict[str, Tensor]:
        """Adapt (first order) and predict the queries; per-task losses, accuracies, probabilities and labels."""
        self.eval()
        labels = task.query_labels  # as the caller has them (on the CPU from the loader): no copy back
        task = task.to(self.device)
        steps = self.config.number_of_evaluation_steps_per_iter
        losses, accuracies, probabilities = [], [], []
        for chunk in self._chunks(task):
            result = self.inner_loop(chunk, steps, second_order=False, query_step_weights=last_step_only(steps),
                                     track_meta_graph=False)
            logits = result.query_logits.detach()
            losses.append(per_task_cross_entropy(logits, chunk.query_labels))
            accuracies.append((logits.argmax(-1) == chunk.query_labels).float().mean(dim=1))
            probabilities.append(logits.softmax(dim=-1))
        return {"loss": torch.cat(losses).cpu(), "accuracy": torch.cat(accuracies).cpu(),
                "probabilities": torch.cat(probabilities).cpu(), "labels": labels.cpu()}
