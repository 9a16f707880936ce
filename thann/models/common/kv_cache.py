"""Generation state of megatron-core decoders: its static KV cache, with the one method the
generator calls after each forward (``advance``), and the model-side switch that gathers
tensor-parallel logits while generating (GPTModel asserts that inference does)."""

from megatron.core.inference.contexts import StaticInferenceContext


class KVCacheContext(StaticInferenceContext):
    def advance(self, tokens: int) -> None:
        """The last call's ``tokens`` positions are cached: later calls continue after them."""
        self.increment_sequence_len_offset(tokens)
        self.enable_decode_mode()


class GeneratesWithKVCache:
    """Mixin for GPTModel subclasses (listed before GPTModel)."""

    def new_inference_context(self, batch_size: int, max_sequence_length: int) -> KVCacheContext:
        return KVCacheContext(batch_size, max_sequence_length)

    def forward(self, *args, inference_context=None, runtime_gather_output=None, **kwargs):
        if inference_context is not None and runtime_gather_output is None:
            runtime_gather_output = True
        return super().forward(*args, inference_context=inference_context,
                               runtime_gather_output=runtime_gather_output, **kwargs)
