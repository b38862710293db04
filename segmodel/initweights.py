"""A job's starting weights from a file: a state_dict in the seed's format (or a Relay weight<E>.pt,
legacy names included), checked against the job's model before anything is created."""
from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from pathlib import Path

import torch

from segmodel.errors import InitWeightsError, show_path
from segmodel.net import build_model, seed_names
from segmodel.spec import TrainSpec

_LIST = 8  # keys named per problem before "and N more"


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LIST])
    return shown + (f" and {len(keys) - _LIST} more" if len(keys) > _LIST else "")


def read_init_weights(path: Path, spec: TrainSpec) -> tuple[dict[str, torch.Tensor], str]:
    """The file's state_dict in the seed's names, matching the job's model key for key, shape for
    shape and dtype for dtype; and the file's sha256. InitWeightsError names the file and what is wrong."""
    if not path.exists():
        raise InitWeightsError(f"{show_path(path)}: no such file")
    if not path.is_file():
        raise InitWeightsError(f"{show_path(path)}: not a regular file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InitWeightsError(f"{show_path(path)}: cannot be read ({exc.strerror})") from None
    digest = hashlib.sha256(data).hexdigest()
    if spec.init_weights_sha256 and spec.init_weights_sha256 != digest:
        raise InitWeightsError(f"{path}: sha256 {digest} differs from init_weights_sha256 {spec.init_weights_sha256}")
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, truncated, or it holds objects (code) weights_only refuses
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InitWeightsError(f"{path}: does not load with torch.load(weights_only=True) ({type(exc).__name__}: {first})") from exc
    if not isinstance(loaded, Mapping):
        raise InitWeightsError(f"{path}: holds a {type(loaded).__name__}, not a state_dict")
    if "model" in loaded and "optimizer" in loaded:
        raise InitWeightsError(f"{path}: a full-state checkpoint; pass a weight<E>.pt or a model's state_dict")
    odd = [str(k) for k, v in loaded.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if odd:
        raise InitWeightsError(f"{path}: not a state_dict: not a tensor under {_names(odd)}")
    state = seed_names(loaded)
    # The model's names, shapes and dtypes, on the meta device: nothing allocated, no RNG drawn.
    with torch.device("meta"):
        expected = build_model(spec.model_copy(update={"pretrained": False, "pretrained_path": None})).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k} (file {tuple(state[k].shape)} {state[k].dtype}, model {tuple(v.shape)} {v.dtype})"
                  for k, v in expected.items() if k in state and (state[k].shape != v.shape or state[k].dtype != v.dtype)]
    problems = [f"{what}: {_names(keys)}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("mismatched", mismatched)) if keys]
    if problems:
        raise InitWeightsError(f"{path} does not fit the job's model (num_classes={spec.num_classes}): " + "; ".join(problems))
    bad = [k for k in expected if state[k].is_floating_point() and not bool(torch.isfinite(state[k]).all())]
    if bad:
        raise InitWeightsError(f"{path}: non-finite values in {_names(bad)}")
    return {k: state[k].contiguous() for k in expected}, digest
