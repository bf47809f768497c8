"""llmconv: LLaMA-family checkpoints -> GGUF / ggml files that llama.cpp loads."""

__version__ = "0.1.0"
