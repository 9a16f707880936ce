"""Batched generation with a cache, in any parallel layout.

Each pipeline stage's model keeps the state of the sequences being generated in an inference
context it creates (``new_inference_context``): megatron-core's static KV cache plus the learnt
tokenization's state for THANN, the recurrent state of each node for NNN. A step feeds every
sequence one new position through megatron-core's pipeline schedule (forward only), so the
same loop runs on one rank, across pipeline stages and across tensor/expert-parallel ranks; the
last stage chooses the next tokens and sends them to the other stages.

Prompts of different lengths share positions without padding: the batch is prefilled up to the
shortest prompt, then each step feeds every row its next prompt token while it still has one
(teacher forcing) and its chosen token afterwards. Rows that finished are fed the end-of-document
token until the whole batch is done; their outputs are ignored.

Sequence parallelism splits sequences over tensor-parallel ranks, and a step of one token cannot
be split: while generating, the model runs with sequence parallelism off (the same weights; only
the communication changes) and it is switched back afterwards.

Every rank of the run takes the same steps: expert parallelism exchanges tokens between
data-parallel ranks inside each step, so ranks holding different prompts (other lengths, other
stopping points) still agree on where prefilling ends, on the cache's length and on when the last
sequence of any rank is done (a few-number all-reduce per step). Callers make the same number of
``generate`` calls on every rank (thann.inference.cli gives a rank without prompts left a batch
whose results it drops).
"""

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.utils import set_model_to_sequence_parallel
from megatron.core.utils import unwrap_model

from thann.data.tokenizer import Tokenizer
from thann.inference.sampling import SamplingParams, choose, row_generator, without_unused
from thann.parallel import megatron_patches, state


# What megatron-core's set_model_to_sequence_parallel switches (megatron.core.transformer.utils).
_SEQUENCE_PARALLEL_ATTRIBUTES = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")


def _unmodified(logits_BV: torch.Tensor, tokens_B: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits_BV, dim=-1).gather(1, tokens_B.unsqueeze(1)).squeeze(1)


@dataclass
class Generation:
    """One prompt's result. ``logprobs[i]`` is the log-probability of ``tokens[i]``, by default
    under the model's own next-token distribution: the softmax of the raw logits, before
    temperature, top-k or top-p reshape the distribution the token was drawn from (what a
    training forward of the same sequence gives); ``generate(logprobs=...)`` chooses another."""

    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""  # "stop" (end token or stop string), "length" (budget or context full)
    logits: list[torch.Tensor] | None = None  # per generated token, with keep_logits=True


