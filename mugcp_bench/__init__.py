"""mugcp-bench: a benchmark and ablation suite for prompt learning on CLIP."""

__version__ = "0.1.0"
