"""Callbacks: one file per concern, each acting on ``pl_module.net`` at its hooks."""

from project.callbacks.guards import NonFiniteLossGuard

__all__ = ["NonFiniteLossGuard"]
