"""Where one job's files live under its folder on shared storage."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from segmodel import checkpoint


@dataclass(frozen=True)
class JobLayout:
    root: Path

    @property
    def spec_file(self) -> Path:
        return self.root / "job.json"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def weights_dir(self) -> Path:
        return self.root / "weights"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def commit_log(self) -> Path:
        return self.root / "commits.jsonl"

    @property
    def validation_file(self) -> Path:
        """One JSON line per validated epoch (spec.val_every): mIoU and pixel accuracy."""
        return self.root / "validation.jsonl"

    @property
    def report_file(self) -> Path:
        return self.root / "eval" / "report.json"

    @property
    def predictions_file(self) -> Path:
        return self.root / "eval" / "predictions.png"

    @property
    def init_weights(self) -> Path:
        """The job's own copy of the weights it started from (checksummed)."""
        return self.root / "init_weights.pt"

    @property
    def backbone(self) -> Path:
        """The frozen backbone's weights, once per job: chunk checkpoints hold only what trains."""
        return self.checkpoints_dir / "backbone.pt"

    def weight(self, epoch: int) -> Path:
        return self.weights_dir / f"weight{epoch}.pt"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints_dir / f"step{step}.pt"

    def checkpoint_steps(self) -> list[int]:
        """Steps with a full-state checkpoint file on storage, newest first (validity not checked)."""
        if not self.checkpoints_dir.is_dir():
            return []
        steps = [int(p.stem[4:]) for p in self.checkpoints_dir.glob("step*.pt") if p.stem[4:].isdigit()]
        return sorted(steps, reverse=True)

    def prune_checkpoints(self, keep: int) -> list[int]:
        """Delete all but the newest `keep` chunk checkpoints (file and checksum); returns their steps."""
        gone = self.checkpoint_steps()[keep:]
        for step in gone:
            checkpoint.remove(self.checkpoint(step))
        return gone

    def newest_good_checkpoint(self, before: int) -> int:
        """The newest step <= `before` whose checkpoint verifies; 0 (the seed) if none does."""
        return next((s for s in self.checkpoint_steps() if s <= before and checkpoint.is_valid(self.checkpoint(s))), 0)
