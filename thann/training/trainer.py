"""The training loop: one for every task.

config -> checks -> process groups -> model (megatron-core DDP, bf16 wrapper on GPU) ->
optimizer + schedule -> steps of megatron-core's forward_backward_func -> metrics.
"""

import math
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
    reduce_aux_losses_tracker_across_ranks,
)
from omegaconf import DictConfig

from thann import config as config_checks
from thann.checkpoint.checkpointer import Checkpointer
from thann.parallel import state
from thann.training.metrics import MetricsLogger
from thann.training.optimizer import build_optimizer
from thann.training.signals import StopRequest


def use_bf16(train_cfg) -> bool:
    if train_cfg.precision == "auto":
        return torch.cuda.is_available()
    return train_cfg.precision == "bf16"


def wrap_model(task, transformer_config, distributed_optimizer: bool) -> list:
    """Builds this rank's pipeline stage of the task's model and wraps it for training."""
    model = task.build_model(
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    ).to(state.device())
    if transformer_config.bf16:
        model = Float16Module(transformer_config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer,
    )
    model = DistributedDataParallel(transformer_config, ddp_config, model)
    transformer_config.finalize_model_grads_func = finalize_model_grads
    transformer_config.no_sync_func = model.no_sync
    return [model]


class NonFiniteLoss(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: DictConfig, make_task):
        dp = config_checks.check(cfg, state.world_size_from_env())
        self.cfg = cfg
        self.layout = state.initialize(cfg.parallel, dp, cfg.train.seed)
        self.bf16 = use_bf16(cfg.train)
        self.task = make_task(cfg, self.layout, self.bf16)
        self.config = self.task.transformer_config
        self.model = wrap_model(self.task, self.config, cfg.parallel.distributed_optimizer)
        self.optimizer, self.scheduler = build_optimizer(
            cfg.train, cfg.parallel.distributed_optimizer, self.model, self.bf16
        )
        self.num_microbatches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
        self.step = 0
        self.consumed_samples = 0
        self.forward_backward = get_forward_backward_func()
        self.checkpointer = Checkpointer(cfg.checkpoint, self)
        self.resumed_from = self.checkpointer.resume()
        self.metrics = MetricsLogger(cfg, self.layout.describe(), is_logging_rank=dist.get_rank() == 0,
                                     resume=self.resumed_from is not None)
        self.stop_request = StopRequest(state.device())
        self.stopped_by_signal = False

    # -- one step ---------------------------------------------------------------------------

    def _run(self, batches, num_microbatches: int, forward_only: bool) -> list[dict]:
        return self.forward_backward(
            forward_step_func=self.task.forward_step,
            data_iterator=batches,
            model=self.model,
            num_microbatches=num_microbatches,
            seq_length=self.cfg.train.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size,
            forward_only=forward_only,
        )

    def reduce_reports(self, reports: list[dict]) -> dict[str, float]:
        """Sums [sum, count] reports over micro-batches and data-parallel ranks. Reports exist on
        the last pipeline stage, identical on its tensor-parallel ranks: one of those counts."""
        keys = self.task.report_keys
        totals = torch.zeros(len(keys), 2, dtype=torch.float64, device=state.device())
        counts_here = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
        if counts_here:
            for report in reports:
                totals += torch.stack([report[k].double() for k in keys])
        dist.all_reduce(totals)
        return {k: (totals[i, 0] / totals[i, 1]).item() for i, k in enumerate(keys)}

    def _aux_loss(self) -> float:
        reduce_aux_losses_tracker_across_ranks()
        tracker = get_moe_layer_wise_logging_tracker()
        values = tracker["load_balancing_loss"]["values"] if "load_balancing_loss" in tracker else torch.zeros(1)
        aux = self.config.moe_aux_loss_coeff * values.sum().item() / self.num_microbatches
        clear_aux_losses_tracker()
        return aux

    def forward_backward_step(self, batches) -> list[dict]:
        """Gradients of one global batch, reduced over data-parallel ranks; returns the loss reports."""
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        return self._run(batches, self.num_microbatches, forward_only=False)

    def optimizer_step(self, skip: bool = False) -> float:
        """Applies the update (unless ``skip``); the step and the data position advance either way."""
        self.scheduler.step(increment=1)  # lr for this step: warmup reaches lr at step warmup_steps
        grad_norm = None
        if not skip:
            _, grad_norm, _ = self.optimizer.step()
        self.step += 1
        self.consumed_samples += self.cfg.train.global_batch_size
        return float(grad_norm) if grad_norm is not None else math.nan

    def train_step(self, batches) -> dict:
        start = time.perf_counter()
        reports = self.forward_backward_step(batches)
        losses = self.reduce_reports(reports)  # .item() waits for the device
        finite = math.isfinite(losses["lm_loss"])
        if not finite and self.cfg.train.on_nonfinite_loss == "stop":
            raise NonFiniteLoss(f"non-finite loss ({losses['lm_loss']}) at step {self.step + 1}; "
                                "train.on_nonfinite_loss=skip would skip such steps")
        grad_norm = self.optimizer_step(skip=not finite)
        aux_loss = self._aux_loss()
        seconds = time.perf_counter() - start
        tokens_per_s = self.cfg.train.global_batch_size * self.cfg.train.seq_length / seconds
        record = {
            "step": self.step,
            "split": "train",
            "loss": losses["lm_loss"] + aux_loss,
            **losses,
            "aux_loss": aux_loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "step_time_s": seconds,
        }
        if not finite:
            record["skipped"] = True
        if torch.cuda.is_available():
            flops = self.task.flops_per_token * tokens_per_s / dist.get_world_size()
            record["mfu"] = flops / (self.cfg.logging.peak_tflops * 1e12)
        return record

    @torch.no_grad()
    def evaluate(self) -> dict:
        for chunk in self.model:
            chunk.eval()
        reports = self._run(self.task.valid_batches(), self.cfg.train.eval_iters * self.num_microbatches,
                            forward_only=True)
        for chunk in self.model:
            chunk.train()
        clear_aux_losses_tracker()
        losses = self.reduce_reports(reports)
        return {"step": self.step, "split": "valid", "loss": losses["lm_loss"], **losses}

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> list[dict]:
        cfg = self.cfg.train
        self.metrics.message(f"THANN: layout {self.layout.describe()}, {self.num_microbatches} micro-batches/step")
        history = []
        if self.resumed_from is None:
            history.append(self.evaluate())
            self.metrics.log(history[-1])
        else:
            self.metrics.message(f"resumed from {self.resumed_from} at step {self.step}")
        batches = self.task.train_batches(self.consumed_samples)
        save = self.cfg.checkpoint.save
        interval = self.cfg.checkpoint.interval
        last = min(cfg.steps, cfg.stop_after_step or cfg.steps)
        while self.step < last:
            record = self.train_step(batches)
            history.append(record)
            if self.step % self.cfg.logging.log_interval == 0 or self.step == last:
                self.metrics.log(record)
            if self.step % cfg.eval_interval == 0 or self.step == cfg.steps:
                history.append(self.evaluate())
                self.metrics.log(history[-1])
            stop = self.stop_request.agreed()
            if save and (stop or (interval and self.step % interval == 0) or self.step == last):
                self.metrics.message(f"saved {self.checkpointer.save()}")
            if stop:
                self.metrics.message(f"stopped by {self.stop_request.signal or 'a signal on another rank'} "
                                     f"after step {self.step}; start again to resume")
                self.stopped_by_signal = True
                self.metrics.close()
                return history
        self.task.on_train_end(self.model, self.metrics.message)
        self.metrics.close()
        return history
