"""The training loop: one for every recipe (thann.training.recipe).

config checks (shared, then the recipe's) -> process groups -> the checkpoint directory's lock ->
the recipe (data) -> the resume plan (thann.checkpoint.resume) -> the recipe's slots, built in the
layout -> resume, or start each slot from its ``init`` -> iterations: the recipe's step through a
StepContext; evaluations, metrics, checkpoints of every trainable slot by name, signals.
"""

import sys
import time

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from thann import config as config_checks
from thann.checkpoint import mixtral
from thann.checkpoint.checkpointer import Checkpointer
from thann.checkpoint.directory import latest_checkpoint, read_metadata
from thann.checkpoint.parts import ModelPart, OptimizerPart, PlainPart, SchedulerPart
from thann.checkpoint.resume import plan
from thann.checkpoint.weights import checkpoint_path, load_arrays, load_weights, primary_slot, slot_prefix
from thann.models import registry
from thann.parallel import state
from thann.training.context import NonFiniteLoss, Position, StepContext
from thann.training.metrics import MetricsLogger, run_files, run_summary
from thann.training.optimizer import unshare_adam_steps
from thann.training.signals import StopRequest
from thann.training.slots import Slot, build_slot

__all__ = ["NonFiniteLoss", "NonFiniteWeights", "Trainer"]


