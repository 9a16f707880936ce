"""Parameter count of an image-encoder config, from its shape alone (per image: the patches are
its tokens)."""

from thann.models.common.size import Size
from thann.models.thann.size import attention_params


def vit_size(args) -> Size:
    h, L, p = args.hidden_size, args.num_layers, args.patch_size
    patches = (args.image_size // p) ** 2
    norm = 2 * h if args.normalization == "LayerNorm" else h  # LayerNorm has a bias
    embed = 3 * p * p * h  # the patch convolution, no bias
    layer = attention_params(args) + 3 * h * args.ffn_hidden_size + 2 * norm
    head = (args.projection_dim or 0) * h
    temperature = 1 if args.get("learnt_temperature") is not None else 0
    matmul = embed + L * (attention_params(args) + 3 * h * args.ffn_hidden_size)
    total = embed + patches * h + 2 * norm + L * layer + head + temperature  # and the pre- and final norms
    return Size(total=total, active=total, matmul=matmul, attention_layers=L, attention_width=h)
