"""megatron-core's MoE router without transformer-engine (CPU always; GPUs outside the NVIDIA
container): 0.16 computes its logits through an undefined name and raises ``NameError:
te_general_gemm``; the name set to None selects its plain-torch branch. Applied while process
groups exist (thann.parallel.state), with CUDA or without; removed with them."""

_applied = False


def install() -> None:
    global _applied
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
        _applied = True


def uninstall() -> None:
    global _applied
    from megatron.core.transformer.moe import moe_utils

    if _applied:
        del moe_utils.te_general_gemm
        _applied = False
