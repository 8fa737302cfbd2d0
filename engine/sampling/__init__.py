"""Turning logits into tokens and tokens into text: SamplingParams, the keyed
host sampler, and the incremental detokenizer with stop strings."""
