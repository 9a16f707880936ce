"""Parameter counts of a model config, built on the meta device (no memory for weights).

    python -m thann.summary model=thann_800m
    total_params=822214656 active_params=483000320
"""

import sys

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from thann.cli import CONFIG_DIR
from thann.data.tokenizer import build_tokenizer, padded_vocab_size
from thann.models.thann.model import ThannModel, transformer_config
from thann.models.thann.size import model_size
from thann.parallel import state


def meta_parameter_counts(model_cfg, vocab_size: int) -> tuple[int, int]:
    """(total, expert) parameter counts of the model built on the meta device, world of one."""
    single = OmegaConf.create({"tp": 1, "pp": 1, "ep": 1, "etp": 1, "sp": False})
    state.initialize(single, dp=1, seed=0)
    config = transformer_config(model_cfg, single, bf16=False,
                                perform_initialization=False)
    with torch.device("meta"):
        model = ThannModel(config, model_cfg, vocab_size, max_sequence_length=2048)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    state.destroy()
    return total, experts


def main(overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    vocab_size = padded_vocab_size(
        build_tokenizer(cfg.data.tokenizer.type, cfg.data.tokenizer.model).vocab_size, tensor_parallel_size=1)
    total, experts = meta_parameter_counts(cfg.model, vocab_size)
    size = model_size(cfg.model, vocab_size)
    if (total, experts) != (size.total, size.experts):
        raise RuntimeError(f"built model has {total} parameters ({experts} in experts); "
                           f"thann.models.thann.size counts {size.total} ({size.experts})")
    print(f"model={cfg.model.name} vocab={vocab_size} layers={cfg.model.num_layers} hidden={cfg.model.hidden_size} "
          f"experts={cfg.model.num_experts} top{cfg.model.moe_router_topk} expert_ffn={cfg.model.moe_ffn_hidden_size}")
    print(f"total_params={size.total} active_params={size.active}")


if __name__ == "__main__":
    main(sys.argv[1:])
