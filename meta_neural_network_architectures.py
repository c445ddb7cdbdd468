"""The functional backbones of MAML, MAML++ and CxGrad (4-CONV, ResNet-12), and CxGrad's scaling network.

The backbone's `forward` takes an explicit parameter dict (as `torch.func.functional_call` would), so
the inner loop can run it with adapted weights without touching the module's own parameters.

Tasks are a leading dimension: images are [T, B, C, H, W] and every parameter is either shared by
all tasks (its usual shape) or per task (a leading T). Per-task weights are folded into grouped
convolutions (groups=T) and batched matrix products, so a whole meta-batch is one computation; with
T = 1 this is the ordinary per-task network. BatchNorm always normalises with the statistics of
the current batch, per task and channel (transductive, as in MAML and CxGrad); running statistics
never change a prediction, so none are kept.

The activation is leaky ReLU by default: the official MAML++ and CxGrad conv block is named "...ReLU",
but its forward pass applies `F.leaky_relu` (slope 0.01; only its shape-inference pass uses ReLU).

Every backbone names its BatchNorm parameters ``*.norm.weight`` / ``*.norm.bias`` and its head
``linear.weight`` / ``linear.bias``, has a ``backbone_names`` (the tensors CxGrad rescales, in its
order) and a ``conv_weight_names``; `build_backbone` picks one by the config's `backbone` key.
"""
from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


if TYPE_CHECKING:
    from utils.config import ExperimentConfig


def make_activation(name: str, leaky_relu_slope: float) -> Callable[[Tensor], Tensor]:
    """The activation after each BatchNorm, by its config name (`activation`); non-decreasing for a slope
    >= 0 (the config checks it), so it commutes with max-pooling (`pooled_activation`)."""
    if name == "leaky_relu":
        return functools.partial(F.leaky_relu, negative_slope=leaky_relu_slope)
    if name == "relu":
        return F.relu
    raise ValueError(f"unknown activation {name!r}; expected 'leaky_relu' or 'relu'")


class _ConvParams(nn.Module):
    """A square conv's weight [out, in, k, k] (and bias), initialised by `init` (in place)."""

    def __init__(self, in_channels: int, out_channels: int, use_bias: bool, kernel_size: int = 3,
                 init: Callable[[Tensor], Tensor] = nn.init.xavier_uniform_):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        init(self.weight)
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


def _conv_norm_unit(in_channels: int, out_channels: int, use_bias: bool, bn_steps: int, learnable_gamma: bool,
                    learnable_beta: bool, kernel_size: int = 3,
                    init: Callable[[Tensor], Tensor] = nn.init.xavier_uniform_) -> nn.Module:
    """A conv and the BatchNorm after it, as parameters ``conv.weight`` (``conv.bias``), ``norm.weight``, ``norm.bias``."""
    unit = nn.Module()
    unit.conv = _ConvParams(in_channels, out_channels, use_bias, kernel_size, init)
    unit.norm = _NormParams(out_channels, bn_steps, learnable_gamma, learnable_beta)
    return unit


# The order in which CxGrad's g emits a unit's gammas: the official code's parameter registration
# order (conv weight, conv bias, BatchNorm shift, BatchNorm scale).
_UNIT_ORDER = ("conv.weight", "conv.bias", "norm.bias", "norm.weight")


def _fold_tasks(tensor: Tensor, reference: Tensor, tasks: int) -> Tensor:
    """[T, out, ...] per-task or [out, ...] shared -> [T*out, ...] for grouped operations."""
    if tensor.dim() == reference.dim() + 1:
        return tensor.reshape(tasks * tensor.shape[1], *tensor.shape[2:])
    if tasks == 1:
        return tensor
    return tensor.repeat(tasks, *([1] * (tensor.dim() - 1)))


def _step_row(tensor: Tensor, reference: Tensor, step: int) -> Tensor:
    """Row `step` of a [steps, C] (shared) or [T, steps, C] (per task) BatchNorm parameter."""
    return tensor[:, step] if tensor.dim() == reference.dim() + 1 else tensor[step]


def _conv_norm(x: Tensor, prefix: str, params: dict[str, Tensor], own: dict[str, Tensor], tasks: int,
               step: int, stride: int = 1, padding: int = 1) -> Tensor:
    """Unit `prefix` on tasks side by side along the channels ([B, T*C, H, W]): each task's conv (one
    group per task), then BatchNorm with the batch's statistics per task and channel."""
    weight = _fold_tasks(params[f"{prefix}.conv.weight"], own[f"{prefix}.conv.weight"], tasks)
    bias = params.get(f"{prefix}.conv.bias")
    if bias is not None:
        bias = _fold_tasks(bias, own[f"{prefix}.conv.bias"], tasks)
    x = F.conv2d(x, weight, bias, stride=stride, padding=padding, groups=tasks)
    norm_weight, norm_bias = own[f"{prefix}.norm.weight"], own[f"{prefix}.norm.bias"]
    scale = _fold_tasks(_step_row(params[f"{prefix}.norm.weight"], norm_weight, step), norm_weight[0], tasks)
    shift = _fold_tasks(_step_row(params[f"{prefix}.norm.bias"], norm_bias, step), norm_bias[0], tasks)
    return F.batch_norm(x, None, None, scale, shift, training=True)


