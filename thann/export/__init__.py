"""Models in other frameworks' formats: ``python -m thann.export hf`` writes a THANN checkpoint as an
HF transformers model directory (thann.export.hf), through the one mapping of THANN's weights to
HF's Mixtral and back (thann.checkpoint.mixtral, which ``init_from=`` also reads Mixtral with)."""
