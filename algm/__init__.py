"""algm-bench: token reduction for ViT semantic segmentation, measured honestly."""

__version__ = "0.1.0"
