"""Inner-loop update rules: theta <- theta - alpha * grad, with a fixed or a meta-learned alpha.

Both rules are pure: they take the current parameter and gradient dicts and return new tensors,
so the update stays in the autograd graph when the outer loop differentiates through it.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class GradientDescentLearningRule(nn.Module):
    """Plain SGD with one fixed learning rate (MAML)."""

    def __init__(self, learning_rate: float):
        super().__init__()
        self.learning_rate = learning_rate

    def update_params(self, params: dict[str, Tensor], grads: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        return {name: value - self.learning_rate * grads[name] for name, value in params.items()}


class LSLRGradientDescentLearningRule(nn.Module):
    """MAML++'s LSLR: one meta-learned learning rate per parameter tensor and inner step.

    Rates are stored per step; an evaluation loop longer than the training loop reuses the last one.
    """

    def __init__(self, param_names: list[str], num_steps: int, init_learning_rate: float):
        super().__init__()
        # ParameterDict keys cannot contain '.', so 'layer0.conv.weight' is stored as 'layer0-conv-weight'.
        self.learning_rates = nn.ParameterDict({
            name.replace(".", "-"): nn.Parameter(torch.full((num_steps,), float(init_learning_rate)))
            for name in param_names
        })

    def update_params(self, params: dict[str, Tensor], grads: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        updated = {}
        for name, value in params.items():
            rates = self.learning_rates[name.replace(".", "-")]
            updated[name] = value - rates[min(step, rates.shape[0] - 1)] * grads[name]
        return updated
