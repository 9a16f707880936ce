"""A dense transformer (no experts, no learnt tokenization): the parameter-matched baseline of
the model variants, built from the same megatron-core modules as THANN."""
