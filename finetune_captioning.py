"""Image captioning, LLaVA-style (THANN reading a frozen image encoder's projected patch states):
python finetune_captioning.py [overrides] or torchrun --nproc-per-node N finetune_captioning.py [overrides]."""

from thann.cli import captioning

if __name__ == "__main__":  # the guard matters: checkpoint writers start spawned processes
    captioning()
