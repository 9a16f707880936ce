"""ChaosNet (seed 002) and its parameter-matched MLP baseline: classifiers over text and images.

    config = chaosnet_transformer_config(model_cfg, bf16=False)
    model = build_classifier(config, model_cfg)            # model_cfg.arch picks the class
    alive, noise = model.draw_randomness(batch, generator, death_rate)
    losses_B = model(inputs, "mnist", alive, noise, labels=labels)
"""

from thann.models.chaosnet.mlp_baseline import MLPBaselineClassifier, matched_hidden_width, mlp_num_parameters
from thann.models.chaosnet.model import (
    ChaosNetClassifier,
    chaosnet_transformer_config,
    check_layout,
    classifier_size,
    check_model_config,
    num_parameters,
)
from thann.models.chaosnet.neurons import ChaosNeurons

_CLASSES = {"chaosnet": ChaosNetClassifier, "mlp_baseline": MLPBaselineClassifier}


def build_classifier(config, model_cfg):
    return _CLASSES[model_cfg.arch](config, model_cfg)


__all__ = [
    "ChaosNeurons", "ChaosNetClassifier", "MLPBaselineClassifier", "build_classifier", "chaosnet_transformer_config",
    "classifier_size", "check_layout", "check_model_config", "matched_hidden_width", "mlp_num_parameters",
    "num_parameters",
]
