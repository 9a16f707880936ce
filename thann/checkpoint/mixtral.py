"""THANN's weights and shape in HF transformers' Mixtral terms, both ways: the one mapping of the
HF export (thann.export.hf, THANN -> HF) and of starting a THANN model from a Mixtral directory
(``init_from=``: the resume policy's check, the trainer's read; HF -> THANN).

THANN's checkpoint arrays have global shapes, the decoder's layers stacked on a first axis
(thann.checkpoint.zarr_store); HF names one tensor per layer. The decoder maps parameter for
parameter (the table is in docs/hf_export.md). HF tensors come in two namings:

- **modules**: the parameters of transformers' (>= 5) Mixtral modules, the experts of a layer
  fused (``mlp.experts.gate_up_proj`` [E, 2F, D], ``down_proj`` [E, D, F]): what THANN's own
  export holds, loaded by its remote code as is;
- **hub**: the Mixtral checkpoint format of the Hub, one tensor per expert
  (``block_sparse_moe.experts.{e}.w1`` gate, ``w3`` up, ``w2`` down): what Mixtral loaders expect
  and what transformers itself writes (it fuses the experts on load). ``--mixtral`` exports and
  imports use it.

Shapes: L layers, E experts, D hidden, F expert FFN, N query heads, G query groups, H head dim.
"""

import json
import os

import torch
from omegaconf import DictConfig, OmegaConf

from thann.config import ConfigError, require
from thann.models import registry

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
LAYERS = "decoder.layers."
TOKENIZATION = "learnt_tokenization."

# HF config field -> THANN model field: the shape both must agree on.
SHAPE = (("hidden_size", "hidden_size"), ("num_hidden_layers", "num_layers"),
         ("num_attention_heads", "num_attention_heads"), ("num_key_value_heads", "num_query_groups"),
         ("num_local_experts", "num_experts"), ("num_experts_per_tok", "moe_router_topk"),
         ("intermediate_size", "moe_ffn_hidden_size"), ("tie_word_embeddings", "tie_embeddings"))


def tokenization_widths(args: DictConfig) -> list[int] | None:
    """The learnt tokenization's convolution widths; None when it is off."""
    from thann.models.thann.model import tokenization_enabled

    return list(args.tokenization.conv_widths) if tokenization_enabled(args) else None


def norm_epsilon(args: DictConfig) -> float:
    """THANN's norm epsilon (its TransformerConfig's, which no layout changes)."""
    from thann.models.thann.model import transformer_config

    layout = OmegaConf.create({"tp": 1, "pp": 1, "ep": 1, "etp": 1, "sp": False})
    return transformer_config(args, layout, bf16=False).layernorm_epsilon


def config_fields(args: DictConfig, vocab_rows: int, seq_length: int) -> dict:
    """MixtralConfig's fields for THANN model ``args`` with ``vocab_rows`` embedding rows."""
    fields = {hf: args[thann] for hf, thann in SHAPE}
    return dict(fields, vocab_size=vocab_rows, head_dim=args.hidden_size // args.num_attention_heads,
                hidden_act="silu", rms_norm_eps=norm_epsilon(args), max_position_embeddings=seq_length,
                rope_parameters={"rope_type": "default", "rope_theta": float(args.rotary_base)},
                router_aux_loss_coef=args.moe_aux_loss_coeff, attention_dropout=args.attention_dropout,
                initializer_range=args.init_method_std, sliding_window=None,
                # THANN has no beginning-of-sequence token; generation_config.json names the end tokens.
                bos_token_id=None, eos_token_id=None, pad_token_id=None)


def array_keys(args: DictConfig) -> list[str]:
    """The checkpoint arrays of THANN model ``args``."""
    keys = [EMBEDDING, FINAL_NORM] + [LAYERS + name for name in (
        "input_layernorm.weight", "pre_mlp_layernorm.weight", "self_attention.linear_qkv.weight",
        "self_attention.linear_proj.weight", "mlp.router.weight", "mlp.experts.fc1_weight", "mlp.experts.fc2_weight")]
    if not args.tie_embeddings:
        keys.append(OUTPUT)
    widths = tokenization_widths(args)
    if widths:
        keys += [f"{TOKENIZATION}convs.{i}.weight" for i in range(len(widths))]
        keys += [TOKENIZATION + name for name in ("mix.weight", "norm.weight", "attention.linear_qkv.weight",
                                                   "attention.linear_proj.weight")]
    return keys


# -- attention: megatron-core interleaves q, k, v per query group ----------------------------------

