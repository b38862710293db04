"""Evaluation of a job's final weights: mean IoU, pixel accuracy, per-class IoU and a picture."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segmodel import checkpoint
from segmodel.checkpoint import atomic_write_bytes
from segmodel.classes import class_names
from segmodel.data import load_sample, read_list, to_tensors
from segmodel.layout import JobLayout
from segmodel.metrics import ConfusionMatrix, summarize
from segmodel.model import build_model
from segmodel.spec import TrainSpec
from segmodel.train import environment, pick_device
from segmodel.visualize import save_prediction_grid

PICTURE_SAMPLES = 4


@torch.no_grad()
def evaluate(spec: TrainSpec, job_dir: Path | str, weights: Path, *, device: torch.device | None = None) -> dict[str, Any]:
    """Score `weights` on the job's validation list; write eval/report.json and eval/predictions.png."""
    layout = JobLayout(Path(job_dir))
    device = device or pick_device(spec)
    model = build_model(spec.model_copy(update={"pretrained": False, "pretrained_path": None}))
    model.load_state_dict(checkpoint.load(weights))
    model.to(device).eval()
    names = class_names(spec.num_classes)
    cm = ConfusionMatrix(spec.num_classes)
    samples = read_list(spec.val)
    shown: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for start in range(0, len(samples), spec.batch_size):
        batch = [load_sample(s, spec.height, spec.width, spec.num_classes) for s in samples[start : start + spec.batch_size]]
        tensors = [to_tensors(rgb, lab) for rgb, lab in batch]
        x = torch.stack([t[0] for t in tensors]).to(device)
        y = torch.stack([t[1] for t in tensors])
        pred = model(x).argmax(dim=1).cpu()
        cm.update(pred, y)
        for (rgb, lab), p in zip(batch, pred):
            if len(shown[0]) < PICTURE_SAMPLES:
                shown[0].append(rgb)
                shown[1].append(lab)
                shown[2].append(p.numpy().astype(np.uint8))
    report = summarize(cm.matrix, names)
    report.update({
        "weights": weights.name,
        "val_samples": len(samples),
        "predictions_png": str(layout.predictions_file),
        "environment": environment(device),
    })
    save_prediction_grid(layout.predictions_file, *shown, names)
    atomic_write_bytes(layout.report_file, json.dumps(report, indent=1).encode())
    return report
