"""loraswap: one frozen base model, many LoRA adapters, served per request."""

__version__ = "0.1.0"
