"""NHS-Net (seed 003, rebuilt) and its parameter-matched ResNet: image classifiers (README.md).

    config = nhsnet_transformer_config(model_cfg, bf16=False)
    model = build_classifier(config, model_cfg)            # model_cfg.arch: nhsnet or resnet
    losses_B = model(pixels, "fashion_mnist", labels=labels)
    changed = model.after_step(step, all_reduce_sum)       # NHS-Net's local rules, after an optimizer step
"""

from thann.models.nhsnet.checks import check_layout, check_model_config
from thann.models.nhsnet.model import NHSNetClassifier, nhsnet_transformer_config
from thann.models.nhsnet.resnet import ResNetClassifier
from thann.models.nhsnet.size import classifier_size, matched_inner_widths, nhsnet_parameters, resnet_parameters

_CLASSES = {"nhsnet": NHSNetClassifier, "resnet": ResNetClassifier}


def build_classifier(config, model_cfg):
    return _CLASSES[model_cfg.arch](config, model_cfg)


__all__ = [
    "NHSNetClassifier", "ResNetClassifier", "build_classifier", "check_layout", "check_model_config",
    "classifier_size", "matched_inner_widths", "nhsnet_parameters", "nhsnet_transformer_config",
    "resnet_parameters",
]
