"""LightningModules: what is trained, how the loss and metrics are computed."""

from project.tasks.classifier import ImageClassifier
from project.tasks.distill import DistillationClassifier
from project.tasks.schedules import WarmupCosineLR

__all__ = ["DistillationClassifier", "ImageClassifier", "WarmupCosineLR"]
