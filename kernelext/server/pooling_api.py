"""/v1/embeddings (OpenAI's shape) and /v1/rerank (Cohere's and Jina's shape), served
by embedding and reranking models (engine/embed) through the model registry."""

from __future__ import annotations

import base64

import numpy as np

from engine import InvalidRequestError

from . import common
from .common import ApiError, get


async def embeddings(call, body: dict) -> dict:
    engine = call.engine
    model = common.check_model(engine, body)
    inputs = body.get("input")
    if inputs is None:
        raise ApiError(400, "'input' is required", param="input")
    if inputs == "" or inputs == [] or (isinstance(inputs, list) and "" in inputs):
        raise ApiError(400, "'input' must not be empty", param="input")
    encoding = get(body, "encoding_format", str, "float")
    if encoding not in ("float", "base64"):
        raise ApiError(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    dimensions = get(body, "dimensions", int)
    if dimensions is not None and not 1 <= dimensions <= engine.dimensions:
        raise ApiError(400, f"'dimensions' must be in [1, {engine.dimensions}] for {model}",
                       param="dimensions")
    try:
        vectors, tokens = await engine.aembed(inputs, get(body, "prompt_name", str))
    except InvalidRequestError as e:
        raise ApiError(400, str(e), param="input") from None
    if dimensions is not None:
        vectors = truncate(vectors, dimensions)
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, encoding)}
            for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def truncate(vectors: np.ndarray, dimensions: int) -> np.ndarray:
    """The first `dimensions` components, renormalized to unit length (Matryoshka-style,
    as OpenAI's `dimensions` does)."""
    cut = vectors[:, :dimensions]
    return cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)


def _encode(vector: np.ndarray, encoding: str):
    if encoding == "base64":  # little-endian float32, as the openai client decodes it
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.astype(np.float32).tolist()


async def rerank(call, body: dict) -> dict:
    engine = call.engine
    model = common.check_model(engine, body)
    query = get(body, "query", str, required=True)
    documents = get(body, "documents", list, required=True)
    texts = []
    for i, d in enumerate(documents):  # Cohere and Jina take strings or {"text": ...}
        text = d.get("text") if isinstance(d, dict) else d
        if not isinstance(text, str):
            raise ApiError(400, f"'documents[{i}]' must be a string or an object with 'text'", param="documents")
        texts.append(text)
    top_n = get(body, "top_n", int)
    return_documents = get(body, "return_documents", bool, False)
    try:
        results, tokens = await engine.arerank(query, texts, top_n=top_n, return_documents=return_documents,
                                               instruction=get(body, "instruction", str))
    except InvalidRequestError as e:
        raise ApiError(400, str(e)) from None
    return {"id": common.new_id("rerank-"), "model": model,
            "results": [{"index": r.index, "relevance_score": r.relevance_score,
                         **({"document": {"text": r.document}} if return_documents else {})}
                        for r in results],
            "usage": {"total_tokens": tokens},
            "meta": {"billed_units": {"search_units": 1}}}