def _split_qkv(qkv: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, ...]:
    """megatron-core's [G·(N/G + 2)·H, D] (per group: its query heads, its key, its value) ->
    q [N·H, D], k [G·H, D], v [G·H, D]."""
    per_group = heads // groups
    qkv_GKHD = qkv.view(groups, per_group + 2, -1, qkv.size(-1))
    q, k, v = qkv_GKHD.split([per_group, 1, 1], dim=1)
    return tuple(t.reshape(-1, qkv.size(-1)).clone(memory_format=torch.contiguous_format) for t in (q, k, v))


def _join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    D = q.size(-1)
    qkv_GKHD = torch.cat([q.view(groups, -1, k.size(0) // groups, D), k.view(groups, 1, -1, D),
                          v.view(groups, 1, -1, D)], dim=1)
    return qkv_GKHD.reshape(-1, D)


def _attention(prefix: str, qkv: torch.Tensor, proj: torch.Tensor, args: DictConfig) -> dict:
    q, k, v = _split_qkv(qkv, args.num_attention_heads, args.num_query_groups)
    return {f"{prefix}q_proj.weight": q, f"{prefix}k_proj.weight": k, f"{prefix}v_proj.weight": v,
            f"{prefix}o_proj.weight": proj}


# -- THANN -> HF -------------------------------------------------------------------------------------

def to_hf(arrays: dict[str, torch.Tensor], args: DictConfig, hub: bool) -> dict[str, torch.Tensor]:
    """HF tensors (``hub``: the Hub's Mixtral naming, else transformers' module naming, with the
    learnt tokenization's under ``model.learnt_tokenization.``) of THANN checkpoint arrays. Each
    has storage of its own (safetensors refuses views of one another)."""
    out = {"model.embed_tokens.weight": arrays[EMBEDDING], "model.norm.weight": arrays[FINAL_NORM]}
    if OUTPUT in arrays:
        out["lm_head.weight"] = arrays[OUTPUT]
    for i in range(args.num_layers):
        layer = {name[len(LAYERS):]: array[i].clone() for name, array in arrays.items() if name.startswith(LAYERS)}
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = layer["input_layernorm.weight"]
        out[p + "post_attention_layernorm.weight"] = layer["pre_mlp_layernorm.weight"]
        out.update(_attention(p + "self_attn.", layer["self_attention.linear_qkv.weight"],
                              layer["self_attention.linear_proj.weight"], args))
        fc1_EDGF, fc2_EFD = layer["mlp.experts.fc1_weight"], layer["mlp.experts.fc2_weight"]
        if hub:
            out[p + "block_sparse_moe.gate.weight"] = layer["mlp.router.weight"]
            for e in range(args.num_experts):
                expert = f"{p}block_sparse_moe.experts.{e}."
                out[expert + "w1.weight"] = fc1_EDGF[e, :, 0].T.contiguous()
                out[expert + "w3.weight"] = fc1_EDGF[e, :, 1].T.contiguous()
                out[expert + "w2.weight"] = fc2_EFD[e].T.contiguous()
        else:
            E, D, G, F = fc1_EDGF.shape
            out[p + "mlp.gate.weight"] = layer["mlp.router.weight"]
            out[p + "mlp.experts.gate_up_proj"] = fc1_EDGF.permute(0, 2, 3, 1).reshape(E, G * F, D).contiguous()
            out[p + "mlp.experts.down_proj"] = fc2_EFD.transpose(1, 2).contiguous()
    if tokenization_widths(args):
        p = "model.learnt_tokenization."
        for name, array in arrays.items():
            if name.startswith(TOKENIZATION) and ".attention." not in name:
                out[p + name[len(TOKENIZATION):]] = array
        out.update(_attention(p + "attention.", arrays[TOKENIZATION + "attention.linear_qkv.weight"],
                              arrays[TOKENIZATION + "attention.linear_proj.weight"], args))
    return out


# -- a Mixtral directory -> THANN ---------------------------------------------------------------------

def from_hub(tensors: dict[str, torch.Tensor], args: DictConfig) -> dict[str, torch.Tensor]:
    """THANN checkpoint arrays of the Hub-named Mixtral tensors (the inverse of ``to_hf(..., hub=True)``)."""
    arrays = {EMBEDDING: tensors["model.embed_tokens.weight"], FINAL_NORM: tensors["model.norm.weight"]}
    if not args.tie_embeddings:
        arrays[OUTPUT] = tensors["lm_head.weight"]
    layers = []
    for i in range(args.num_layers):
        p = f"model.layers.{i}."
        experts = [f"{p}block_sparse_moe.experts.{e}." for e in range(args.num_experts)]
        attention = [tensors[f"{p}self_attn.{n}_proj.weight"] for n in "qkv"]
        layers.append({
            "input_layernorm.weight": tensors[p + "input_layernorm.weight"],
            "pre_mlp_layernorm.weight": tensors[p + "post_attention_layernorm.weight"],
            "self_attention.linear_qkv.weight": _join_qkv(*attention, args.num_query_groups),
            "self_attention.linear_proj.weight": tensors[p + "self_attn.o_proj.weight"],
            "mlp.router.weight": tensors[p + "block_sparse_moe.gate.weight"],
            "mlp.experts.fc1_weight": torch.stack([torch.stack([tensors[e + "w1.weight"].T, tensors[e + "w3.weight"].T],
                                                               dim=1) for e in experts]),
            "mlp.experts.fc2_weight": torch.stack([tensors[e + "w2.weight"].T for e in experts]),
        })
    for name in layers[0]:
        arrays[LAYERS + name] = torch.stack([layer[name] for layer in layers])
    return arrays


def is_model_dir(path: str) -> bool:
    """An HF model directory (a config.json), not a THANN run or checkpoint."""
    return os.path.isfile(os.path.join(path, "config.json"))


def _weight_map(path: str, field: str) -> dict[str, str]:
    """{tensor name: safetensors file} of the directory ``path`` (sharded or not)."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {name: os.path.join(path, file) for name, file in json.load(f)["weight_map"].items()}
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        with safe_open(single, "pt") as f:
            return dict.fromkeys(f.keys(), single)
    pickled = any(name.endswith(".bin") for name in os.listdir(path))
    raise ConfigError(field, path, "holds pickled weights (.bin), which can run code when loaded: convert them to "
                      "safetensors first" if pickled else "holds no model.safetensors (nor a safetensors index)")


def check_init(path: str, args: DictConfig, vocab_rows: int | None, field: str, args_field: str) -> None:
    """The Mixtral directory ``path`` can start THANN model ``args`` (read from ``args_field``, a
    language model or a model initialised by one) with ``vocab_rows`` embedding rows: ConfigError
    naming the first field that differs. Reads config.json only."""
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    require(hf.get("model_type") == "mixtral", field, path,
            f"is an HF model of type {hf.get('model_type')!r}; a THANN model starts from Mixtral directories "
            "(model_type mixtral)")
    target = registry.spec_of(args)
    require(target.arch == "thann" or "thann" in target.initialised_by, f"{args_field}.arch", target.arch,
            f"{field}={path} holds a language model (THANN's decoder), which cannot start a {target.arch}")
    require(tokenization_widths(args) is None, f"{args_field}.tokenization.enabled", True,
            f"{field}={path} is Mixtral, without THANN's learnt tokenization: set it to false")
    require(args.normalization == "RMSNorm" and not args.get("use_te", False), f"{args_field}.normalization",
            args.normalization, "a Mixtral directory starts THANN's RMSNorm layers (use_te=false)")
    for hf_field, thann_field in SHAPE:
        if hf.get(hf_field) != args[thann_field]:
            raise ConfigError(f"{args_field}.{thann_field}", args[thann_field],
                              f"{field}={path} holds a model with {hf_field}={hf.get(hf_field)!r}")
    rope = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta")}
    if rope.get("rope_type", "default") != "default" or rope.get("rope_theta") != args.rotary_base:
        raise ConfigError(f"{args_field}.rotary_base", args.rotary_base, f"{field}={path} holds a model with rope "
                          f"{rope}")
    require(hf.get("vocab_size") == vocab_rows, field, path, f"holds vocab_size={hf.get('vocab_size')}; this run's "
            f"tokenizer gives the model {vocab_rows} embedding rows (its vocabulary, padded): another vocabulary")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    for name, value, expected in (("head_dim", head_dim, args.hidden_size // args.num_attention_heads),
                                  ("hidden_act", hf.get("hidden_act", "silu"), "silu"),
                                  ("rms_norm_eps", hf.get("rms_norm_eps", 1e-5), norm_epsilon(args)),
                                  ("sliding_window", hf.get("sliding_window"), None)):
        require(value == expected, field, path,
                f"holds a model with {name}={value!r}; THANN's layers have {expected!r}")
    names = _weight_map(path, field)
    for name in ["model.embed_tokens.weight", "model.layers.0.block_sparse_moe.experts.0.w1.weight"] + (
            [] if args.tie_embeddings else ["lm_head.weight"]):
        require(name in names, field, path, f"holds no tensor {name} (the Hub's Mixtral naming)")


def read_model_dir(path: str, args: DictConfig) -> dict[str, torch.Tensor]:
    """THANN checkpoint arrays of the Mixtral directory ``path`` (its safetensors, sharded or not)."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(set(_weight_map(path, "init_from").values())):
        tensors.update(load_file(file))
    return from_hub(tensors, args)
