"""NNN, the Node-Neuron Network: a cascade of matmul-free (HGRN-bit) nodes. See README.md."""

from thann.models.nnn.bitlinear import BitLinear, TernaryLinear
from thann.models.nnn.model import (
    InferenceState,
    NNNModel,
    check_model_config,
    nnn_transformer_config,
    num_parameters,
    stage_nodes,
)
from thann.models.nnn.pack import export_packed, load_packed

__all__ = [
    "BitLinear", "InferenceState", "NNNModel", "TernaryLinear", "check_model_config", "export_packed",
    "load_packed", "nnn_transformer_config", "num_parameters", "stage_nodes",
]
