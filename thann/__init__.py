"""THANN: a Mixture-of-Experts transformer trained with megatron-core."""

import warnings

# megatron-core announces at import that transformer-engine/apex are absent; THANN's own
# PyTorch modules stand in for them (see thann.models.common), so the notice is noise.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed")
