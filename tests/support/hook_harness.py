"""A hook after the optimizer step that writes a weight, under data parallelism with the
distributed optimizer and bf16 (fp32 master weights): started by tests/test_recipes.py through
torchrun.

    python tests/support/hook_harness.py OUT [hydra overrides of configs/config.yaml]

Step 1's hook adds rank + 1 to the final norm's weight on each rank (so ranks write different
values); step 2 runs without it. OUT (rank 0): that weight on every rank before the hook, after
step 1 and after step 2; every weight of every rank after step 2; how many elements of each
fp32 master copy the write changed (unchanged elements must keep their fp32 bits).
"""

import sys

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir

from thann.cli import CONFIG_DIR
from thann.recipes.pretrain import Pretrain
from thann.training.trainer import Trainer

NAME = "decoder.final_layernorm.weight"


def _everyone(tensor: torch.Tensor) -> list[torch.Tensor]:
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return gathered


def _main_params(optimizer) -> list[torch.Tensor]:
    """The fp32 master copies megatron-core's bf16 optimizer keeps (this rank's shards)."""
    copies = []
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        copies += [main.clone() for main in inner._get_model_and_main_params_data_float16()[1]]
    return copies


def main(out: str, overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    trainer = Trainer(cfg, Pretrain)
    slot = trainer.slots["model"]
    param = dict(slot.module.named_parameters())[NAME]
    seen = {}

    def add_rank(target):
        seen["before_hook"] = _everyone(param.detach().float())
        seen["main_before"] = _main_params(target.optimizer)
        with torch.no_grad():
            param.add_(dist.get_rank() + 1.0)
        return [param]

    slot.after_step.append(add_rank)
    batches = trainer.recipe.train_batches(0)
    trainer.train_step(batches)
    main_after = _main_params(slot.optimizer)
    after_step_1 = _everyone(param.detach().float())
    slot.after_step.clear()
    trainer.train_step(batches)
    after_step_2 = _everyone(param.detach().float())
    every_weight = _everyone(torch.cat([p.detach().float().flatten() for p in slot.module.parameters()]))
    # master elements that changed when the write was carried, over every rank's shards
    changed = torch.tensor([float(sum((a != b).sum() for a, b in zip(seen["main_before"], main_after)))])
    dist.all_reduce(changed)
    if dist.get_rank() == 0:
        torch.save({"before_hook": seen["before_hook"], "after_step_1": after_step_1, "after_step_2": after_step_2,
                    "every_weight": every_weight, "main_changed": changed}, out)
    trainer.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
