"""megatron-core's optimizer (Adam, fp32 master weights under bf16, optional ZeRO-1 distributed
optimizer, gradient clipping) and its warmup + decay learning-rate schedule."""

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def build_optimizer(train_cfg, distributed_optimizer: bool, model_chunks, bf16: bool):
    config = OptimizerConfig(
        optimizer="adam",
        lr=train_cfg.lr,
        min_lr=train_cfg.min_lr,
        weight_decay=train_cfg.weight_decay,
        adam_beta1=train_cfg.adam_beta1,
        adam_beta2=train_cfg.adam_beta2,
        adam_eps=1e-8,
        clip_grad=train_cfg.clip_grad,
        bf16=bf16,
        use_distributed_optimizer=distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, model_chunks)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=train_cfg.lr,
        min_lr=train_cfg.min_lr,
        lr_warmup_steps=train_cfg.warmup_steps,
        lr_decay_steps=train_cfg.steps,
        lr_decay_style=train_cfg.schedule,
        start_wd=train_cfg.weight_decay,
        end_wd=train_cfg.weight_decay,
        wd_incr_steps=train_cfg.steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler
