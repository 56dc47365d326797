"""Evaluation: classification and entity metrics, robustness attacks, the `llmk evaluate` stage."""
