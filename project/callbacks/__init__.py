"""Callbacks: one file per concern, each acting on ``pl_module.net`` at its hooks."""

from project.callbacks.checkpoint import BestAndLastCheckpoint
from project.callbacks.freezing import FreezeSchedule, Phase
from project.callbacks.guards import NonFiniteLossGuard
from project.callbacks.magnitude_pruning import MagnitudePruning
from project.callbacks.qat import QuantizationAwareTraining
from project.callbacks.channel_pruning import ChannelPruning
from project.callbacks.visuals import TensorBoardViews

__all__ = ["BestAndLastCheckpoint", "ChannelPruning", "FreezeSchedule", "MagnitudePruning", "NonFiniteLossGuard", "Phase", "QuantizationAwareTraining", "TensorBoardViews"]
