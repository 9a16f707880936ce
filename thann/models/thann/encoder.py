"""THANN's decoder with a head other than the LM head: the same embedding, learnt tokenization
and decoder layers, with the final norm, then

- ``ThannEncoder``: a pooled-embedding head, one L2-normalised vector per text (contrastive
  training, embeddings);
- ``ThannValue``: a scalar per position (a PPO critic's values, a reward model's score).

Their weights carry the same names as the language model's, so a pretraining checkpoint of any
layout initialises them; the heads' are new.
"""

import torch
from megatron.core import tensor_parallel

from thann.models.common.heads import PooledEmbedding
from thann.models.common.init import init_stream
from thann.models.thann.model import ThannModel


class _HiddenStates(ThannModel):
    def _postprocess(self, hidden_states, *args, **kwargs):
        """The final-norm hidden states [S, B, H] instead of logits: whole sequences on every
        tensor-parallel rank (what the head computes from them is replicated, so the gradient is
        split back, not summed)."""
        if self.post_process and self.config.sequence_parallel:
            return tensor_parallel.gather_from_sequence_parallel_region(hidden_states,
                                                                         tensor_parallel_output_grad=False)
        return hidden_states


class ThannEncoder(_HiddenStates):
    def __init__(self, config, model_cfg, vocab_size: int, max_sequence_length: int, pooling: str,
                 projection_dim: int | None, learnt_temperature: float | None = None, pre_process: bool = True,
                 post_process: bool = True):
        super().__init__(config, model_cfg, vocab_size, max_sequence_length, pre_process=pre_process,
                         post_process=post_process)
        if post_process:
            with init_stream("pooled_embedding"):
                self.pooled_embedding = PooledEmbedding(config.hidden_size, pooling, projection_dim,
                                                        config.init_method, config.params_dtype, learnt_temperature)
        self._token_embeddings = None
        if pooling == "first_last":  # one pipeline stage (the registry checks): the head reads the embeddings
            # The lookup, before the embedding's dropout: under sequence parallelism that dropout is
            # drawn per rank, and the head must pool the same values on every rank.
            self.embedding.word_embeddings.register_forward_hook(self._keep_token_embeddings)

    def _keep_token_embeddings(self, module, inputs, output) -> None:
        if module.reduce_scatter_embeddings:  # [S/tp, B, H]: this rank's part of the sequence
            output = tensor_parallel.gather_from_sequence_parallel_region(output, tensor_parallel_output_grad=False)
        else:  # [B, S, H], whole on every rank
            output = output.transpose(0, 1)
        self._token_embeddings = output

    def forward(self, input_ids, position_ids, lengths, project: bool = True):
        """Last stage: L2-normalised embeddings [B, P]; other stages: hidden states for the next."""
        hidden = super().forward(input_ids, position_ids, None)
        if not self.post_process:
            return hidden
        embeddings, self._token_embeddings = self._token_embeddings, None
        return self.pooled_embedding(hidden, lengths, project, embeddings)


class ThannValue(_HiddenStates):
    def __init__(self, config, model_cfg, vocab_size: int, max_sequence_length: int, pre_process: bool = True,
                 post_process: bool = True):
        super().__init__(config, model_cfg, vocab_size, max_sequence_length, pre_process=pre_process,
                         post_process=post_process)
        if post_process:
            with init_stream("value_head"):
                self.value_head = torch.nn.Linear(config.hidden_size, 1, dtype=config.params_dtype)
                config.init_method(self.value_head.weight)  # small: a fresh critic predicts about 0
                torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, position_ids, attention_mask=None):
        """Last stage: one scalar per position [B, S]; other stages: hidden states for the next."""
        hidden = super().forward(input_ids, position_ids, None)
        if not self.post_process:
            return hidden
        return self.value_head(hidden).squeeze(-1).transpose(0, 1).float()
