"""Image-text contrastive training (a ViT beside THANN's text encoder, CLIP-style): python
pretrain_image_text.py [overrides] or torchrun --nproc-per-node N pretrain_image_text.py [overrides]."""

from thann.cli import image_text

if __name__ == "__main__":  # the guard matters: checkpoint writers start spawned processes
    image_text()
