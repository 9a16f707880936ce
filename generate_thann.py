"""Generate with a trained THANN (or NNN) checkpoint: python generate_thann.py [overrides]
or torchrun --nproc-per-node N generate_thann.py parallel.tp=2 parallel.sp=true [overrides]."""

from thann.inference.cli import main

if __name__ == "__main__":
    main()
