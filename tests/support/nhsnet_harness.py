"""NHS-Net under data parallelism with its local rules on: started by tests/test_nhsnet.py through
torchrun.

    python tests/support/nhsnet_harness.py OUT [overrides of configs/classify.yaml]

Trains train.steps steps of the classification recipe. Around the model's after-step rules of
each step it records block 0's Hebbian weight as the optimizer left it and as the rules left it,
and after the step that weight's fp32 master copy. OUT (rank 0): "state", per step, each rank's
parameters, buffers, fp32 master weights and Adam state by name; "hebbian", per step, the three
tensors above (rank 0's).
"""

import sys

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir

from thann.cli import CONFIG_DIR
from thann.recipes.classify import Classify
from thann.training.trainer import Trainer

HEBBIAN = "blocks.0.conv1.weight"


def _inner(optimizer) -> list:
    return [inner for inner in getattr(optimizer, "chained_optimizers", [optimizer])]


def _state(slot) -> dict[str, torch.Tensor]:
    """Everything a rank holds of the model and its optimizer, by name (the non-distributed
    optimizer keeps the whole fp32 master copy and Adam state on every rank). In bf16 the Adam
    state is keyed by the fp32 master copies, in fp32 by the model's parameters themselves."""
    module = slot.module
    state = {f"param.{n}": p.detach().float().clone() for n, p in module.named_parameters()}
    state.update({f"buffer.{n}": b.detach().clone() for n, b in module.named_buffers()})
    names = {p.data_ptr(): n for n, p in module.named_parameters()}
    for inner in _inner(slot.optimizer):
        adam = inner.optimizer.state
        if hasattr(inner, "fp32_from_float16_groups"):
            pairs = [pair for group, main_group in zip(inner.float16_groups, inner.fp32_from_float16_groups)
                     for pair in zip(group, main_group)]
            for model, main in pairs:
                state[f"main.{names[model.data_ptr()]}"] = main.detach().clone()
        else:
            pairs = [(p, p) for group in inner.optimizer.param_groups for p in group["params"]]
        for model, main in pairs:
            for key, value in adam[main].items():
                state[f"adam.{names[model.data_ptr()]}.{key}"] = value.detach().clone()
    return state


def _main_copy(slot, param) -> torch.Tensor:
    """The fp32 master copy of ``param`` (in fp32: the parameter itself)."""
    for inner in _inner(slot.optimizer):
        if not hasattr(inner, "fp32_from_float16_groups"):
            return param.detach().float().clone()
        for group, main_group in zip(inner.float16_groups, inner.fp32_from_float16_groups):
            for model, main in zip(group, main_group):
                if model.data_ptr() == param.data_ptr():
                    return main.detach().clone()
    raise KeyError("no fp32 master copy of the Hebbian weight")


def _every_rank(state: dict) -> list[dict]:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state)
    return gathered


def main(out: str, overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="classify", overrides=overrides)
    trainer = Trainer(cfg, Classify)
    slot = trainer.slots["model"]
    module = slot.module
    weight = dict(module.named_parameters())[HEBBIAN]
    rules = module.after_step
    record = {}

    def observed_rules(step, all_reduce_sum):
        record["after_update"] = weight.detach().float().clone()
        changed = rules(step, all_reduce_sum)
        record["after_rules"] = weight.detach().float().clone()
        return changed

    module.after_step = observed_rules  # the recipe's hook looks it up at every step
    states, hebbian = [], []
    batches = trainer.recipe.train_batches(0)
    for _ in range(cfg.train.steps):
        trainer.train_step(batches)
        hebbian.append({**record, "main": _main_copy(slot, weight)})
        states.append(_every_rank({k: v.cpu() for k, v in _state(slot).items()}))
    if dist.get_rank() == 0:
        torch.save({"state": states, "hebbian": hebbian}, out)
    trainer.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
