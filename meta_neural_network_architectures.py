"""The functional 4-conv backbone of MAML, MAML++ and CxGrad, and CxGrad's scaling network.

The backbone's `forward` takes an explicit parameter dict (as `torch.func.functional_call` would), so
the inner loop can run it with adapted weights without touching the module's own parameters.

Tasks are a leading dimension: images are [T, B, C, H, W] and every parameter is either shared by
all tasks (its usual shape) or per task (a leading T). Per-task weights are folded into grouped
convolutions (groups=T) and batched matrix products, so a whole meta-batch is one computation; with
T = 1 this is the ordinary per-task network. BatchNorm always normalises with the statistics of
the current batch, per task and channel (transductive, as in MAML and CxGrad); running statistics
never change a prediction, so none are kept.

The activation is leaky ReLU (slope 0.01) by default: the official MAML++ and CxGrad conv block is
named "...ReLU", but its forward pass applies `F.leaky_relu` (only its shape-inference pass uses ReLU).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# The backbone's activation after each BatchNorm, by its config name (`activation`).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "leaky_relu": functools.partial(F.leaky_relu, negative_slope=0.01),  # the official forward pass
    "relu": F.relu,
}


class _ConvParams(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, use_bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        nn.init.xavier_uniform_(self.weight)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if use_bias else None


class _NormParams(nn.Module):
    """BatchNorm scale and shift, one row per inner step when they are per step (MAML++ BNWB)."""

    def __init__(self, channels: int, num_steps: int, learnable_gamma: bool, learnable_beta: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_steps, channels), requires_grad=learnable_gamma)
        self.bias = nn.Parameter(torch.zeros(num_steps, channels), requires_grad=learnable_beta)


class _LinearParams(nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.xavier_uniform_(self.weight)
        self.bias = nn.Parameter(torch.zeros(out_features))


class VGGReLUNormNetwork(nn.Module):
    """conv3x3 -> BatchNorm -> leaky ReLU (or ReLU) -> max-pool, `num_stages` times, then a linear head.

    Parameter names: ``layer{i}.conv.weight`` (and ``.bias``), ``layer{i}.norm.weight`` / ``.bias``
    (shape [bn_steps, filters]) and ``linear.weight`` / ``linear.bias``.
    """

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, num_filters: int = 48,
                 num_stages: int = 4, use_bias: bool = False, conv_padding: bool = True,
                 max_pooling: bool = True, bn_steps: int = 1, learnable_bn_gamma: bool = True,
                 learnable_bn_beta: bool = True, activation: str = "leaky_relu"):
        super().__init__()
        channels, height, width = image_shape
        self.image_shape = tuple(image_shape)
        self.num_stages = num_stages
        self.bn_steps = bn_steps
        self.padding = 1 if conv_padding else 0
        # Memory format of the activations; channels_last suits cuDNN's (and tensor cores') kernels.
        self.memory_format = torch.contiguous_format
        self.max_pooling = max_pooling
        self.activation = ACTIVATIONS[activation]
        in_channels = channels
        for index in range(num_stages):
            block = nn.Module()
            block.conv = _ConvParams(in_channels, num_filters, use_bias)
            block.norm = _NormParams(num_filters, bn_steps, learnable_bn_gamma, learnable_bn_beta)
            self.add_module(f"layer{index}", block)
            in_channels = num_filters
            height, width = self._block_output_size(height), self._block_output_size(width)
        if height < 1 or width < 1:
            raise ValueError(f"{num_stages} stages reduce {image_shape[1]}x{image_shape[2]} images to nothing")
        self.linear = _LinearParams(num_filters * height * width, num_classes)

    def _block_output_size(self, size: int) -> int:
        if self.max_pooling:
            return (size + 2 * self.padding - 2) // 2
        return (size + 2 * self.padding - 3) // 2 + 1

    @property
    def conv_weight_names(self) -> list[str]:
        """The conv weights, shallow to deep."""
        return [f"layer{index}.conv.weight" for index in range(self.num_stages)]

    def backbone_names(self, names: list[str]) -> list[str]:
        """The backbone tensors among `names` (everything but the head), in the official code's order.

        That order is its parameter registration order: per stage the conv weight, the conv bias, the
        BatchNorm shift, then the BatchNorm scale. CxGrad's g emits one gamma per tensor in this order.
        """
        order = [f"layer{index}.{suffix}" for index in range(self.num_stages)
                 for suffix in ("conv.weight", "conv.bias", "norm.bias", "norm.weight")]
        wanted = set(names)
        return [name for name in order if name in wanted]

    def forward(self, images: Tensor, params: dict[str, Tensor] | None = None, step: int = 0) -> Tensor:
        """Logits [T, B, classes] for images [T, B, C, H, W] (or [B, classes] for [B, C, H, W]).

        `params` maps names to tensors that replace the module's own parameters; a tensor with one
        more dimension than the parameter holds one copy per task. `step` selects the per-step
        BatchNorm row (clamped to the steps the network has, for longer evaluation loops).
        """
        single_task = images.dim() == 4
        if single_task:
            images = images.unsqueeze(0)
        own = dict(self.named_parameters())
        params = own if params is None else {**own, **params}
        tasks, batch = images.shape[:2]
        step = min(step, self.bn_steps - 1)

        # Tasks side by side along the channels: [B, T*C, H, W].
        x = images.transpose(0, 1).reshape(batch, tasks * images.shape[2], *images.shape[3:])
        x = x.contiguous(memory_format=self.memory_format)
        for index in range(self.num_stages):
            prefix = f"layer{index}"
            weight = self._fold_tasks(params[f"{prefix}.conv.weight"], own[f"{prefix}.conv.weight"], tasks)
            bias = params.get(f"{prefix}.conv.bias")
            if bias is not None:
                bias = self._fold_tasks(bias, own[f"{prefix}.conv.bias"], tasks)
            stride = 1 if self.max_pooling else 2
            x = F.conv2d(x, weight, bias, stride=stride, padding=self.padding, groups=tasks)
            norm_weight = self._step_row(params[f"{prefix}.norm.weight"], own[f"{prefix}.norm.weight"], step)
            norm_bias = self._step_row(params[f"{prefix}.norm.bias"], own[f"{prefix}.norm.bias"], step)
            x = F.batch_norm(x, None, None, self._fold_tasks(norm_weight, own[f"{prefix}.norm.weight"][0], tasks),
                             self._fold_tasks(norm_bias, own[f"{prefix}.norm.bias"][0], tasks), training=True)
            x = self.activation(x)
            if self.max_pooling:
                x = F.max_pool2d(x, kernel_size=2, stride=2)

        features = x.reshape(batch, tasks, -1).transpose(0, 1)  # [T, B, D]
        weight, bias = params["linear.weight"], params["linear.bias"]
        # matmul broadcasts a shared head [classes, D] and batches per-task heads [T, classes, D].
        logits = features @ weight.transpose(-1, -2)
        logits = logits + (bias.unsqueeze(1) if bias.dim() == 2 else bias)
        return logits.squeeze(0) if single_task else logits

    @staticmethod
    def _fold_tasks(tensor: Tensor, reference: Tensor, tasks: int) -> Tensor:
        """[T, out, ...] per-task or [out, ...] shared -> [T*out, ...] for grouped operations."""
        if tensor.dim() == reference.dim() + 1:
            return tensor.reshape(tasks * tensor.shape[1], *tensor.shape[2:])
        if tasks == 1:
            return tensor
        return tensor.repeat(tasks, *([1] * (tensor.dim() - 1)))

    @staticmethod
    def _step_row(tensor: Tensor, reference: Tensor, step: int) -> Tensor:
        """Row `step` of a [steps, C] (shared) or [T, steps, C] (per task) BatchNorm parameter."""
        return tensor[:, step] if tensor.dim() == reference.dim() + 1 else tensor[step]


class ContextScalingNetwork(nn.Module):
    """CxGrad's g: context phi (P numbers) -> one positive factor per backbone conv layer.

    Linear(P, P) -> ReLU -> Linear(P, L) -> Softplus, exactly as in the paper and its code.
    """

    def __init__(self, num_context_params: int, num_layers: int):
        super().__init__()
        self.num_context_params = num_context_params
        self.layers = nn.Sequential(
            nn.Linear(num_context_params, num_context_params),
            nn.ReLU(),
            nn.Linear(num_context_params, num_layers),
            nn.Softplus(),
        )

    def forward(self, context: Tensor) -> Tensor:
        return self.layers(context)

