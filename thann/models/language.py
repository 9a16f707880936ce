"""The language models THANN trains and generates with, by ``model.arch``: what the LM tasks
and the generator need from a model family, and nothing else.

    thann   the MoE transformer with learnt tokenization (thann.models.thann)
    nnn     the cascade of matmul-free nodes (thann.models.nnn)
    gpt     a dense transformer, the parameter-matched baseline (thann.models.gpt)

A family checks its config (alone and against the layout), makes megatron-core's
TransformerConfig, builds one pipeline stage and counts its training FLOPs per token.
"""

from dataclasses import dataclass
from typing import Callable

from omegaconf import DictConfig

from thann.config import require


@dataclass(frozen=True)
class LanguageModelFamily:
    check: Callable  # (model_cfg, parallel_cfg, recompute) -> None, raising ConfigError
    transformer_config: Callable  # (model_cfg, parallel_cfg, *, bf16, recompute) -> TransformerConfig
    build: Callable  # (config, model_cfg, vocab_size, max_sequence_length, pre_process, post_process) -> module
    flops_per_token: Callable  # (model_cfg, vocab_size, seq_length) -> float
    num_parameters: Callable  # (model_cfg, vocab_size) -> int, from the shape alone
    # Model config fields a resumed run may change (the rest is the model's shape).
    resumable_changes: tuple[str, ...]


def _thann() -> LanguageModelFamily:
    from thann.models.thann import checks
    from thann.models.thann.model import ThannModel, transformer_config
    from thann.models.thann.size import model_size

    def check(model_cfg, parallel_cfg, recompute: str) -> None:
        checks.check_model(model_cfg)
        checks.check_layout(model_cfg, parallel_cfg)
        checks.check_recompute(recompute)

    def build(config, model_cfg, vocab_size, max_sequence_length, pre_process, post_process):
        return ThannModel(config, model_cfg, vocab_size, max_sequence_length, pre_process=pre_process,
                          post_process=post_process)

    def flops(model_cfg, vocab_size, seq_length):
        return model_size(model_cfg, vocab_size).flops_per_token(model_cfg, vocab_size, seq_length)

    return LanguageModelFamily(check, transformer_config, build, flops,
                               lambda model_cfg, vocab_size: model_size(model_cfg, vocab_size).total,
                               ("name", "dropout", "moe_aux_loss_coeff", "init_method_std"))


def _nnn() -> LanguageModelFamily:
    from thann.models.nnn.model import NNNModel, check_model_config, nnn_transformer_config, num_parameters

    def check(model_cfg, parallel_cfg, recompute: str) -> None:
        check_model_config(model_cfg)
        require(parallel_cfg.tp == 1, "parallel.tp", parallel_cfg.tp,
                "NNN has no tensor-parallel BitLinear: use 1 (data and pipeline parallelism are supported)")
        require(model_cfg.num_nodes % parallel_cfg.pp == 0, "parallel.pp", parallel_cfg.pp,
                f"must divide model.num_nodes={model_cfg.num_nodes} (each stage holds the same number of nodes)")
        require(parallel_cfg.ep == 1 and parallel_cfg.etp == 1, "parallel.ep", parallel_cfg.ep,
                "NNN has no experts: use 1")
        require(recompute == "none", "train.recompute", recompute, "NNN has no activation recompute: use none")

    def transformer_config(model_cfg, parallel_cfg, *, bf16: bool, recompute: str = "none"):
        return nnn_transformer_config(model_cfg, parallel_cfg, bf16=bf16)

    def build(config, model_cfg, vocab_size, max_sequence_length, pre_process, post_process):
        return NNNModel(config, model_cfg, vocab_size, pre_process=pre_process, post_process=post_process)

    def flops(model_cfg, vocab_size, seq_length):
        # 6 per parameter and token (every parameter but the embedding table is used by each token)
        embedding = vocab_size * model_cfg.hidden_size
        return 6 * (num_parameters(model_cfg, vocab_size) - embedding)

    return LanguageModelFamily(check, transformer_config, build, flops, num_parameters, ("name", "init_method_std"))


def _gpt() -> LanguageModelFamily:
    from thann.models.gpt.model import DenseGPT, check, dense_transformer_config, num_parameters

    def build(config, model_cfg, vocab_size, max_sequence_length, pre_process, post_process):
        return DenseGPT(config, model_cfg, vocab_size, max_sequence_length, pre_process, post_process)

    def flops(model_cfg, vocab_size, seq_length):
        h = model_cfg.hidden_size
        embedding = vocab_size * h * (1 if model_cfg.tie_embeddings else 2)
        return 6 * (num_parameters(model_cfg, vocab_size) - embedding) + 6 * h * vocab_size + \
            12 * model_cfg.num_layers * h * seq_length

    return LanguageModelFamily(check, dense_transformer_config, build, flops, num_parameters,
                               ("name", "dropout", "init_method_std"))


_FAMILIES = {"thann": _thann, "nnn": _nnn, "gpt": _gpt}


def family(model_cfg: DictConfig) -> LanguageModelFamily:
    """The family of ``model_cfg.arch`` (``thann`` for configs written before it existed)."""
    arch = model_cfg.get("arch", "thann")
    require(arch in _FAMILIES, "model.arch", arch, f"must be one of {sorted(_FAMILIES)} for a language model")
    return _FAMILIES[arch]()
