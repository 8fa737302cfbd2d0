"""Speculative decoding: drafters (n-gram, MTP heads), exact verification,
the adaptive depth controller, MTP head loading and training, and tuning."""
