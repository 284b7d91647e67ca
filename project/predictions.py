"""What ``python -m project predict`` computes and writes: predictions of a checkpoint or an exported model."""

import csv
from collections.abc import Iterable
from pathlib import Path

import torch

from project.errors import UserError



def predict_with_model_file(path: Path, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"pred", "prob"}`` of a shipped model (any format of :mod:`project.compression.artifacts`) on uint8
    image batches, which it is fed in [0, 1] (the input contract of every model the project ships)."""
    from project.compression.artifacts import load_runner
    from project.compression.export import as_unit_float

    run = load_runner(path)
    logits = [torch.from_numpy(run(as_unit_float(images).cpu().numpy())) for images in batches]
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
