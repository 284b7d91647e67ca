"""What ``python -m project predict`` computes and writes: predictions of a checkpoint or an exported model."""

import csv
from collections.abc import Iterable
from pathlib import Path

import torch

from project.errors import UserError

PROGRAMS = (".pt2", ".onnx", ".xml")  # exported models that `predict` runs instead of a checkpoint


def predict_with_model_file(path: Path, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"pred", "prob"}`` of an exported model (``.pt2``, ``.onnx`` or OpenVINO ``.xml``) on uint8 image batches,
    which it is fed in [0, 1] (the input contract of every model the project ships)."""
    from project.compression.export import as_unit_float, predict_with_program

    if not path.is_file():
        raise UserError(f"{path} does not exist: pass a model that a fit, compress or export wrote")
    if path.suffix == ".pt2":
        return predict_with_program(path, batches)
    from project.compression.deploy import load_runtime

    model = load_runtime(path)
    logits = [torch.from_numpy(model(as_unit_float(images).cpu().numpy())) for images in batches]
    if not logits:
        raise UserError("no images to predict on: check the predict data")
    prob = torch.cat(logits).softmax(dim=-1)
    return {"pred": prob.argmax(dim=-1), "prob": prob}


def write_predictions_csv(outputs: list[dict[str, torch.Tensor]], path: Path) -> int:
    """``index,pred,prob`` rows (the predicted class and its probability) into ``path``; returns how many."""
    preds = torch.cat([o["pred"] for o in outputs]).tolist()
    probs = torch.cat([o["prob"] for o in outputs]).max(dim=-1).values.tolist()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "pred", "prob"])
        writer.writerows((i, p, f"{q:.4f}") for i, (p, q) in enumerate(zip(preds, probs)))
    return len(preds)
