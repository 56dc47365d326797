"""Tasks: one file per task, each owning its data, batches, loss, predictions, metrics and report."""
