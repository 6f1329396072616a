"""algm-bench: token reduction for ViT semantic segmentation, measured honestly.

The public Python API (docs/api.md): :func:`load_model`, :func:`segmenter_from_encoder`,
:func:`apply_method`, :func:`count_gflops`, :func:`compare_speed`, :func:`evaluate_miou`.
They load on first use (``import algm`` does not import torch).
"""

__version__ = "0.1.0"

__all__ = ["load_model", "segmenter_from_encoder", "apply_method", "count_gflops", "compare_speed",
           "evaluate_miou"]


def __getattr__(name: str):
    if name in __all__:
        from algm import api

        return getattr(api, name)
    raise AttributeError(f"module 'algm' has no attribute {name!r}")
