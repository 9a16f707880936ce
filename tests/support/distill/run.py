"""The two-slot test recipe's entry point, as THANN's own are made (thann.cli.EntryPoint):

    python tests/support/distill/run.py distill.teacher=RUN_DIR [overrides]      trains (exit codes as THANN's)
    python tests/support/distill/run.py --probe OUT INIT distill.teacher=...      the layout tests' first step

--probe (under torchrun for a layout): starts the student from INIT (full weights, written by a
single-rank run when missing), trains one step and writes (rank 0) its loss, the student's full
gradient before the update, and the teacher's full weights after the step.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # recipe.py and model.py; tests/support (full_state)

from thann.cli import EntryPoint, load_config, run_recipe  # noqa: E402

ENTRY = EntryPoint("recipe:Distill", "distill", "tests/support/distill/run.py", "Distils a THANN teacher.", (), (),
                   config_dir=HERE)


def probe(out: str, init: str, overrides: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from full_state import gather_full, gradients_before_the_update, model_sharded_tensors, start_from_shared_weights
    from recipe import Distill
    from thann.training.trainer import Trainer

    trainer = Trainer(load_config("distill", overrides, HERE), Distill)
    student, teacher = trainer.slots["student"], trainer.slots["teacher"]
    tensors = start_from_shared_weights(student.chunks, student.optimizer, init)
    gradients = gradients_before_the_update(student, tensors)
    record = trainer.train_step(trainer.recipe.train_batches(0))
    teacher_weights = gather_full(model_sharded_tensors(teacher.chunks))
    if dist.get_rank() == 0:
        torch.save({"loss": record["kl"], "gradients": gradients[0], "teacher": teacher_weights}, out)
    trainer.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--probe"]:
        probe(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        run_recipe(ENTRY)