class NonFiniteWeights(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: DictConfig, recipe_class, stop_request: StopRequest | None = None):
        dp = config_checks.check(cfg, state.world_size_from_env())
        recipe_class.check(cfg, dp)
        self.specs = recipe_class.slots(cfg)
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
            self._build(recipe_class)
        except BaseException:
            self.checkpointer.release()  # a run that never started leaves the directory free
            raise

    def _build(self, recipe_class) -> None:
        cfg = self.cfg
        self.recipe = recipe_class(cfg, self.layout)
        tokenizer = self.recipe.tokenizer.identity if self.recipe.tokenizer else None
        resume = plan(cfg, self.specs, tokenizer, self.checkpointer, run_files(cfg.logging))
        bf16 = registry.use_bf16(cfg.train.precision)
        self.slots = {name: build_slot(name, spec, cfg.parallel, bf16=bf16, recompute=cfg.train.recompute,
                                       steps=cfg.train.steps) for name, spec in self.specs.items()}
        self.position = Position(0, 0)
        self.ctx = StepContext(self.slots, self.layout, cfg.train, self.message)
        parts = {}
        for name, slot in self.trainable.items():
            prefix = "" if name == self.recipe.primary else f"{name}."
            model = ModelPart(slot.chunks, prefix)
            parts[f"{prefix}model"] = model
            parts[f"{prefix}optimizer"] = OptimizerPart(slot.optimizer, model, after_load=unshare_adam_steps)
            parts[f"{prefix}scheduler"] = SchedulerPart(slot.scheduler)
        parts["train"] = PlainPart(lambda: vars(self.position), lambda saved: self._set_position(Position(**saved)))
        if self.recipe.state() is not None:
            parts[self.recipe.name] = PlainPart(self.recipe.state, self.recipe.load_state)
        self.checkpointer.attach(parts)
        resumed = self.checkpointer.resume(resume.candidates, vars(self.layout))
        self.resumed_from = resumed.path if resumed else None
        for name, slot in self.slots.items():
            if slot.spec.init is not None and (not slot.trainable or resumed is None):
                self._start_from(name, slot)
        if resumed and resume.changes:
            self.message("the config differs from the checkpoint's:\n" + "\n".join(resume.changes))
        self.metrics = MetricsLogger(cfg, self.layout.describe(), self.is_logging_rank,
                                     resumed_step=self.position.step if resumed else None)

    def _start_from(self, name: str, slot: Slot) -> None:
        if mixtral.is_model_dir(str(slot.spec.init)):  # an HF Mixtral directory, checked by the resume policy
            path = str(slot.spec.init)
            arrays = mixtral.read_model_dir(path, slot.spec.args)
            fresh = load_arrays(slot.chunks, arrays, strict=slot.spec.init_strict)
        else:
            path = checkpoint_path(str(slot.spec.init), "init_from")
            metadata = read_metadata(path)
            source = slot.spec.init_slot or primary_slot(metadata)
            fresh = load_weights(slot.chunks, path, slot_prefix(metadata, source), strict=slot.spec.init_strict)
        if slot.trainable:
            slot.optimizer.reload_model_params()  # fp32 main copies follow the loaded weights
        what = "initialised" if slot.trainable else "loaded (frozen)"
        self.message(f"{name}: {what} from {path}" + (f" (new: {', '.join(fresh)})" if fresh else ""))

    @property
    def trainable(self) -> dict[str, Slot]:
        return {name: slot for name, slot in self.slots.items() if slot.trainable}

    def _set_position(self, position: Position) -> None:
        self.position = self.ctx.position = position

    def message(self, text: str) -> None:
        if self.metrics is not None:
            self.metrics.message(text)
        elif self.is_logging_rank:
            print(text, flush=True)

    # -- one step ---------------------------------------------------------------------------

    def train_step(self, batches) -> dict:
        start = time.perf_counter()
        for slot in self.trainable.values():
            slot.scheduler.step(increment=1)  # lr for this step: warmup reaches lr at step warmup_steps
        self.ctx.skipped = False
        metrics = self.recipe.step(self.ctx, batches)  # .item() inside waits for the device
        G = self.cfg.train.global_batch_size
        self._set_position(Position(self.position.step + 1, self.position.consumed_samples + G))
        seconds = time.perf_counter() - start
        record = {"step": self.position.step, "split": "train", **metrics, "step_time_s": seconds}
        for name, slot in self.trainable.items():
            record["lr" if name == self.recipe.primary else f"lr_{name}"] = slot.optimizer.param_groups[0]["lr"]
        if self.recipe.tokens_per_sample:
            record["tokens_per_s"] = G / seconds * self.recipe.tokens_per_sample
        else:
            record["samples_per_s"] = G / seconds
        if self.ctx.skipped:
            record["skipped"] = True
        if torch.cuda.is_available() and self.recipe.tokens_per_sample:
            record["mfu"] = self._flops_per_token() * record["tokens_per_s"] / dist.get_world_size() / (
                self.cfg.logging.peak_tflops * 1e12)
        return record

    def _flops_per_token(self) -> float:
        spec = self.specs[self.recipe.primary]
        return registry.size(spec.args, spec.vocab_size).flops_per_token(spec.seq_length)

    @torch.no_grad()
    def evaluate(self) -> dict:
        for slot in self.trainable.values():
            for chunk in slot.chunks:
                chunk.eval()
        record = {"step": self.position.step, "split": "valid", **self.recipe.evaluate(self.ctx)}
        for slot in self.trainable.values():
            for chunk in slot.chunks:
                chunk.train()
        return record

    # -- checkpoints ----------------------------------------------------------------------------

    def _weights_finite(self) -> bool:
        finite = all(torch.isfinite(p).all() for slot in self.trainable.values() for chunk in slot.chunks
                     for p in chunk.parameters())
        flag = torch.tensor([1.0 if finite else 0.0], device=state.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def save(self) -> str:
        step = self.position.step
        if not self._weights_finite():
            raise NonFiniteWeights(f"refusing to save step {step}: the model has NaN/inf weights")
        return self.checkpointer.save(step, self.checkpoint_metadata())

    def checkpoint_metadata(self) -> dict:
        """What a checkpoint records of the run (thann.json), its parts aside."""
        return {
            "step": self.position.step,
            "consumed_samples": self.position.consumed_samples,
            "layout": vars(self.layout),
            "world_size": dist.get_world_size(),
            "tokenizer": self.recipe.tokenizer.identity if self.recipe.tokenizer else None,
            "recipe": self.recipe.name,
            "primary": self.recipe.primary,
            "slots": {name: spec.record() for name, spec in self.specs.items()},
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

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
        nmb = self.layout.num_microbatches(cfg.global_batch_size, cfg.micro_batch_size)
        slots = ", ".join(f"{name} ({registry.spec_of(slot.spec.args).arch}, "
                          f"{'trained' if slot.trainable else 'frozen'})" for name, slot in self.slots.items())
        self.message(f"THANN: layout {self.layout.describe()}, {nmb} micro-batches/step, slots: {slots}")
        if self.stop_request.agreed(state.device()):  # a signal while starting: nothing new to save
            self.message(f"stopped by {self.stop_request.signal or 'a signal on another rank'} while starting")
            self.stopped_by_signal = True
            return
        if self.resumed_from is None:
            history.append(self.evaluate())
            self.metrics.log(history[-1])
        else:
            self.message(f"resumed from {self.resumed_from} at step {self.position.step}")
        batches = self.recipe.train_batches(self.position.consumed_samples)
        save = self.cfg.checkpoint.save
        interval = self.cfg.checkpoint.interval
        last = min(cfg.steps, cfg.stop_after_step or cfg.steps)
        while self.position.step < last:
            try:
                record = self.train_step(batches)
            except NonFiniteLoss:  # every rank stops here: a save in the background (of finite weights) completes
                self.checkpointer.finish()
                raise
            self.checkpointer.poll()  # publishes a save written in the background, or raises its failure
            history.append(record)
            step = self.position.step
            if step % self.cfg.logging.log_interval == 0 or step == last:
                self.metrics.log(record)
            if step % cfg.eval_interval == 0 or step == cfg.steps:
                history.append(self.evaluate())
                self.metrics.log(history[-1])
            stop = self.stop_request.agreed(state.device())
            if save and (stop or (interval and step % interval == 0) or step == last):
                self.save()
            if stop:
                self.checkpointer.finish()
                self.message(f"stopped by {self.stop_request.signal or 'a signal on another rank'} "
                             f"after step {step}; start again to resume")
                print(f"[rank {dist.get_rank()}] stopped after step {step}", file=sys.stderr, flush=True)
                self.stopped_by_signal = True
                return
        self.checkpointer.finish()
        self.recipe.on_train_end(self.ctx)

    def close(self, failure: str | None = None, detail: str | None = None) -> None:
        """Releases what the run holds (metrics files, the directory's lock, process groups);
        ``failure``, when the run failed, goes into its log with ``detail``."""
        if self.metrics is not None:
            self.metrics.close(None if failure else self.summary, failure, detail)
        self.checkpointer.release()
        state.destroy()
