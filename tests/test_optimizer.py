"""The optimizer: megatron-core's, with torch's fused AdamW inside."""

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from omegaconf import OmegaConf

from test_model import VOCAB, _thann
from thann.parallel import state
from thann.training.optimizer import _torch_adams, build_optimizer

TRAIN = OmegaConf.create({"lr": 1e-3, "min_lr": 1e-4, "weight_decay": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.95,
                          "clip_grad": 0.0, "warmup_steps": 0, "steps": 10, "schedule": "cosine"})


def test_fused_adamw_updates_like_torch_reference_adamw(single_rank, tiny_model_cfg):
    model = _thann(tiny_model_cfg).train()
    model.learnt_tokenization.dropout.p = 0.0
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    optimizer, scheduler = build_optimizer(TRAIN, TRAIN.steps, False, [ddp], bf16=False)
    groups = [group for adam in _torch_adams(optimizer) for group in adam.param_groups]  # dense, experts
    assert len(groups) > 1 and all(group["fused"] and not group["foreach"] for group in groups)

    # The same groups (weight decay on matrices only, as megatron-core made them) for torch's
    # default (foreach) AdamW on copies of the parameters.
    copies = {p: p.detach().clone().requires_grad_() for group in groups for p in group["params"]}
    reference = torch.optim.AdamW(
        [{**{k: v for k, v in group.items() if k not in ("params", "fused", "foreach")},
          "params": [copies[p] for p in group["params"]]} for group in groups],
        foreach=True,
    )
    tokens = torch.randint(0, VOCAB, (2, 32), device=state.device())
    positions = torch.arange(32, device=state.device()).expand(2, 32)
    for _ in range(3):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        ddp(tokens, positions, None, labels=tokens).mean().backward()
        scheduler.step(increment=1)
        optimizer.step()  # megatron-core hands each main_grad to its parameter's .grad
        for p, copy in copies.items():
            copy.grad = p.grad.clone()
        for group, reference_group in zip(groups, reference.param_groups):
            reference_group["lr"] = group["lr"]
        reference.step()
        for p, copy in copies.items():
            torch.testing.assert_close(p, copy, rtol=1e-6, atol=1e-7)
    assert all(float(s["step"]) == 3 for adam in _torch_adams(optimizer) for s in adam.state.values())
