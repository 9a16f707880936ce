"""Named model slots: what a recipe trains or reads, built in the run's layout.

A recipe declares its slots as a pure function of the config (``Recipe.slots(cfg)``), so that the
resume policy can compare them with a checkpoint before anything is built. A slot is

- **trainable** (``optim`` set): megatron-core DDP around the model, its own optimizer and
  learning-rate schedule, saved in every checkpoint under its name;
- **frozen** (``optim`` None): the model alone, in evaluation mode, without gradients, loaded
  from ``init`` on every start (fresh or resumed) and never saved.

Every slot is built through the model registry with its own TransformerConfig instance (DDP and
the pipeline schedule write hooks onto it), so two slots never share one.
"""

from dataclasses import dataclass, field
from typing import Callable

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import unwrap_model
from omegaconf import DictConfig, OmegaConf

from thann.models import registry
from thann.training.optimizer import build_optimizer


@dataclass(frozen=True)
class SlotSpec:
    args: DictConfig  # the model: registry args (arch and shape)
    field: str = "model"  # where args come from in the run's config (names a refused shape change)
    vocab_size: int | None = None  # the tokenizer's vocabulary (unpadded); None: reads no tokens
    seq_length: int | None = None  # the longest sequence the slot reads
    optim: DictConfig | None = None  # trainable: lr, min_lr, warmup_steps, schedule, weight_decay, betas, clip_grad
    init: str | None = None  # a checkpoint to start from: every start (frozen), a fresh start (trainable)
    init_slot: str | None = None  # which slot of ``init`` (None: its primary)
    init_strict: bool = True  # False: parts ``init`` lacks keep their initial weights (a new head)
    init_field: str = "init_from"  # where ``init`` comes from in the run's config (names a refusal)

    @property
    def trainable(self) -> bool:
        return self.optim is not None

    def record(self) -> dict:
        """What a checkpoint keeps of the slot, to rebuild it without the run's config."""
        return {"args": OmegaConf.to_container(self.args, resolve=True), "vocab_size": self.vocab_size,
                "seq_length": self.seq_length, "trainable": self.trainable, "init": self.init}


@dataclass
class Slot:
    name: str
    spec: SlotSpec
    chunks: list  # this rank's model chunks: [DDP(model)] when trainable, [model] when frozen
    config: TransformerConfig  # this slot's own
    optimizer: object = None
    scheduler: object = None
    # Called after each optimizer step of the slot (StepContext.optimizer_step), e.g. a local
    # learning rule; each returns the parameters it changed (None: none).
    after_step: list[Callable] = field(default_factory=list)

    @property
    def trainable(self) -> bool:
        return self.optimizer is not None

    @property
    def module(self):
        """The model itself (no DDP or bf16 wrapper)."""
        return unwrap_model(self.chunks[0])


def build_slot(name: str, spec: SlotSpec, parallel_cfg, *, bf16: bool, recompute: str, steps: int) -> Slot:
    """``steps``: the length of the run in iterations (the learning-rate schedule's)."""
    recompute = recompute if spec.trainable else "none"
    module, config = registry.build(spec.args, parallel_cfg, vocab_size=spec.vocab_size,
                                    max_sequence_length=spec.seq_length, bf16=bf16, recompute=recompute)
    if not spec.trainable:
        module.eval()
        module.requires_grad_(False)
        return Slot(name, spec, [module], config)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=parallel_cfg.distributed_optimizer)
    model = DistributedDataParallel(config, ddp_config, module)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync
    optimizer, scheduler = build_optimizer(spec.optim, steps, parallel_cfg.distributed_optimizer, [model], bf16)
    return Slot(name, spec, [model], config, optimizer, scheduler)
