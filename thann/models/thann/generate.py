"""Greedy decoding through megatron-core's pipeline schedule, so it works in any layout."""

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from thann.parallel import state


def _last_stage_rank() -> int:
    return parallel_state.get_pipeline_model_parallel_last_rank()


@torch.no_grad()
def greedy_generate(model_chunks, prompt_ids: list[int], new_tokens: int, vocab_size: int, pad_id: int) -> list[int]:
    """Appends ``new_tokens`` argmax tokens to the prompt. No KV cache: each token re-reads the
    prefix, which is fine for the short samples printed at the end of a run."""
    for chunk in model_chunks:
        chunk.eval()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    ids = list(prompt_ids)
    forward_backward = get_forward_backward_func()
    for _ in range(new_tokens):
        # Sequence parallelism splits the sequence over tp ranks: pad on the right (causal, so
        # padding never changes the logits of earlier positions).
        length = -(-len(ids) // tp) * tp
        tokens = torch.tensor([ids + [pad_id] * (length - len(ids))], device=state.device())
        position_ids = torch.arange(length, device=state.device()).unsqueeze(0)

        def forward_step(data_iterator, model):
            logits = model(tokens, position_ids, None)
            return logits, lambda output, non_loss_data=False: output

        outputs = forward_backward(
            forward_step_func=forward_step, data_iterator=None, model=model_chunks, num_microbatches=1,
            seq_length=length, micro_batch_size=1, forward_only=True, collect_non_loss_data=True,
        )
        next_id = torch.zeros(1, dtype=torch.long, device=state.device())
        if parallel_state.is_pipeline_last_stage():
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(outputs[0])
            next_id[0] = logits[0, len(ids) - 1, :vocab_size].argmax()
        dist.broadcast(next_id, src=_last_stage_rank(), group=parallel_state.get_pipeline_model_parallel_group())
        ids.append(int(next_id))
    for chunk in model_chunks:
        chunk.train()
    return ids