class _ChannelsLastMaxPool(torch.autograd.Function):
    """2x2 max-pooling of an NCHW CPU tensor through ATen's channels-last kernel.

    ATen's CPU max-pool kernel for NCHW tensors is slower than its channels-last one: at 75x48x84x84,
    106 ms against 57 ms with the copies (`benchmarks/bench_cpu_ops.py`). The forward pools a
    channels-last copy and returns NCHW values and indices; the backward is ATen's own NCHW max-pool backward, a differentiable operation,
    so second-order meta-gradients run through it as through `F.max_pool2d`. Both kernels take the
    first maximum of each window, so values and gradients equal `F.max_pool2d(x, 2, 2)`'s exactly.
    """

    @staticmethod
    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        pooled, indices = torch.ops.aten.max_pool2d_with_indices(
            x.contiguous(memory_format=torch.channels_last), [2, 2], [2, 2])
        return pooled.contiguous(), indices.contiguous()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        (x,) = inputs
        ctx.input_shape, ctx.input_dtype = x.shape, x.dtype  # not x: the backward needs its shape only
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_pooled: Tensor, _grad_indices: Tensor) -> Tensor:
        (indices,) = ctx.saved_tensors
        shape_of_input = grad_pooled.new_empty(ctx.input_shape, dtype=ctx.input_dtype)
        return torch.ops.aten.max_pool2d_with_indices_backward(
            grad_pooled.contiguous(), shape_of_input, [2, 2], [2, 2], [0, 0], [1, 1], False, indices)


def max_pool_2x2(x: Tensor) -> Tensor:
    """2x2 max-pooling with stride 2: the values and gradients of `F.max_pool2d(x, 2, 2)`, faster on the CPU."""
    if x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous():
        return _ChannelsLastMaxPool.apply(x)[0]
    return F.max_pool2d(x, kernel_size=2, stride=2)


def pooled_activation(x: Tensor, activation: Callable[[Tensor], Tensor]) -> Tensor:
    """`max_pool_2x2(activation(x))`, computed as `activation(max_pool_2x2(x))`.

    The two are equal because the activations (leaky ReLU, ReLU) are non-decreasing, so they commute
    with a maximum: the same values, and the gradient reaches the same input through the same slope.
    Activating the pooled map touches a quarter of the elements, forward and in both backward passes.
    """
    return activation(max_pool_2x2(x))


def _tasks_along_channels(images: Tensor, memory_format: torch.memory_format) -> Tensor:
    """[T, B, C, H, W] -> [B, T*C, H, W]: the layout of the grouped convolutions."""
    tasks, batch = images.shape[:2]
    x = images.transpose(0, 1).reshape(batch, tasks * images.shape[2], *images.shape[3:])
    return x.contiguous(memory_format=memory_format)


def _linear_head(features: Tensor, params: dict[str, Tensor]) -> Tensor:
    """Logits [T, B, classes] of features [T, B, D]; matmul broadcasts a shared head [classes, D] and
    batches per-task heads [T, classes, D]."""
    weight, bias = params["linear.weight"], params["linear.bias"]
    logits = features @ weight.transpose(-1, -2)
    return logits + (bias.unsqueeze(1) if bias.dim() == 2 else bias)


