"""Export of a trained NNN with its BitLinear weights packed as ternary, and the loader back.

One safetensors file (no pickle): for every BitLinear ``P`` the tensors ``P.ternary_packed``
(uint8 [O, ⌈F/4⌉], four weights per byte, 2 bits each holding ternary + 1) and ``P.scale``
(float32, the layer computes with ternary / scale); every other tensor (embedding, norms,
lower bounds, global weights, LM head) as it is in the model. The metadata holds the model
config as JSON and the vocabulary size, enough to rebuild the model.

The loaded model's BitLinears are TernaryLinear modules (int8 values and the scale), computing
exactly what the trained layers computed (the same operations on the same values), so a float32
model's logits match bit for bit.

Shape legend: O output features, F input features, Q = ⌈F/4⌉ packed bytes per row.
"""

import json
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from thann.models.nnn.bitlinear import BitLinear, TernaryLinear
from thann.models.nnn.model import NNNModel, nnn_transformer_config

FORMAT = "thann-nnn-ternary-1"


def pack_ternary(ternary_OF: torch.Tensor) -> torch.Tensor:
    """int8 values in {-1, 0, 1} -> uint8 [O, ⌈F/4⌉]; weight 4q + j sits in bits 2j, 2j + 1 of byte q."""
    O, F = ternary_OF.shape
    codes_OF = (ternary_OF.to(torch.int16) + 1).to(torch.uint8)
    codes_OQ4 = torch.nn.functional.pad(codes_OF, (0, -F % 4), value=1).view(O, -1, 4)  # pad with code 1: zero
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=ternary_OF.device)
    return (codes_OQ4 << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_ternary(packed_OQ: torch.Tensor, in_features: int) -> torch.Tensor:
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed_OQ.device)
    codes_OQ4 = (packed_OQ.unsqueeze(-1) >> shifts) & 3
    return (codes_OQ4.flatten(1)[:, :in_features].to(torch.int8) - 1)


def export_packed(model: NNNModel, path: str, tokenizer: dict | None = None) -> None:
    """Writes a whole (single-stage) model's weights to ``path``, with the identity of the
    tokenizer it was trained with (thann.data.tokenizer.Tokenizer.identity) for generation."""
    if not (model.pre_process and model.post_process):
        raise ValueError("export a whole model (pre_process and post_process), not one pipeline stage")
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, BitLinear):
            ternary, scale = module.ternary_weight()
            tensors[f"{name}.ternary_packed"] = pack_ternary(ternary).cpu()
            tensors[f"{name}.scale"] = scale.reshape(()).cpu()
    for name, tensor in model.state_dict().items():
        if not (name.endswith(".weight") and f"{name[:-len('.weight')]}.ternary_packed" in tensors):
            tensors[name] = tensor.detach().cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "model_config": json.dumps(OmegaConf.to_container(model.model_cfg, resolve=True)),
        "vocab_size": str(model.vocab_size),
        "tokenizer": json.dumps(tokenizer),
    }
    save_file(tensors, path, metadata=metadata)


def packed_metadata(path: str) -> dict:
    """The metadata of an export (format, model config, vocabulary size, tokenizer), or ValueError."""
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
    except Exception:  # noqa: BLE001 - safetensors raises several types for a file that is not one
        raise ValueError(f"{path}: not a safetensors file") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: not an NNN ternary export (format {metadata.get('format')!r})")
    return metadata


def load_packed(path: str) -> NNNModel:
    """The model in ``path`` as a float32 NNNModel with TernaryLinear layers (inference only)."""
    metadata = packed_metadata(path)
    model_cfg = OmegaConf.create(json.loads(metadata["model_config"]))
    config = nnn_transformer_config(model_cfg, SimpleNamespace(tp=1, pp=1), bf16=False)
    model = NNNModel(config, model_cfg, int(metadata["vocab_size"]))
    tensors = load_file(path)
    for name, module in list(model.named_modules()):
        if isinstance(module, BitLinear):
            ternary = tensors[f"{name}.ternary"] = unpack_ternary(tensors.pop(f"{name}.ternary_packed"),
                                                                  module.weight.shape[1])
            model.set_submodule(name, TernaryLinear(ternary, tensors[f"{name}.scale"], module.norm))
    model.load_state_dict(tensors, strict=True)
    return model.eval()
