"""l4q: streaming quantization of BF16 Llama 4 checkpoints."""

__version__ = "0.1.0"