class _FunctionalBackbone(nn.Module):
    """What the backbones share: the explicit-parameter forward over tasks, and CxGrad's tensor order.

    A subclass lists its conv-BatchNorm units shallow to deep (`unit_prefixes`) and defines
    `features(x, params, own, tasks, step)`: images with tasks along the channels [B, T*C, H, W] ->
    features [T, B, D].
    """

    unit_prefixes: list[str]
    bn_steps: int

    @property
    def conv_weight_names(self) -> list[str]:
        """The conv weights, shallow to deep."""
        return [f"{prefix}.conv.weight" for prefix in self.unit_prefixes]

    def backbone_names(self, names: list[str]) -> list[str]:
        """The backbone tensors among `names` (everything but the head), shallow to deep.

        Per unit the official code's order: the conv weight, the conv bias, the BatchNorm shift, then
        the BatchNorm scale. CxGrad's g emits one gamma per tensor in this order.
        """
        order = [f"{prefix}.{suffix}" for prefix in self.unit_prefixes for suffix in _UNIT_ORDER]
        wanted = set(names)
        return [name for name in order if name in wanted]

    def forward(self, images: Tensor, params: dict[str, Tensor] | None = None, step: int = 0,
                memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
        """Logits [T, B, classes] for images [T, B, C, H, W] (or [B, classes] for [B, C, H, W]).

        `params` maps names to tensors that replace the module's own parameters; a tensor with one
        more dimension than the parameter holds one copy per task. `step` selects the per-step
        BatchNorm row (clamped to the steps the network has, for longer evaluation loops).
        `memory_format` is the activations' (`utils/backend.py: resolve_memory_formats` picks it per pass).
        """
        single_task = images.dim() == 4
        if single_task:
            images = images.unsqueeze(0)
        own = dict(self.named_parameters())
        params = own if params is None else {**own, **params}
        step = min(step, self.bn_steps - 1)
        x = _tasks_along_channels(images, memory_format)
        logits = _linear_head(self.features(x, params, own, images.shape[0], step), params)
        return logits.squeeze(0) if single_task else logits


class VGGReLUNormNetwork(_FunctionalBackbone):
    """4-CONV: conv3x3 -> BatchNorm -> leaky ReLU (or ReLU) -> max-pool, `num_stages` times, then a linear head.

    Parameter names: ``layer{i}.conv.weight`` (and ``.bias``), ``layer{i}.norm.weight`` / ``.bias``
    (shape [bn_steps, filters]) and ``linear.weight`` / ``linear.bias``. The leaky ReLU's slope is 0.01
    by default, as in the official MAML++ and CxGrad forward pass.
    """

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, num_filters: int = 48,
                 num_stages: int = 4, use_bias: bool = False, conv_padding: bool = True,
                 max_pooling: bool = True, bn_steps: int = 1, learnable_bn_gamma: bool = True,
                 learnable_bn_beta: bool = True, activation: str = "leaky_relu", leaky_relu_slope: float = 0.01):
        super().__init__()
        channels, height, width = image_shape
        self.image_shape = tuple(image_shape)
        self.num_stages = num_stages
        self.bn_steps = bn_steps
        self.padding = 1 if conv_padding else 0
        self.max_pooling = max_pooling
        self.activation = make_activation(activation, leaky_relu_slope)
        self.unit_prefixes = [f"layer{index}" for index in range(num_stages)]
        in_channels = channels
        for prefix in self.unit_prefixes:
            self.add_module(prefix, _conv_norm_unit(in_channels, num_filters, use_bias, bn_steps,
                                                    learnable_bn_gamma, learnable_bn_beta))
            in_channels = num_filters
            height, width = self._block_output_size(height), self._block_output_size(width)
        if height < 1 or width < 1:
            raise ValueError(f"{num_stages} stages reduce {image_shape[1]}x{image_shape[2]} images to nothing")
        self.linear = _LinearParams(num_filters * height * width, num_classes)

    def _block_output_size(self, size: int) -> int:
        if self.max_pooling:
            return (size + 2 * self.padding - 2) // 2
        return (size + 2 * self.padding - 3) // 2 + 1

    def features(self, x: Tensor, params: dict[str, Tensor], own: dict[str, Tensor], tasks: int,
                 step: int) -> Tensor:
        stride = 1 if self.max_pooling else 2
        for prefix in self.unit_prefixes:
            x = _conv_norm(x, prefix, params, own, tasks, step, stride, self.padding)
            x = pooled_activation(x, self.activation) if self.max_pooling else self.activation(x)
        return x.reshape(x.shape[0], tasks, -1).transpose(0, 1)


