"""The two-tier prefix KV cache: chained block keys, the hot (RAM) and SSD tiers,
one handler per cache kind, and recurrent-state capture at block boundaries."""
