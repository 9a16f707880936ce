"""One PPO iteration in one parallel layout, recording what tests/test_ppo.py compares with a
single rank (through torchrun):

    python tests/support/ppo_harness.py OUT [hydra overrides of configs/ppo.yaml]

OUT (rank 0): the iteration's metrics, its gathered rollouts' scores, advantages and returns, and
the actor's and the critic's full gradients (gathered into the single-rank layout) of their first
update, before it is applied.
"""

import sys

import torch
import torch.distributed as dist

from full_state import gradients_before_the_update, model_sharded_tensors
from thann.cli import load_config
from thann.recipes.ppo import PPO
from thann.training.trainer import Trainer


def main(out: str, overrides: list[str]) -> None:
    trainer = Trainer(load_config("ppo", overrides), PPO)
    gradients = {name: gradients_before_the_update(slot, model_sharded_tensors(slot.chunks))
                 for name, slot in trainer.slots.items() if name in ("actor", "critic")}
    recipe, seen = trainer.recipe, {}
    advantages = recipe.advantages

    def recorded(batch):
        stats = advantages(batch)
        seen.update({k: batch[k].clone() for k in ("score", "advantages", "returns", "tokens")})
        return stats

    recipe.advantages = recorded
    record = trainer.train_step(recipe.train_batches(0))
    if dist.get_rank() == 0:
        torch.save({"record": record, **seen, "gradients": {k: v[0] for k, v in gradients.items() if v}}, out)
    trainer.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
