"""Texts of an exact token count for the embedding bench (deterministic, any tokenizer)."""

import random

WORDS = ("model batch token kernel cache prefix stream server notebook engine embedding vector "
         "query document rerank retrieve answer memory budget thread python cell widget fast "
         "slow exact greedy sample draft verify accept reject block layer head weight").split()


def texts_of_tokens(tokenizer, n: int, tokens: int, seed: int = 0) -> list[str]:
    """n texts that `tokenizer` (a tokenizers.Tokenizer) encodes to exactly `tokens` ids
    with its special tokens."""
    rng = random.Random(seed)
    specials = len(tokenizer.encode("").ids)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(tokens * 2)]
        ids = tokenizer.encode(" ".join(words), add_special_tokens=False).ids[:tokens - specials]
        out.append(tokenizer.decode(ids))
    return out
