"""The honest baseline for ChaosNet: the same front-ends and heads, and one ReLU layer with
dropout in place of the neuron core. The hidden width is solved so that the parameter count
matches ChaosNet's.

    hidden = ReLU(W·x + b)                                   [B, H]
    features = (1/T)·Σ_t keep_t ⊙ hidden                     [B, H]
    keep_t ~ Bernoulli(1 - death_rate) / (1 - death_rate)   (inverted dropout, as torch's)

``hidden_width`` in the model config sets H directly instead (e.g. a tenth of ChaosNet's core, to
test "10x fewer parameters"); null, the default, matches the counts.

Dropout stays on at evaluation, with the caller-supplied death rate, exactly as ChaosNet's
neuron death does. ChaosNet's readout averages T independently killed ticks, so the baseline
averages T independently dropped copies of its hidden layer. Both models then see the same
number of death draws and differ only in their units. With ticks = 1 this is exactly
Linear -> ReLU -> Dropout.

Shapes: B batch, I input width, T ticks (mask draws), H hidden width, C classes.
"""

import torch

from thann.models.chaosnet.model import (
    Classifier,
    build_heads,
    classify,
    frontend_parameters,
    head_parameters,
    num_parameters,
    parameter_factory,
)
from thann.models.chaosnet.neurons import check_death_rate


def mlp_num_parameters(model_cfg, hidden: int) -> int:
    return frontend_parameters(model_cfg) + hidden * (model_cfg.input_width + 1) + head_parameters(model_cfg, hidden)


def matched_hidden_width(model_cfg) -> int:
    """The hidden width H whose parameter count is closest to ChaosNet's. The count is linear in
    H, so the error is at most half the cost of one hidden unit."""
    classes = sum(head.num_classes for head in model_cfg.heads.values())
    fixed = mlp_num_parameters(model_cfg, 0)
    per_unit = model_cfg.input_width + 1 + classes
    return max(1, round((num_parameters(model_cfg) - fixed) / per_unit))


class MLPBaselineClassifier(Classifier):
    def __init__(self, config, model_cfg):
        super().__init__(config, model_cfg)
        factory = parameter_factory(config)
        self.ticks = model_cfg.ticks
        self.hidden_width = model_cfg.get("hidden_width") or matched_hidden_width(model_cfg)
        self.hidden = torch.nn.Linear(model_cfg.input_width, self.hidden_width, **factory)
        self.heads = build_heads(model_cfg, self.hidden_width, **factory)

    def draw_randomness(self, batch: int, generator: torch.Generator, death_rate: float | None = None):
        """(keep_BTH, None). keep is 0 or 1/(1 - death_rate). There is no noise; the None is there
        so that both models are called the same way."""
        death_rate = self.death_rate(death_rate)
        check_death_rate(death_rate)
        shape = (batch, self.ticks, self.hidden_width)
        keep_BTH = (torch.rand(shape, generator=generator, device=generator.device) >= death_rate).float()
        return keep_BTH / (1 - death_rate), None

    def forward(self, inputs: torch.Tensor, head: str, keep_BTH: torch.Tensor, noise=None,
                labels=None) -> torch.Tensor:
        hidden_BH = torch.relu(self.hidden(self.features(inputs, head)))
        expected = (hidden_BH.shape[0], self.ticks, self.hidden_width)
        if tuple(keep_BTH.shape) != expected:
            raise ValueError(f"keep_BTH has shape {tuple(keep_BTH.shape)}; "
                             f"expected (batch, ticks, hidden) = {expected}")
        features_BH = (keep_BTH.to(hidden_BH) * hidden_BH.unsqueeze(1)).mean(dim=1)
        return classify(self.heads[head], features_BH, labels)
