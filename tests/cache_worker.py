"""Subprocess used by the prefix-cache tests: a fresh process with its own engine.

    python tests/cache_worker.py MODEL_DIR CACHE_DIR BLOCK_SIZE MAX_TOKENS PROMPT_FILE

Generates greedily for each prompt (one JSON line of token ids per line in
PROMPT_FILE) and prints one JSON line per completion: token ids and cached tokens.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import Engine, EngineConfig, SamplingParams  # noqa: E402


def main() -> None:
    model, cache_dir, block, max_tokens, prompt_file = sys.argv[1:6]
    prompts = [json.loads(line) for line in Path(prompt_file).read_text().splitlines()]
    config = EngineConfig(progress=False, cache_dir=cache_dir, block_size=int(block))
    with Engine.load(model, config) as eng:
        for ids in prompts:
            c = eng.generate(ids, SamplingParams(max_tokens=int(max_tokens)))
            print(json.dumps({"tokens": c.token_ids, "cached": c.usage.cached_tokens}), flush=True)


if __name__ == "__main__":
    main()
