"""The StepContext: a recipe's only door to the training machinery.

A recipe's ``step(ctx, batches)`` runs a whole iteration with it: forward and backward passes of
its slots, optimizer steps, weight changes outside backprop. What it offers, and nothing more:

    ctx.forward_backward(slot, forward_step, batches, ...)   megatron-core's pipeline schedule
    ctx.grad_cache({slot: embed}, loss, batches, ...)         a loss coupling every micro-batch (of one or more slots)
    ctx.forward(slot, forward_step, batches, ...)             outputs without gradients (a frozen slot)
    ctx.optimizer_step(slot, loss)                            the update, then the slot's after-step hooks
    ctx.weights_changed(slot, params)                         a write outside backprop reaches the optimizer
    ctx.reset_optimizer(slot)                                 moments and step start afresh
    ctx.position, ctx.layout, ctx.slots, ctx.message(text)    read-only

**Loss normalisation** lives here alone. A recipe's loss function returns the *sum* of what it
averages (token losses, sample losses) and ``count`` says how many of those a micro-batch holds.
The objective is that sum over the whole global batch divided by the global count, however the
items are spread over micro-batches and data-parallel ranks: each micro-batch's sum is scaled by
``num_microbatches · dp / N`` (N: the global count, one all-reduce per call), which megatron-core's
division by the micro-batch count and DDP's average over data-parallel ranks turn into exactly
sum / N. (megatron-core's own per-token mode would get the main loss right but scale the MoE
auxiliary loss by each rank's local token count, which sequence parallelism divides by tp.)

**The MoE auxiliary loss** is megatron-core's: its router adds the load-balancing gradient itself
and records the value in a process-wide tracker. Each forward_backward / grad_cache with gradients
reads and clears the tracker (a collective), so the value it reports as ``aux_loss`` is the
slot's own: coefficient x the sum over layers of the mean over micro-batches and ranks.

Reports: a loss function's ``report`` maps names to 2-element tensors [sum, count]; the context
sums them over micro-batches and data-parallel ranks and returns their means.
"""

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
    reduce_aux_losses_tracker_across_ranks,
)

from thann.parallel import state
from thann.training.optimizer import main_params_follow_model, reset_adam_state
from thann.training.slots import Slot


class NonFiniteLoss(RuntimeError):
    pass


@dataclass(frozen=True)
class Position:
    step: int  # iterations done
    consumed_samples: int


def _rows(batch: dict) -> int:
    return len(next(iter(batch.values())))


