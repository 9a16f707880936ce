"""An image encoder: megatron-core's ViT with THANN's layers (thann.models.vit.model)."""
