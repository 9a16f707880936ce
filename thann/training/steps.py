"""Ways to compute the gradients of one global batch; a task picks one (Task.forward_backward).

``pipelined`` is the supervised default: megatron-core's forward-backward schedule over the
task's micro-batches (1F1B across pipeline stages), each micro-batch's loss independent of the
others. ``grad_cache`` serves losses that couple the micro-batches (contrastive negatives).
"""

import torch
from megatron.core import parallel_state, tensor_parallel


def pipelined(trainer, batches, num_microbatches: int, forward_only: bool) -> list[dict]:
    """The task's forward_step over ``num_microbatches`` micro-batches; returns their reports."""
    return trainer.schedule(
        forward_step_func=trainer.task.forward_step,
        data_iterator=batches,
        model=trainer.model,
        num_microbatches=num_microbatches,
        seq_length=trainer.task.pipeline_seq_length,
        micro_batch_size=trainer.cfg.train.micro_batch_size,
        forward_only=forward_only,
    )


def _rng_snapshot() -> tuple:
    return (torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            tensor_parallel.get_cuda_rng_tracker().get_states())


def _restore(snapshot: tuple) -> None:
    cpu, cuda, tracker = snapshot
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)
    tensor_parallel.get_cuda_rng_tracker().set_states(tracker)


def grad_cache(trainer, batches, num_microbatches: int, forward_only: bool) -> list[dict]:
    """Gradients of a loss that couples every micro-batch of the global batch (contrastive
    negatives), in the memory of one micro-batch (GradCache, arXiv 2101.06983):

    1. embed each micro-batch without gradients, keeping the RNG state it started from;
    2. on the last pipeline stage, ``task.embedding_loss`` computes the loss of the whole global
       batch and its gradient with respect to this rank's embeddings;
    3. embed each micro-batch again, from the same RNG state (the same dropout masks), with
       gradients, and backpropagate those embedding gradients through it.

    The task supplies ``embed(batch, model)`` and ``embedding_loss(embeddings, forward_only, model)``
    returning (report, gradients), the gradients already scaled for megatron-core's averaging
    over micro-batches and data-parallel ranks. Returns the report (on the last stage)."""
    task = trainer.task
    held = [next(batches) for _ in range(num_microbatches)]
    starts = []

    def embed_step(data_iterator, model):
        starts.append(_rng_snapshot())
        return task.embed(next(data_iterator), model), lambda output, non_loss_data=False: output

    schedule = dict(model=trainer.model, num_microbatches=num_microbatches, seq_length=task.pipeline_seq_length,
                    micro_batch_size=task.pipeline_micro_batch_size)
    with torch.no_grad():
        embeddings = trainer.schedule(forward_step_func=embed_step, data_iterator=iter(held), forward_only=True,
                                      collect_non_loss_data=True, **schedule)
    last_stage = parallel_state.is_pipeline_last_stage()
    report, gradients = task.embedding_loss(embeddings, forward_only, trainer.model) if last_stage else ({}, [])
    if forward_only:
        return [report] if last_stage else []
    after = _rng_snapshot()
    replay = iter(starts)
    pending = iter(gradients)

    def replay_step(data_iterator, model):
        _restore(next(replay))
        output = task.embed(next(data_iterator), model)

        def backpropagate(output):
            return (output.float() * next(pending)).sum(), torch.ones((), dtype=torch.int), {}

        return output, backpropagate

    trainer.schedule(forward_step_func=replay_step, data_iterator=iter(held), forward_only=False, **schedule)
    _restore(after)
    return [report] if last_stage else []
