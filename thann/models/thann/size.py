"""Parameter and FLOP counts of a THANN config, from its shape alone."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Size:
    total: int  # every parameter (a tied embedding counted once)
    active: int  # parameters used per token: all but the (num_experts - topk) unrouted experts
    embedding: int  # token embedding (and an untied LM head)
    experts: int

    def flops_per_token(self, model_cfg, vocab_size: int, seq_length: int) -> float:
        """Training FLOPs per token: 6 per active non-embedding parameter, the LM head's matmul
        (6·h·V) and attention scores (12·h·s per attention layer, the tokenization's included)."""
        h = model_cfg.hidden_size
        attention_layers = model_cfg.num_layers + 1
        return 6 * (self.active - self.embedding) + 6 * h * vocab_size + 12 * attention_layers * h * seq_length


def attention_params(model_cfg) -> int:
    h = model_cfg.hidden_size
    kv = model_cfg.num_query_groups * (h // model_cfg.num_attention_heads)
    return h * (h + 2 * kv) + h * h


def model_size(model_cfg, vocab_size: int) -> Size:
    h, L, E, F = model_cfg.hidden_size, model_cfg.num_layers, model_cfg.num_experts, model_cfg.moe_ffn_hidden_size
    widths = list(model_cfg.tokenization.conv_widths)
    embedding = vocab_size * h * (1 if model_cfg.tie_embeddings else 2)
    tokenization = sum(widths) * h + len(widths) * h * h + h + attention_params(model_cfg)
    expert = 3 * h * F  # SwiGLU: gate, up, down
    layer = 2 * h + attention_params(model_cfg) + E * h + E * expert
    total = embedding + tokenization + L * layer + h
    return Size(
        total=total,
        active=total - L * (E - model_cfg.moe_router_topk) * expert,
        embedding=embedding,
        experts=L * E * expert,
    )