class ResNet12(_FunctionalBackbone):
    """ResNet-12 as in MetaOptNet (Lee et al., 2019) and ALFA: four residual blocks, then global average
    pooling and a linear head.

    A block of width w: three conv3x3 -> BatchNorm units (leaky ReLU after the first two), added to a
    conv1x1 -> BatchNorm shortcut of the block's input, leaky ReLU, 2x2 max-pool. Widths 64-160-320-640
    by default, so 84x84 images end as 5x5x640 before the pooling. No DropBlock and no dropout (the
    meta-learners here train without them), no conv bias unless `use_bias`.

    The leaky ReLU's slope is 0.1 by default, as in MetaOptNet's and ALFA's ResNet-12 (and TADAM's
    before them): the few-shot ResNet-12 results a run is compared with were all obtained with it, while
    the 0.01 of 4-CONV comes from the CxGrad/MAML++ conv block, which has no residual path.
    `leaky_relu_slope` (a config key) sets either.

    Parameter names: ``block{b}.layer{i}.conv.weight`` (i = 0, 1, 2), ``block{b}.shortcut.conv.weight``,
    each with its ``.norm.weight`` / ``.norm.bias`` ([bn_steps, width]), and ``linear.weight`` / ``.bias``.
    Convs are initialised as in MetaOptNet (Kaiming normal, fan-out); the head as 4-CONV's.
    """

    DEFAULT_WIDTHS = (64, 160, 320, 640)
    CONVS_PER_BLOCK = 3

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int,
                 widths: tuple[int, ...] | list[int] = DEFAULT_WIDTHS, use_bias: bool = False, bn_steps: int = 1,
                 learnable_bn_gamma: bool = True, learnable_bn_beta: bool = True, activation: str = "leaky_relu",
                 leaky_relu_slope: float = 0.1):
        super().__init__()
        channels, height, width = image_shape
        if min(height, width) >> len(widths) < 1:
            raise ValueError(f"{len(widths)} residual blocks halve {height}x{width} images below one pixel")
        self.image_shape = tuple(image_shape)
        self.widths = tuple(widths)
        self.bn_steps = bn_steps
        self.activation = make_activation(activation, leaky_relu_slope)
        init = functools.partial(nn.init.kaiming_normal_, mode="fan_out", nonlinearity="leaky_relu")
        unit = functools.partial(_conv_norm_unit, use_bias=use_bias, bn_steps=bn_steps,
                                 learnable_gamma=learnable_bn_gamma, learnable_beta=learnable_bn_beta, init=init)
        self.unit_prefixes = []
        in_channels = channels
        for index, block_width in enumerate(self.widths):
            block = nn.Module()
            for layer in range(self.CONVS_PER_BLOCK):
                block.add_module(f"layer{layer}", unit(in_channels if layer == 0 else block_width, block_width))
            block.shortcut = unit(in_channels, block_width, kernel_size=1)
            self.add_module(f"block{index}", block)
            # Shallow to deep: the main path, then the shortcut (its registration order in MetaOptNet's block).
            self.unit_prefixes += [f"block{index}.layer{layer}" for layer in range(self.CONVS_PER_BLOCK)]
            self.unit_prefixes.append(f"block{index}.shortcut")
            in_channels = block_width
        self.linear = _LinearParams(in_channels, num_classes)

    def features(self, x: Tensor, params: dict[str, Tensor], own: dict[str, Tensor], tasks: int,
                 step: int) -> Tensor:
        for index in range(len(self.widths)):
            block = f"block{index}"
            shortcut = _conv_norm(x, f"{block}.shortcut", params, own, tasks, step, padding=0)
            for layer in range(self.CONVS_PER_BLOCK):
                x = _conv_norm(x, f"{block}.layer{layer}", params, own, tasks, step)
                if layer < self.CONVS_PER_BLOCK - 1:
                    x = self.activation(x)
            x = pooled_activation(x + shortcut, self.activation)
        pooled = x.mean(dim=(2, 3))  # global average pooling: [B, T*width]
        return pooled.view(pooled.shape[0], tasks, -1).transpose(0, 1)


BACKBONES = ("4-CONV", "resnet12")


def build_backbone(config: "ExperimentConfig") -> _FunctionalBackbone:
    """The backbone named by `config.backbone`, with BatchNorm rows per inner step when configured."""
    # Inner-loop BatchNorm parameters are one row for all steps, as in the official code (there the
    # inner-loop switch replaces the per-step rows by a single [C] scale and shift).
    per_step_rows = config.per_step_bn_statistics and not config.enable_inner_loop_optimizable_bn_params
    if config.per_step_bn_statistics and config.enable_inner_loop_optimizable_bn_params:
        warnings.warn("per_step_bn_statistics has no effect with enable_inner_loop_optimizable_bn_params: the "
                      "BatchNorm scale and shift adapted in the inner loop are one row for all steps, as in the "
                      "official code; set one of the two to false to silence this")
    common = dict(
        image_shape=config.image_shape, num_classes=config.num_classes_per_set, use_bias=config.use_bias,
        bn_steps=config.number_of_training_steps_per_iter if per_step_rows else 1,
        learnable_bn_gamma=config.learnable_bn_gamma, learnable_bn_beta=config.learnable_bn_beta,
        activation=config.activation)
    if config.leaky_relu_slope is not None:  # else each backbone's published slope
        common["leaky_relu_slope"] = config.leaky_relu_slope
    if config.backbone == "resnet12":
        return ResNet12(widths=config.resnet_widths, **common)
    if config.backbone == "4-CONV":
        return VGGReLUNormNetwork(num_filters=config.cnn_num_filters, num_stages=config.num_stages,
                                  conv_padding=config.conv_padding, max_pooling=config.max_pooling, **common)
    raise ValueError(f"unknown backbone {config.backbone!r}; expected one of {list(BACKBONES)}")


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