class StepContext:
    def __init__(self, slots: dict[str, Slot], layout, train_cfg, message: Callable[[str], None]):
        self.slots = MappingProxyType(slots)
        self.layout = layout
        self.position = Position(0, 0)  # set by the trainer before each step
        self.message = message
        self._train = train_cfg
        self._schedule = get_forward_backward_func()
        self.skipped = False  # the last optimizer_step skipped a non-finite update

    @property
    def num_microbatches(self) -> int:
        return self.layout.num_microbatches(self._train.global_batch_size, self._train.micro_batch_size)

    # -- gradients ---------------------------------------------------------------------------------

    def forward_backward(self, slot: str, forward_step: Callable, batches: Iterator, *,
                         count: Callable[[dict], torch.Tensor | int] = _rows, num_microbatches: int | None = None,
                         seq_length: int | None = None, micro_batch_size: int | None = None,
                         forward_only: bool = False) -> dict[str, float]:
        """``num_microbatches`` batches of ``batches`` through megatron-core's schedule on ``slot``
        (1F1B across pipeline stages); gradients (unless ``forward_only``) of the global mean.
        ``forward_step(batch, model) -> (output, loss_fn)``, ``loss_fn(output) -> (loss_sum,
        report)``. Returns the reported means (and ``aux_loss`` of an MoE slot with gradients)."""
        target = self.slots[slot]
        nmb = num_microbatches or self.num_microbatches
        held = [next(batches) for _ in range(nmb)]
        scale = self._mean_scale([count(b) for b in held], nmb)
        if not forward_only:
            self._zero_grad(target)

        def step(data_iterator, model):
            output, loss_fn = forward_step(next(data_iterator), model)

            def scaled(output_tensor):
                loss_sum, report = loss_fn(output_tensor)
                return loss_sum * scale.to(loss_sum.device), torch.ones((), dtype=torch.int), report

            return output, scaled

        reports = self._schedule(forward_step_func=step, data_iterator=iter(held), model=target.chunks,
                                 num_microbatches=nmb, seq_length=seq_length or self._train.get("seq_length"),
                                 micro_batch_size=micro_batch_size or self._train.micro_batch_size,
                                 forward_only=forward_only)
        return self._means(reports, target, nmb, forward_only)

    @torch.no_grad()
    def forward(self, slot: str, forward_step: Callable, batches: Iterator, *, num_microbatches: int | None = None,
                seq_length: int | None = None, micro_batch_size: int | None = None) -> list:
        """``slot``'s outputs for ``num_microbatches`` batches of ``batches``, without gradients
        (a frozen teacher's logits, a reference policy's log-probabilities). ``forward_step(batch,
        model) -> (output, finish)`` as for forward_backward: ``output`` is what the model returned
        (on an earlier pipeline stage, the activations sent on), ``finish(output)`` what to keep of
        it on the last stage. A list with one ``finish`` result per micro-batch on the last
        pipeline stage, empty on the others."""
        target = self.slots[slot]
        nmb = num_microbatches or self.num_microbatches

        def step(data_iterator, model):
            output, finish = forward_step(next(data_iterator), model)
            return output, lambda output, non_loss_data=False: finish(output)

        return self._schedule(forward_step_func=step, data_iterator=batches, model=target.chunks,
                              num_microbatches=nmb, seq_length=seq_length or self._train.get("seq_length"),
                              micro_batch_size=micro_batch_size or self._train.micro_batch_size,
                              forward_only=True, collect_non_loss_data=True)

    def grad_cache(self, embed: dict[str, Callable], loss: Callable, batches: Iterator, *,
                   num_microbatches: int | None = None, seq_length: int | None = None,
                   micro_batch_size: int | None = None, forward_only: bool = False) -> dict[str, float]:
        """Gradients of a loss that couples every micro-batch of the global batch (contrastive
        negatives), in the memory of one micro-batch (GradCache, arXiv 2101.06983), for one slot
        or several (two towers of one loss: images and texts):

        1. embed each micro-batch without gradients, in each slot of ``embed``, keeping the RNG
           state each embedding started from;
        2. on the last pipeline stage, ``loss({slot: embeddings}) -> (loss, report)`` computes the
           loss of the whole global batch from this rank's micro-batches' embeddings (each a leaf
           that requires grad; the recipe gathers the other ranks'), and its gradient with
           respect to them is taken;
        3. embed each micro-batch again in each slot, from the same RNG state (the same dropout
           masks), with gradients, and backpropagate those embedding gradients through it.

        ``embed`` maps a slot to ``embed(batch, model)``, a micro-batch's embeddings. At most one
        of the slots may be an MoE model (megatron-core's auxiliary-loss tracker is one per
        process). Returns the reported means."""
        targets = [self.slots[name] for name in embed]
        moe = [t for t in targets if t.config.num_moe_experts]
        if len(moe) > 1:
            raise ValueError(f"grad_cache: slots {[t.name for t in moe]} are all MoE models; at most one may be")
        nmb = num_microbatches or self.num_microbatches
        held = [next(batches) for _ in range(nmb)]
        schedule = dict(num_microbatches=nmb, seq_length=seq_length or self._train.get("seq_length"),
                        micro_batch_size=micro_batch_size or self._train.micro_batch_size)
        starts, embeddings = {}, {}
        for name, target in zip(embed, targets):
            starts[name] = []

            def embed_step(data_iterator, model, name=name):
                starts[name].append(_rng_snapshot())
                return embed[name](next(data_iterator), model), lambda output, non_loss_data=False: output

            with torch.no_grad():
                embeddings[name] = self._schedule(forward_step_func=embed_step, data_iterator=iter(held),
                                                  model=target.chunks, forward_only=True, collect_non_loss_data=True,
                                                  **schedule)
        if not forward_only:
            # Before the loss's backward: the loss may read parameters of its own (a learnt
            # temperature), whose gradients it alone gives.
            for target in targets:
                self._zero_grad(target)
        reports, gradients = [], {}
        if parallel_state.is_pipeline_last_stage():
            local = {name: [e.detach().float().requires_grad_(not forward_only) for e in embeddings[name]]
                     for name in embed}
            value, report = loss(local)
            reports = [report]
            if not forward_only:
                value.backward()
                # megatron-core divides each micro-batch's loss by their number and DDP averages ranks.
                factor = nmb * self.layout.dp
                gradients = {name: [e.grad * factor for e in local[name]] for name in embed}
        if forward_only:
            return self._means(reports, moe[0] if moe else None, nmb, forward_only)
        after = _rng_snapshot()
        for name, target in zip(embed, targets):
            replay, pending = iter(starts[name]), iter(gradients.get(name, ()))

            def replay_step(data_iterator, model, name=name, replay=replay, pending=pending):
                _restore(next(replay))
                output = embed[name](next(data_iterator), model)

                def backpropagate(output):
                    return (output.float() * next(pending)).sum(), torch.ones((), dtype=torch.int), {}

                return output, backpropagate

            self._schedule(forward_step_func=replay_step, data_iterator=iter(held), model=target.chunks,
                           forward_only=False, **schedule)
        _restore(after)
        return self._means(reports, moe[0] if moe else None, nmb, forward_only)

    def _mean_scale(self, counts: list, nmb: int) -> torch.Tensor:
        """``nmb · dp / N``, N the global batch's count (see the module's docstring)."""
        group = parallel_state.get_data_parallel_group()
        total = torch.stack([torch.as_tensor(c, dtype=torch.float64) for c in counts]).sum().to(state.device())
        dist.all_reduce(total, group=group)
        return (nmb * dist.get_world_size(group) / total.clamp(min=1)).float().cpu()

    @staticmethod
    def _zero_grad(target: Slot) -> None:
        for chunk in target.chunks:
            chunk.zero_grad_buffer()
        target.optimizer.zero_grad()

    def _means(self, reports: list[dict], target: Slot | None, nmb: int, forward_only: bool) -> dict[str, float]:
        """Sums [sum, count] reports over micro-batches and ranks. Reports exist on the last
        pipeline stage, identical on its tensor-parallel ranks: one of those counts. ``target``:
        the slot whose MoE auxiliary loss to report (None: none)."""
        keys = sorted({k for report in reports for k in report})
        names = [None] * dist.get_world_size()
        dist.all_gather_object(names, keys)  # ranks without reports (other stages) learn the keys
        keys = sorted({k for ks in names for k in ks})
        totals = torch.zeros(len(keys), 2, dtype=torch.float64, device=state.device())
        counts_here = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
        if counts_here:
            for report in reports:
                totals += torch.stack([report[k].double() if k in report else totals.new_zeros(2) for k in keys])
        dist.all_reduce(totals)
        means = {k: (totals[i, 0] / totals[i, 1]).item() for i, k in enumerate(keys)}
        if not forward_only and target is not None and target.config.num_moe_experts:
            means["aux_loss"] = _take_aux_loss(target.config.moe_aux_loss_coeff, nmb)
        return means

    # -- updates ------------------------------------------------------------------------------------

    def optimizer_step(self, slot: str, loss: float) -> float:
        """Applies ``slot``'s update, then its after-step hooks; returns the gradient norm. A
        non-finite ``loss`` stops the run (train.on_nonfinite_loss=stop, NonFiniteLoss naming
        the step) or skips the update (skip: the norm is nan and ``ctx.skipped`` is set)."""
        target = self.slots[slot]
        if not math.isfinite(loss):
            if self._train.on_nonfinite_loss == "stop":
                raise NonFiniteLoss(f"non-finite loss ({loss}) at step {self.position.step + 1}"
                                    + (f" (slot {slot})" if len(self.slots) > 1 else "")
                                    + "; train.on_nonfinite_loss=skip would skip such steps")
            self.skipped = True
            return math.nan
        _, grad_norm, _ = target.optimizer.step()
        changed = [p for hook in target.after_step for p in (hook(target) or ())]
        if changed:
            self.weights_changed(slot, changed)
        return float(grad_norm) if grad_norm is not None else math.nan

    @torch.no_grad()
    def weights_changed(self, slot: str, params: Iterable[torch.nn.Parameter] | None = None) -> None:
        """After a write to ``slot``'s weights outside backprop (every parameter, or ``params``):
        data-parallel replicas are averaged, so ranks that wrote different values (a local rule
        on their own data) hold the same weights, that of the whole batch; then the optimizer's
        fp32 main copies follow, so the next update starts from the written weights. Collective
        over the slot's data-parallel groups."""
        target = self.slots[slot]
        names = {id(p): n for c in target.chunks for n, p in c.named_parameters()}
        chosen = list(params) if params is not None else [p for c in target.chunks for p in c.parameters()]
        for param in sorted(chosen, key=lambda p: names[id(p)]):  # the same order on every rank
            expert = not getattr(param, "allreduce", True)
            group = (parallel_state.get_expert_data_parallel_group() if expert
                     else parallel_state.get_data_parallel_group())
            size = dist.get_world_size(group)
            if size > 1:
                mean = param.data.float()
                dist.all_reduce(mean, group=group)
                param.data.copy_(mean / size)
        main_params_follow_model(target.optimizer)

    def reset_optimizer(self, slot: str) -> None:
        reset_adam_state(self.slots[slot].optimizer)


def _take_aux_loss(coefficient: float, num_microbatches: int) -> float:
    """The load-balancing loss (coefficient included) recorded since the last call, from
    megatron-core's tracker, which it clears: the sum over layers of the mean over micro-batches
    and ranks. Collective: every rank calls it."""
    reduce_aux_losses_tracker_across_ranks()
    tracker = get_moe_layer_wise_logging_tracker()
    values = tracker["load_balancing_loss"]["values"] if "load_balancing_loss" in tracker else torch.zeros(1)
    aux = coefficient * values.sum().item() / num_microbatches
    clear_aux_losses_tracker()
    return aux


def _rng_snapshot() -> tuple:
    return (torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            tensor_parallel.get_cuda_rng_tracker().get_states())


def _restore(snapshot: tuple) -> None:
    cpu, cuda, tracker = snapshot
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)
    tensor_parallel.get_cuda_rng_tracker().set_states(tracker)
