"""Runs the classification recipe on the trainer and records what tests/test_classify.py compares.
Started through torchrun (or plain python for one rank):

    python tests/support/classify_harness.py first_step INIT OUT [overrides of configs/classify.yaml]
    python tests/support/classify_harness.py stages OUT [overrides]

first_step: INIT holds full initial weights, written by the first (single-rank) run if missing.
OUT (rank 0): the step-0 evaluation record, the first step's loss and its full gradient
gathered into the single-rank layout.

stages: trains train.steps steps one by one and records, after each, every parameter and the
size of its Adam first moment; then the same run again with the stage-change reset of the
optimizer state switched off (what the reset prevents).
"""

import sys

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir

from full_state import gradients_before_the_update, start_from_shared_weights
from thann.cli import CONFIG_DIR
from thann.recipes.classify import Classify
from thann.training import context
from thann.training.trainer import Trainer


def config(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="classify", overrides=overrides)


def first_step(init_path: str, out_path: str, overrides: list[str]) -> None:
    trainer = Trainer(config(overrides), Classify)
    slot = trainer.slots["model"]
    tensors = start_from_shared_weights(slot.chunks, slot.optimizer, init_path)
    evaluation = trainer.evaluate()
    parameters = [t for t in tensors if hasattr(t.data, "main_grad")]  # not the buffers (sign_N)
    gradients = gradients_before_the_update(slot, parameters)
    loss = trainer.train_step(trainer.recipe.train_batches(0))["cross_entropy"]
    if dist.get_rank() == 0:
        torch.save({"evaluation": evaluation, "loss": loss, "gradients": gradients[0]}, out_path)
    trainer.close()


def _trajectory(overrides: list[str]) -> dict:
    trainer = Trainer(config(overrides), Classify)
    slot = trainer.slots["model"]
    module = slot.module
    # fp32 on CPU: torch's Adams (one per megatron-core optimizer) step the model's own parameters.
    adam_state = {}
    for inner in getattr(slot.optimizer, "chained_optimizers", [slot.optimizer]):
        adam_state.update(inner.optimizer.state)

    def snapshot():
        return ({name: p.detach().clone() for name, p in module.named_parameters()},
                {name: adam_state[p]["exp_avg"].abs().sum().item() for name, p in module.named_parameters()})

    weights, moments = [snapshot()[0]], [snapshot()[1]]
    batches = trainer.recipe.train_batches(0)
    for _ in range(trainer.cfg.train.steps):
        trainer.train_step(batches)
        w, m = snapshot()
        weights.append(w)
        moments.append(m)
    trainer.close()
    return {"weights": weights, "moments": moments}


def stages(out_path: str, overrides: list[str]) -> None:
    with_reset = _trajectory(overrides)
    context.reset_adam_state = lambda optimizer: None
    without_reset = _trajectory(overrides)
    torch.save({"reset": with_reset, "no_reset": without_reset}, out_path)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "first_step":
        first_step(sys.argv[2], sys.argv[3], sys.argv[4:])
    elif mode == "stages":
        stages(sys.argv[2], sys.argv[3:])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