class Generator:
    def __init__(self, model_chunks: list, tokenizer: Tokenizer, max_sequence_length: int):
        self.chunks = model_chunks
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length
        self.stop_ids = {tokenizer.eod} | {tokenizer.special_ids[t] for t in ("<|im_end|>",)
                                           if t in tokenizer.special_ids}
        self.schedule = get_forward_backward_func()
        self.pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1

    def check_prompts(self, prompts: list[list[int]]) -> None:
        """Raises ValueError naming the first prompt that cannot be generated from."""
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty")
            if len(prompt) >= self.max_sequence_length:
                raise ValueError(f"prompt {i} has {len(prompt)} tokens; the sequence budget is "
                                 f"{self.max_sequence_length} (prompt and new tokens)")

    # -- one step through the pipeline ---------------------------------------------------------

    def _forward(self, contexts: dict, tokens_BQ: torch.Tensor, offset: int, **inputs) -> torch.Tensor | None:
        """Logits [B, V] of the last fed position on the last stage (None elsewhere). ``inputs``:
        more model inputs (an image before the prompt)."""
        B, Q = tokens_BQ.shape
        positions_BQ = torch.arange(offset, offset + Q, device=tokens_BQ.device).expand(B, Q)

        def forward_step(data_iterator, model):
            output = model(tokens_BQ, positions_BQ, None, inference_context=contexts[id(model)], **inputs)
            return output, lambda output, non_loss_data=False: output

        if self.pipelined:
            outputs = self.schedule(forward_step_func=forward_step, data_iterator=None, model=self.chunks,
                                    num_microbatches=1, seq_length=Q, micro_batch_size=B, forward_only=True,
                                    collect_non_loss_data=True)
        else:  # one stage: the schedule would only add its bookkeeping to every token
            outputs = [forward_step(None, self.chunks[0])[0]]
        for context in contexts.values():
            context.advance(Q)
        if not parallel_state.is_pipeline_last_stage():
            return None
        return outputs[0][:, -1, : self.tokenizer.vocab_size].float()

    def _share(self, values: torch.Tensor) -> torch.Tensor:
        """The last stage's values, on every stage."""
        if self.pipelined:
            dist.broadcast(values, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        return values

    # -- the loop --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _decoding(self):
        """The chunks in evaluation mode with sequence parallelism off (and on one stage outside
        the CPU function mode), restored afterwards: every attribute megatron-core's switch sets is
        put back to the value it had (THANN's embedding does not scatter: its learnt
        tokenization does, so switching sequence parallelism back on would scatter twice)."""
        modules = [unwrap_model(chunk) for chunk in self.chunks]
        was_training = [chunk.training for chunk in self.chunks]
        sequence_parallel = modules[0].config.sequence_parallel
        saved = [(owner, name, getattr(owner, name)) for module in modules
                 for owner in [module.config, *module.modules()] for name in _SEQUENCE_PARALLEL_ATTRIBUTES
                 if hasattr(owner, name)]
        for chunk in self.chunks:
            chunk.eval()
        if sequence_parallel:
            for module in modules:
                set_model_to_sequence_parallel(module, False)
        try:
            # megatron-core's pipeline schedule allocates on "cuda": only one stage runs unintercepted
            with contextlib.nullcontext() if self.pipelined else megatron_patches.function_mode_suspended():
                yield
        finally:
            for owner, name, value in saved:
                setattr(owner, name, value)
            for chunk, training in zip(self.chunks, was_training):
                chunk.train(training)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, first_index: int = 0,
                 on_token: Callable[[int, Generation], None] | None = None,
                 keep_logits: bool = False, logprobs: Callable | None = None,
                 image_states: torch.Tensor | None = None) -> list[Generation]:
        """Continues every prompt; returns one Generation per prompt, on every rank.
        ``first_index``: the prompts' position in a larger request, which seeds their random
        streams. ``on_token(row, generation)`` is called after each new token (streaming).
        ``logprobs(logits_BV, tokens_B)``: how the reported log-probabilities are computed from a
        step's logits (default: the model's distribution; PPO passes its own, the one its update
        uses). Ids the tokenizer has no token for are never chosen. ``image_states`` [B, P, H]:
        the image each prompt follows, for an image-conditioned model (thann.models.thann.vlm),
        fed once with the prefill and kept in the cache beside the text (P more positions).
        Prefills to the shortest prompt, then feeds one position per step until every row is done."""
        params.check()
        self.check_prompts(prompts)
        results = [Generation(list(p), logits=[] if keep_logits else None) for p in prompts]
        streams = [row_generator(params.seed, first_index + i) for i in range(len(prompts))]
        lengths = [len(p) for p in prompts]
        B, device = len(prompts), state.device()
        prefill, end = self._agree(min(lengths), min(self.max_sequence_length, max(lengths) + params.max_new_tokens))
        inputs = {} if image_states is None else {"image_states": image_states.to(device)}
        prefix = 0 if image_states is None else image_states.size(1)
        contexts = {id(chunk): unwrap_model(chunk).new_inference_context(B, end + prefix) for chunk in self.chunks}
        fed = torch.tensor([p[:prefill] for p in prompts], device=device)
        offset, finished = 0, [False] * B
        with self._decoding():
            while True:
                logits_BV = self._forward(contexts, fed, offset, **inputs)
                inputs = {}  # the image is in the cache from here on
                offset += fed.size(1)
                chosen = torch.zeros(B, dtype=torch.long, device=device)
                chosen_logprobs = torch.zeros(B, dtype=torch.float32, device=device)
                if logits_BV is not None:
                    choosable = without_unused(logits_BV, self.tokenizer.unused_ids)
                    for i in range(B):
                        if offset < lengths[i] or finished[i]:
                            continue
                        chosen[i] = choose(choosable[i], params, streams[i])
                        if keep_logits:
                            results[i].logits.append(logits_BV[i].cpu())
                    chosen_logprobs = (logprobs or _unmodified)(choosable, chosen).float()
                self._share(chosen)
                self._share(chosen_logprobs)
                next_tokens = []
                for i, result in enumerate(results):
                    if offset < lengths[i]:
                        next_tokens.append(prompts[i][offset])  # still reading its prompt
                    elif finished[i]:
                        next_tokens.append(self.tokenizer.eod)
                    else:
                        self._append(result, int(chosen[i]), float(chosen_logprobs[i]), params,
                                     offset + 1 >= end)
                        finished[i] = bool(result.finish_reason)
                        next_tokens.append(int(chosen[i]))
                        if on_token is not None:
                            on_token(i, result)
                if offset >= end or self._all_done(all(finished)):
                    break
                fed = torch.tensor(next_tokens, device=device).unsqueeze(1)
        return results

    def _agree(self, prefill: int, end: int) -> tuple[int, int]:
        """The shortest prefill and the longest cache any rank needs."""
        if dist.get_world_size() == 1:
            return prefill, end
        values = torch.tensor([-prefill, end], device=state.device())
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return -int(values[0]), int(values[1])

    def _all_done(self, done: bool) -> bool:
        if dist.get_world_size() == 1:
            return done
        flag = torch.tensor([1.0 if done else 0.0], device=state.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _append(self, result: Generation, token: int, logprob: float, params: SamplingParams, full: bool) -> None:
        result.tokens.append(token)
        result.logprobs.append(logprob)
        if token in self.stop_ids:
            result.finish_reason = "stop"
            result.text = self.tokenizer.decode(result.tokens[:-1])
            return
        result.text = self.tokenizer.decode(result.tokens)
        for stop in params.stop_strings:
            if stop and stop in result.text:
                result.text = result.text[: result.text.index(stop)]
                result.finish_reason = "stop"
                return
        if len(result.tokens) >= params.max_new_tokens or full:
            result.finish_reason = "length"
