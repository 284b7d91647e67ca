"""A PyTorch Lightning template for training, fine-tuning and compressing image classifiers."""

__version__ = "0.1.0"
