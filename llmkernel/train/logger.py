"""Training logs: a progress bar with ETA and tokens/s, metrics.jsonl, and TensorBoard (tb/). Rank 0 only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm


class TrainLogger:
    """Writes each metrics record to metrics.jsonl and TensorBoard and shows progress on a tqdm bar."""

    def __init__(self, out: Path, max_steps: int, start_step: int, enabled: bool, progress: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        self.jsonl = open(Path(out) / "metrics.jsonl", "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(out) / "tb"))
        except ImportError:  # TensorBoard is a declared dependency, but a trimmed install still trains
            self.tb = None
        self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", disable=not progress)

    def log(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        """Record `metrics` (numbers) for `step` under `split` ('train' or 'val')."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for name, value in metrics.items():
                if isinstance(value, int | float):
                    self.tb.add_scalar(f"{split}/{name}", value, step)
        if split == "train" and self.bar is not None:
            self.bar.set_postfix(
                loss=f"{metrics['loss']:.3f}",
                lr=f"{metrics['lr']:.1e}",
                tok_s=f"{metrics['tokens_per_s']:,.0f}",
            )

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_text(tag, text, step)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def write(self, line: str) -> None:
        """Print a line without breaking the progress bar."""
        if self.enabled:
            (self.bar.write if self.bar is not None and not self.bar.disable else print)(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
