"""Generation: batched, KV-cached (or recurrent-state) decoding with sampling and per-token
log-probabilities, in the parallel layout the model was built in. Used by the end-of-run
sample, by ``thann-generate`` and by later stages (PPO rollouts)."""
