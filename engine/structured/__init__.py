"""Structured generation: JSON Schema, regex, choice and grammar constraints.

    constraint.py   SamplingParams' constraint fields -> one llguidance grammar (or a
                    clear error); the parsed result of a finished output
    matcher.py      per row: the grammar's state, advanced with every emitted token,
                    cut drafts at the first rejected token, rolled back never partially
    masks.py        next-token bitmasks of every constrained row, computed on a helper
                    thread while the forward runs; applied to logits on the host

The core calls three things: `Structured.start(rows, drafts)` before the forward,
`.wait()` after it (the masks the sampler and the verifier apply), and
`RowMatcher.advance(tokens)` as tokens are emitted.
"""
