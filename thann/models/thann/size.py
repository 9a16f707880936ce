"""Parameter counts of a THANN (or dense GPT) config, from its shape alone."""

from thann.models.common.size import Size
from thann.models.thann.model import tokenization_enabled


def attention_params(model_cfg) -> int:
    h = model_cfg.hidden_size
    kv = model_cfg.num_query_groups * (h // model_cfg.num_attention_heads)
    return h * (h + 2 * kv) + h * h


def model_size(model_cfg, vocab_size: int) -> Size:
    h, L = model_cfg.hidden_size, model_cfg.num_layers
    table = vocab_size * h
    head = 0 if model_cfg.tie_embeddings else table
    attention = attention_params(model_cfg)
    if model_cfg.get("num_experts") is None:  # dense SwiGLU: gate, up, down
        mlp = mlp_active = 3 * h * model_cfg.ffn_hidden_size
    else:
        E, k, expert = model_cfg.num_experts, model_cfg.moe_router_topk, 3 * h * model_cfg.moe_ffn_hidden_size
        mlp, mlp_active = E * h + E * expert, E * h + k * expert  # router + experts
    tokenization = tokenization_matmul = 0
    if tokenization_enabled(model_cfg):
        widths = list(model_cfg.tokenization.conv_widths)
        tokenization_matmul = sum(widths) * h + len(widths) * h * h + attention  # convolutions, mix, attention
        tokenization = tokenization_matmul + h  # and its norm
    norms = 2 * h * L + h
    total = table + head + tokenization + L * (attention + mlp) + norms
    return Size(
        total=total,
        active=total - L * (mlp - mlp_active),
        # the LM head multiplies: the table when tied, the head when not (the table is then looked up)
        matmul=table + tokenization_matmul + L * (attention + mlp_active),
        attention_layers=L + (1 if tokenization else 0),
        attention_width=h,
    )


def encoder_size(model_cfg, vocab_size: int) -> Size:
    """THANN's decoder as an encoder (thann.models.thann.encoder): the language model's parameters
    (its LM head built but unused) and the pooled-embedding head. No logits are computed, and the
    projection runs once per text, not per token (h·P/S per token: left out)."""
    lm = model_size(model_cfg, vocab_size)
    head = (model_cfg.projection_dim or 0) * model_cfg.hidden_size
    temperature = 1 if model_cfg.learnt_temperature is not None else 0
    return Size(total=lm.total + head + temperature, active=lm.active + head + temperature,
                matmul=lm.matmul - vocab_size * model_cfg.hidden_size,
                attention_layers=lm.attention_layers, attention_width=lm.attention_width)


def value_size(model_cfg, vocab_size: int) -> Size:
    """THANN's decoder with a scalar per position (thann.models.thann.encoder.ThannValue): the
    language model's parameters (its LM head built but unused) and a linear head h -> 1."""
    lm = model_size(model_cfg, vocab_size)
    h = model_cfg.hidden_size
    return Size(total=lm.total + h + 1, active=lm.active + h + 1, matmul=lm.matmul - vocab_size * h + h,
                attention_layers=lm.attention_layers, attention_width=lm.attention_width)


def vlm_size(model_cfg, vocab_size: int) -> Size:
    """THANN reading an image prefix (thann.models.thann.vlm): the language model and the
    projector, a two-layer MLP with biases (image width -> h -> h) that runs once per image patch."""
    lm = model_size(model_cfg, vocab_size)
    h, i = model_cfg.hidden_size, model_cfg.image_hidden_size
    projector = i * h + h + h * h + h
    return Size(total=lm.total + projector, active=lm.active + projector, matmul=lm.matmul,
                attention_layers=lm.attention_layers, attention_width=lm.attention_width)
