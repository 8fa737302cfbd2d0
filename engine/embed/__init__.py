"""Embedding and reranking ("pooling") models, on the same MLX thread as generation.

    pooling_engine.PoolingEngine   front, any thread, no MLX: tokenizes, posts batches
        |
    embed_core.EmbedCore           on the MLX thread (core/worker.py steps it beside
                                   every generation core): one bounded batch per step
      model_kinds                  which kind a model directory is (sentence-transformers
                                   config, architectures) and how it pools
      bert                         BERT-family encoders and cross-encoders (hand-written)
      decoder                      decoder LLMs from mlx-lm: last-token embedders
                                   (Qwen3-Embedding) and yes/no rerankers (Qwen3-Reranker)
      pooling                      mean / CLS / max / last-token pooling, normalization
"""
