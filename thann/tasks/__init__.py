"""Tasks the one training loop runs (thann.training.task.Task): each checks its config, builds
its model, picks its step and supplies its data and metrics."""
