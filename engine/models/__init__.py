"""Getting a model into memory: the model store (names, GGUF conversion cache)
and the loader (mlx-lm model, tokenizer, CPU-side weight layouts)."""
