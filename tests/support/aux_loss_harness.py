"""The MoE load-balancing loss a training step reports, beside the value computed here from
what the routers saw: started by tests/test_recipes.py through torchrun.

    python tests/support/aux_loss_harness.py pretrain|contrastive OUT [hydra overrides]

Every router's input of the step's passes with gradients (megatron-core computes the loss in
those only) is captured; the reference is Switch Transformer's loss written out: per layer and
micro-batch, E / (k·T²) · Σ_e count_e · Σ_x p(x, e) over the micro-batch's T tokens (p: the
softmax over all E experts of the router logits; count_e: tokens whose top-k holds e), then the
mean over micro-batches and data-parallel ranks, the sum over layers, times the coefficient.
Under sequence parallelism each rank routes a slice of the sequence: the slices are gathered.
OUT (rank 0): the reported ``aux_loss`` and the reference.
"""

import sys

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from megatron.core import parallel_state
from megatron.core.transformer.moe.router import TopKRouter

from thann.cli import CONFIG_DIR
from thann.training.trainer import Trainer


def main(recipe: str, out: str, overrides: list[str]) -> None:
    if recipe == "pretrain":
        from thann.recipes.pretrain import Pretrain as Recipe
    else:
        from thann.recipes.contrastive import Contrastive as Recipe
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config" if recipe == "pretrain" else "contrastive", overrides=overrides)
    trainer = Trainer(cfg, Recipe)
    seen = []  # (router, its input, its weight) of every pass with gradients (the step then updates the weight)

    def capture(router, args):
        if router.training and torch.is_grad_enabled():
            seen.append((router, args[0].detach().float(), router.weight.detach().float().clone()))

    routers = [m for m in trainer.slots["model"].module.modules() if isinstance(m, TopKRouter)]
    for router in routers:
        router.register_forward_pre_hook(capture)
    record = trainer.train_step(trainer.recipe.train_batches(0))

    tp_group = parallel_state.get_tensor_model_parallel_group()
    per_layer = {}
    for router, x, weight in seen:
        if cfg.parallel.sp:
            parts = [torch.empty_like(x) for _ in range(dist.get_world_size(tp_group))]
            dist.all_gather(parts, x, group=tp_group)
            x = torch.cat(parts)
        tokens = x.reshape(-1, x.shape[-1])
        probs = torch.softmax(tokens @ weight.T, dim=-1)
        E, k, T = probs.shape[1], router.topk, tokens.shape[0]
        chosen = torch.zeros_like(probs).scatter(1, probs.topk(k, dim=1).indices, 1.0)
        loss = E / (k * T * T) * (chosen.sum(0) * probs.sum(0)).sum()
        per_layer.setdefault(id(router), []).append(loss)
    reference = torch.tensor(sum(torch.stack(v).mean().item() for v in per_layer.values()), dtype=torch.float64)
    reference = reference * trainer.slots["model"].config.moe_aux_loss_coeff
    dist.all_reduce(reference, group=parallel_state.get_data_parallel_group())
    reference /= dist.get_world_size(parallel_state.get_data_parallel_group())
    # pipeline stages hold different layers: their sums add up
    dist.all_reduce(reference, group=parallel_state.get_pipeline_model_parallel_group())
    if dist.get_rank() == 0:
        torch.save({"reported": record["aux_loss"], "reference": reference.item(), "layers": len(per_layer)}, out)
    trainer.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
