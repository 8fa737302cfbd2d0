"""Cache fills: a finished request's reply becomes cacheable prefix.

Agents send the model's own reply back as part of their next prompt. Blocks are
published as prefill computes them, but a reply's tokens were computed by decode
steps, whose KV differs in the last bits from what a block prefill computes (other
kernels, other shapes). Publishing those would change the next request's output
against a run with the cache off. So when a request finishes, a fill job prefills
its prompt + reply again, block by block from the last cached block, exactly as a
later prompt would be prefilled: what it publishes is bit-identical to what that
prompt would have computed. The job runs on budget the step has left over, takes no
batch slot, and costs at most one block plus the reply per request.

On a chunk-invariant model (models/loader.py) decode steps and prefill give a token
the same bits, so the finished row's own KV is what the job would compute: its
blocks are cut from that instead (`publish_from_decode`), and no job runs, unless the
row no longer holds a block (a sliding window shorter than the reply).
"""

from __future__ import annotations

from ..handle import RequestHandle
from ..core.sequence import Sequence


def fill_job(seq: Sequence, block_size: int) -> Sequence | None:
    """The job that caches `seq`'s prompt + reply in whole blocks, or None when the
    reply adds no whole block beyond what the prompt's own prefill published."""
    if seq.fill_only or seq.finish_reason not in ("stop", "length"):
        return None
    tokens = seq.prompt_ids + seq.output_ids
    # Prefill stops one token short of its prompt (that token is the first decode
    # input), so the job's prompt ends one token after its last whole block.
    blocks = (len(tokens) - 1) // block_size
    if blocks <= (len(seq.prompt_ids) - 1) // block_size:
        return None
    return Sequence(request_id=f"{seq.request_id}/fill", prompt_ids=tokens[:blocks * block_size + 1],
                    params=seq.params, seed=seq.seed, handle=RequestHandle(f"{seq.request_id}/fill", on_cancel=lambda h: None),
                    text=seq.text, max_len=seq.max_len, source="cache-fill", fill_only=True)


def publish_from_decode(job: Sequence, row_cache: list, prefix_cache, prompt_tokens: int) -> bool:
    """Publish the blocks `job` would publish beyond the prompt's own, cut from the
    finished row's single-row cache; False (nothing published) if it no longer holds one."""
    block = prefix_cache.block_size
    keys = prefix_cache.keys(job.prompt_ids[:job.prefill_target])
    first = (prompt_tokens - 1) // block  # the prompt's own prefill published these
    held = row_cache[0].offset  # tokens whose KV the row holds: the prompt and the fed reply
    if held < len(keys) * block:
        return False
    try:
        payloads = [prefix_cache.extract(row_cache, back=held - (i + 1) * block) for i in range(first, len(keys))]
    except ValueError:
        return False
    for key, payload in zip(keys[first:], payloads):
        prefix_cache.put(key, payload)
    return True
