"""The training loop: one for every task.

config checks (shared, then the task's) -> process groups -> the checkpoint directory's lock ->
task -> model (megatron-core DDP, bf16 wrapper on GPU) -> optimizer + schedule -> resume ->
steps chosen by the task -> metrics and checkpoints of named parts.
"""

import math
import sys
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from omegaconf import DictConfig, OmegaConf

from thann import config as config_checks
from thann.checkpoint.checkpointer import Checkpointer, find_checkpoints, latest_checkpoint
from thann.checkpoint.parts import ModelPart, OptimizerPart, PlainPart, SchedulerPart
from thann.parallel import state
from thann.training.metrics import MetricsLogger, run_files, run_summary
from thann.training.optimizer import build_optimizer, unshare_adam_steps
from thann.training.resume import config_changes
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


class NonFiniteWeights(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: DictConfig, task_class, stop_request: StopRequest | None = None):
        dp = config_checks.check(cfg, state.world_size_from_env())
        task_class.check_config(cfg, dp)
        self.cfg = cfg
        self.stop_request = stop_request or StopRequest()
        self.stopped_by_signal = False
        self.layout = state.initialize(cfg.parallel, dp, cfg.train.seed)
        self.is_logging_rank = dist.get_rank() == 0
        self.metrics = None
        self.summary = None  # what the run did, printed last (fit)
        self.checkpointer = Checkpointer(cfg.checkpoint, message=self.message)
        self.checkpointer.acquire()
        try:
            self._build(task_class, dp)
        except BaseException:
            self.checkpointer.release()  # a run that never started leaves the directory free
            raise

    def _build(self, task_class, dp: int) -> None:
        cfg = self.cfg
        candidates, changes = self._resume_plan(task_class)

        self.bf16 = use_bf16(cfg.train)
        self.task = task_class(cfg, self.layout, self.bf16)
        self.config = self.task.transformer_config
        self.model = wrap_model(self.task, self.config, cfg.parallel.distributed_optimizer)
        self.optimizer, self.scheduler = build_optimizer(
            cfg.train, cfg.parallel.distributed_optimizer, self.model, self.bf16
        )
        self.num_microbatches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
        self.step = 0
        self.consumed_samples = 0
        self.schedule = get_forward_backward_func()

        model = ModelPart(self.model)
        self.checkpointer.attach({
            "model": model,
            "optimizer": OptimizerPart(self.optimizer, model, after_load=unshare_adam_steps),
            "scheduler": SchedulerPart(self.scheduler),
            "train": PlainPart(self._position, self._set_position),
            **self.task.checkpoint_parts(),
        })
        tokenizer = self.task.tokenizer.identity if self.task.tokenizer else None
        resumed = self.checkpointer.resume(candidates, tokenizer, vars(self.layout))
        self.resumed_from = resumed.path if resumed else None
        if resumed is None:
            initialized = self.task.initialize(self.model)
            if initialized:
                self.optimizer.reload_model_params()  # fp32 main copies follow the loaded weights
                self.message(initialized)
        if resumed and changes:
            self.message("the config differs from the checkpoint's:\n" + "\n".join(changes))
        self.metrics = MetricsLogger(cfg, self.layout.describe(), self.is_logging_rank,
                                     resumed_step=self.step if resumed else None)

    def _resume_plan(self, task_class) -> tuple[list, list[str]]:
        """The checkpoints this run may resume from, newest first, and what its config changes;
        refuses (ConfigError) before anything is built when the model's shape changed."""
        ckpt = self.cfg.checkpoint
        self.checkpointer.tidy()
        found = find_checkpoints(ckpt.dir)
        if not ckpt.resume or not found:
            self.checkpointer.start_fresh(run_files(self.cfg.logging),
                                          "checkpoint.resume=false" if found else "nothing to resume")
            return [], []
        newest = found[0]
        if self.cfg.train.steps < newest.step:
            raise config_checks.ConfigError("train.steps", self.cfg.train.steps,
                                            f"the checkpoint {newest.path} is already at step {newest.step}; "
                                            "raise train.steps to continue training")
        return found, config_changes(newest.metadata["config"], self.cfg,
                                     task_class.resumable_model_changes(self.cfg), newest.path)

    def _position(self) -> dict:
        return {"step": self.step, "consumed_samples": self.consumed_samples}

    def _set_position(self, position: dict) -> None:
        self.step = position["step"]
        self.consumed_samples = position["consumed_samples"]

    def message(self, text: str) -> None:
        if self.metrics is not None:
            self.metrics.message(text)
        elif self.is_logging_rank:
            print(text, flush=True)

    # -- one step ---------------------------------------------------------------------------

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

    def forward_backward_step(self, batches) -> list[dict]:
        """Gradients of one global batch, reduced over data-parallel ranks; returns the loss reports."""
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        return self.task.forward_backward(self, batches, self.num_microbatches, forward_only=False)

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
        metrics = self.task.metrics(self.reduce_reports(reports), "train")  # .item() waits for the device
        finite = math.isfinite(metrics["loss"])
        if not finite and self.cfg.train.on_nonfinite_loss == "stop":
            raise NonFiniteLoss(f"non-finite loss ({metrics['loss']}) at step {self.step + 1}; "
                                "train.on_nonfinite_loss=skip would skip such steps")
        grad_norm = self.optimizer_step(skip=not finite)
        seconds = time.perf_counter() - start
        samples_per_s = self.cfg.train.global_batch_size / seconds
        record = {"step": self.step, "split": "train", **metrics, "lr": self.optimizer.param_groups[0]["lr"],
                  "grad_norm": grad_norm, "step_time_s": seconds}
        if self.task.tokens_per_sample:
            record["tokens_per_s"] = samples_per_s * self.task.tokens_per_sample
        else:
            record["samples_per_s"] = samples_per_s
        if not finite:
            record["skipped"] = True
        if torch.cuda.is_available() and self.task.flops_per_token and self.task.tokens_per_sample:
            flops = self.task.flops_per_token * record["tokens_per_s"] / dist.get_world_size()
            record["mfu"] = flops / (self.cfg.logging.peak_tflops * 1e12)
        return record

    @torch.no_grad()
    def evaluate(self) -> dict:
        for chunk in self.model:
            chunk.eval()
        reports = self.task.forward_backward(self, self.task.valid_batches(),
                                             self.cfg.train.eval_iters * self.num_microbatches, forward_only=True)
        record = {"step": self.step, "split": "valid", **self.task.metrics(self.reduce_reports(reports), "valid"),
                  **self.task.evaluate(self.model)}
        for chunk in self.model:
            chunk.train()
        return record

    # -- checkpoints ----------------------------------------------------------------------------

    def _weights_finite(self) -> bool:
        finite = torch.tensor([1.0 if all(torch.isfinite(p).all() for chunk in self.model for p in chunk.parameters())
                               else 0.0], device=state.device())
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def save(self) -> str:
        if not self._weights_finite():
            raise NonFiniteWeights(f"refusing to save step {self.step}: the model has NaN/inf weights")
        return self.checkpointer.save(self.step, {
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "layout": vars(self.layout),
            "world_size": dist.get_world_size(),
            "tokenizer": self.task.tokenizer.identity if self.task.tokenizer else None,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        })

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> list[dict]:
        history = []
        started = time.perf_counter()
        self._fit(history)
        self.summary = run_summary(history, time.perf_counter() - started, self.cfg.checkpoint.dir,
                                   self.cfg.logging.metrics_file, latest_checkpoint(self.cfg.checkpoint.dir))
        return history

    def _fit(self, history: list[dict]) -> None:
        cfg = self.cfg.train
        self.message(f"THANN: layout {self.layout.describe()}, {self.num_microbatches} micro-batches/step")
        if self.stop_request.agreed(state.device()):  # a signal while starting: nothing new to save
            self.message(f"stopped by {self.stop_request.signal or 'a signal on another rank'} while starting")
            self.stopped_by_signal = True
            return
        if self.resumed_from is None:
            history.append(self.evaluate())
            self.metrics.log(history[-1])
        else:
            self.message(f"resumed from {self.resumed_from} at step {self.step}")
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
            stop = self.stop_request.agreed(state.device())
            if save and (stop or (interval and self.step % interval == 0) or self.step == last):
                self.message(f"saved {self.save()}")
            if stop:
                self.message(f"stopped by {self.stop_request.signal or 'a signal on another rank'} "
                             f"after step {self.step}; start again to resume")
                print(f"[rank {dist.get_rank()}] stopped after step {self.step}", file=sys.stderr, flush=True)
                self.stopped_by_signal = True
                return
        self.task.on_train_end(self.model, self.message)

    def close(self, failure: str | None = None, detail: str | None = None) -> None:
        """Releases what the run holds (metrics files, the directory's lock, process groups);
        ``failure``, when the run failed, goes into its log with ``detail``."""
        if self.metrics is not None:
            self.metrics.close(None if failure else self.summary, failure, detail)
        self.checkpointer.release()
        state.destroy()
