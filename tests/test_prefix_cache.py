"""Two-tier prefix cache: exactness for every cache kind, damage detection, budgets, crashes."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save

import engine.cache.ssd_tier as ssd_cache
from engine import Engine, EngineConfig, SamplingParams
from tiny_models import FAMILIES, tiny_model, write_tiny_model

BLOCK = 16
WORKER = Path(__file__).with_name("cache_worker.py")
TEXT = ("The prefix cache keeps blocks of the prompt so that a repeated system prompt is "
        "computed once. def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + "
        "fibonacci(n - 2). Hello, world! The quick brown fox jumps over the lazy dog. ")


def make_engine(family, cache_dir, **kw):
    cfg = dict(progress=False, block_size=BLOCK, step_token_budget=64, max_batch=8,
               cache_dir=str(cache_dir))
    cfg.update(kw)
    return Engine.load(tiny_model(family), EngineConfig(**cfg))


def prompt_ids(eng, n_tokens, salt=""):
    ids = eng.encode(salt + TEXT * (1 + n_tokens // 20))[:n_tokens]
    assert len(ids) == n_tokens
    return ids


def block_files(cache_dir):
    return sorted((Path(cache_dir) / "blocks").glob("*.safetensors"))


def dir_bytes(cache_dir):
    return sum(p.stat().st_size for p in (Path(cache_dir) / "blocks").iterdir())


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def test_hot_and_ssd_hits_are_exact(family, tmp_path):
    with make_engine(family, tmp_path / "none", prefix_cache=False) as plain:
        ids = prompt_ids(plain, 90)
        want = plain.generate(ids, max_tokens=20).token_ids
    with make_engine(family, tmp_path / "kv") as eng:
        cold = eng.generate(ids, max_tokens=20)
        hot = eng.generate(ids, max_tokens=20)
        # A longer prompt sharing the prefix restores it and computes the rest.
        longer = ids + prompt_ids(eng, 30, salt="more ")
        extended = eng.generate(longer, max_tokens=10)
    assert cold.token_ids == want and cold.usage.cached_tokens == 0
    assert hot.token_ids == want and hot.usage.cached_tokens == (89 // BLOCK) * BLOCK
    assert extended.usage.cached_tokens == (89 // BLOCK) * BLOCK
    with make_engine(family, tmp_path / "none2", prefix_cache=False) as plain:
        assert extended.token_ids == plain.generate(longer, max_tokens=10).token_ids
    assert len(block_files(tmp_path / "kv")) >= 89 // BLOCK
    with make_engine(family, tmp_path / "kv") as eng:  # new engine: RAM tier empty
        ssd = eng.generate(ids, max_tokens=20)
        assert eng.cache_info()["ssd_hit_blocks"] == 89 // BLOCK
    assert ssd.token_ids == want and ssd.usage.cached_tokens == (89 // BLOCK) * BLOCK


def _run_worker(family, cache_dir, prompts, tmp_path, max_tokens=12):
    prompt_file = tmp_path / f"prompts-{random.random()}.jsonl"
    prompt_file.write_text("\n".join(json.dumps(p) for p in prompts))
    out = subprocess.run([sys.executable, str(WORKER), str(tiny_model(family)), str(cache_dir),
                          str(BLOCK), str(max_tokens), str(prompt_file)],
                         capture_output=True, text=True, timeout=300, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_ssd_hit_in_a_fresh_process(family, tmp_path):
    with make_engine(family, tmp_path / "none", prefix_cache=False) as plain:
        ids = prompt_ids(plain, 70)
        want = plain.generate(ids, max_tokens=12).token_ids
    first = _run_worker(family, tmp_path / "kv", [ids], tmp_path)[0]
    second = _run_worker(family, tmp_path / "kv", [ids], tmp_path)[0]
    assert first == {"tokens": want, "cached": 0}
    assert second == {"tokens": want, "cached": (69 // BLOCK) * BLOCK}


def _damage(path: Path, how: str, foreign: Path | None = None):
    data = path.read_bytes()
    if how == "corrupt":  # flip bytes in the payload, after the header
        pos = len(data) - 100
        path.write_bytes(data[:pos] + bytes(b ^ 0xFF for b in data[pos:pos + 8]) + data[pos + 8:])
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "foreign":  # another model's block under this key's name
        path.write_bytes(foreign.read_bytes())
    elif how == "old-format":  # a valid file of an older cache format version
        meta = ssd_cache.read_metadata(path)
        meta["version"] = "0"
        path.write_bytes(save(load_file(path), metadata=meta))


@pytest.mark.parametrize("how", ["corrupt", "truncate", "foreign", "old-format"])
def test_damaged_blocks_are_never_served(how, tmp_path):
    kv = tmp_path / "kv"
    with make_engine("llama", tmp_path / "none", prefix_cache=False) as plain:
        ids = prompt_ids(plain, 80)
        want = plain.generate(ids, max_tokens=12).token_ids
    foreign = None
    if how == "foreign":
        with make_engine("qwen3", tmp_path / "other") as other:
            other.generate(prompt_ids(other, 40), max_tokens=2)
        foreign = block_files(tmp_path / "other")[0]
    with make_engine("llama", kv) as eng:
        eng.generate(ids, max_tokens=1)
        keys = eng.prefix_cache.keys(ids[:-1])
    victim = kv / "blocks" / f"{keys[2]}.safetensors"  # the third block of the chain
    _damage(victim, how, foreign)
    with make_engine("llama", kv) as eng, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = eng.generate(ids, max_tokens=12)
        info = eng.cache_info()
    assert got.token_ids == want
    # Every block but the damaged one is restored; that one is recomputed.
    assert got.usage.cached_tokens == (79 // BLOCK - 1) * BLOCK
    assert info["ssd_rejected_blocks"] == 1
    assert any("invalid KV block" in str(w.message) for w in caught)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_write_errors_disable_writing_once_and_generation_goes_on(code, tmp_path, monkeypatch):
    def failing_write(path, data):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(ssd_cache, "_write_durably", failing_write)
    with make_engine("llama", tmp_path / "none", prefix_cache=False) as plain:
        ids = [prompt_ids(plain, 60, salt=f"{i} ") for i in range(3)]
        want = [plain.generate(p, max_tokens=8).token_ids for p in ids]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with make_engine("llama", tmp_path / "kv") as eng:
            got = [eng.generate(p, max_tokens=8).token_ids for p in ids]
            eng.prefix_cache.ssd.flush()
            info = eng.cache_info()
            again = eng.generate(ids[0], max_tokens=8)  # still served from RAM
    assert got == want and again.token_ids == want[0]
    assert again.usage.cached_tokens > 0
    assert info["ssd_writing_disabled"] and info["ssd_blocks"] == 0
    assert sum("writing disabled" in str(w.message) for w in caught) == 1
    assert not list((tmp_path / "kv" / "blocks").iterdir())  # no temp file left behind


def test_ssd_budget_holds_across_evictions_and_models(tmp_path):
    kv = tmp_path / "kv"
    with make_engine("llama", tmp_path / "probe") as probe:
        probe.generate(prompt_ids(probe, 40), max_tokens=1)
        probe.prefix_cache.ssd.flush()
        block_bytes = max(p.stat().st_size for p in block_files(tmp_path / "probe"))
    budget = 5 * block_bytes + block_bytes // 2
    for family in ("llama", "gemma3_text", "llama"):  # switching models shares the directory
        with make_engine(family, kv, ssd_cache_bytes=budget) as eng:
            for i in range(6):
                eng.generate(prompt_ids(eng, 50, salt=f"{family} {i} "), max_tokens=1)
                eng.prefix_cache.ssd.flush()
                assert dir_bytes(kv) <= budget
            info = eng.cache_info()
            assert info["ssd_bytes"] == dir_bytes(kv) <= budget
    assert info["ssd_evictions"] > 0
    # A stranger's file in the directory is accounted for too.
    (kv / "blocks" / "stranger.bin").write_bytes(b"x" * (2 * block_bytes))
    with make_engine("llama", kv, ssd_cache_bytes=budget) as eng:
        eng.generate(prompt_ids(eng, 50, salt="last "), max_tokens=1)
        eng.prefix_cache.ssd.flush()
        assert dir_bytes(kv) <= budget


def test_concurrent_requests_compute_a_shared_prefix_once(tmp_path):
    with make_engine("llama", tmp_path / "kv", step_token_budget=32) as eng:
        shared = prompt_ids(eng, 96)
        prompts = [shared + eng.encode(f" question {i}?")[1:] for i in range(4)]
        handles = [eng.submit(p, max_tokens=4) for p in prompts]
        results = [h.result() for h in handles]
        info = eng.cache_info()
    # 6 shared blocks plus each prompt's own tail blocks: never the shared ones twice.
    own_blocks = sum((len(p) - 1) // BLOCK - 6 for p in prompts)
    assert info["published_blocks"] == 6 + own_blocks
    assert sum(r.usage.cached_tokens for r in results) == 3 * 6 * BLOCK


def test_runtime_budgets_and_clear(tmp_path):
    with make_engine("llama", tmp_path / "kv") as eng:
        for i in range(3):
            eng.generate(prompt_ids(eng, 60, salt=f"{i} "), max_tokens=1)
        eng.prefix_cache.ssd.flush()
        before = eng.cache_info()
        assert before["hot_blocks"] > 0 and before["ssd_blocks"] > 0
        eng.set_cache_budgets(hot_bytes=0, ssd_bytes=before["ssd_bytes"] // 2)
        after = eng.cache_info()
        assert after["hot_blocks"] == 0 and after["hot_budget_bytes"] == 0
        assert 0 < after["ssd_bytes"] <= before["ssd_bytes"] // 2
        eng.clear_cache()
        assert eng.cache_info()["ssd_blocks"] == 0
        assert not block_files(tmp_path / "kv")
        with pytest.raises(Exception, match="budgets"):
            eng.set_cache_budgets(hot_bytes=-1)


def test_kill_9_during_writes_never_leaves_a_wrong_block(tmp_path):
    kv = tmp_path / "kv"
    blocks = kv / "blocks"
    with make_engine("llama", tmp_path / "none", prefix_cache=False) as plain:
        prompts = [prompt_ids(plain, 1500, salt=f"run {i} ") for i in range(20)]
    rng = random.Random(0)
    for i, ids in enumerate(prompts):
        prompt_file = tmp_path / f"p{i}.jsonl"
        prompt_file.write_text(json.dumps(ids))
        before = len(list(blocks.glob("*"))) if blocks.exists() else 0
        proc = subprocess.Popen([sys.executable, str(WORKER), str(tiny_model("llama")), str(kv),
                                 str(BLOCK), "8", str(prompt_file)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Once this run has started writing its ~90 blocks, kill it at a random moment.
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and len(list(blocks.glob("*"))) <= before:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # Every block that loads must hold exactly what computing its prefix gives.
    with make_engine("llama", kv) as eng, \
            make_engine("llama", tmp_path / "fresh", ssd_cache=False) as ref:
        assert not list(blocks.glob(ssd_cache.TMP_PREFIX + "*"))  # start-up removed leftovers
        stored = {p.stem for p in block_files(kv)}
        checked = partial = 0
        for ids in prompts:
            all_keys = eng.prefix_cache.keys(ids[:-1])
            keys = [k for k in all_keys if k in stored]
            partial += 0 < len(keys) < len(all_keys)  # this run died in its write phase
            if not keys:
                continue
            ref.generate(ids, max_tokens=1)
            for key in keys:
                loaded = eng.prefix_cache.ssd.load(key, BLOCK)
                assert loaded is not None, "a published block failed validation"
                want = ref.prefix_cache.hot.get(key)
                for name, arr in loaded[0].items():
                    np.testing.assert_array_equal(arr, np.array(want[name]))
                checked += 1
        assert checked > 20 and partial >= 10, (checked, partial)


def test_default_model_cache_hits_are_exact(tmp_path):
    """Gemma 3 270M: sliding-window layers (window 512, wider than a block) and global layers,
    hits past the window (the default block size of 32: 21 blocks)."""
    cfg = dict(progress=False, cache_dir=str(tmp_path / "kv"), max_batch=4)
    with Engine.load("gemma-3-270m", EngineConfig(prefix_cache=False, **cfg)) as plain:
        ids = plain.encode("The history of Paris, told in detail. " * 100)[:700]
        assert len(ids) == 700
        want = plain.generate(ids, SamplingParams(max_tokens=12)).token_ids
    with Engine.load("gemma-3-270m", EngineConfig(**cfg)) as eng:
        assert eng.generate(ids, max_tokens=12).token_ids == want
        hot = eng.generate(ids, max_tokens=12)
    with Engine.load("gemma-3-270m", EngineConfig(**cfg)) as eng:
        ssd = eng.generate(ids, max_tokens=12)
    cached = 699 // EngineConfig.block_size * EngineConfig.block_size
    assert hot.token_ids == want and hot.usage.cached_tokens == cached
    assert ssd.token_ids == want and ssd.usage.cached_tokens == cached


def test_a_reply_sent_back_is_a_cache_hit_and_exact(family, tmp_path):
    """An agent sends the model's reply back in its next prompt: the reply's whole blocks
    are cached (prefilled again by a cache fill, not taken from decode's KV), so the next
    request restores them and still returns exactly what the cache-off engine returns."""
    with make_engine(family, tmp_path / "kv") as eng:
        ids = prompt_ids(eng, 40)
        first = eng.generate(ids, max_tokens=40)
        follow_up = ids + first.token_ids + prompt_ids(eng, 9, salt="next ")
        second = eng.generate(follow_up, max_tokens=12)
        filled = eng.metrics()["cache_fill_tokens"]
    with make_engine(family, tmp_path / "none", prefix_cache=False) as plain:
        assert plain.generate(follow_up, max_tokens=12).token_ids == second.token_ids
    reply_blocks = (len(ids) + len(first.token_ids) - 1) // BLOCK
    assert second.usage.cached_tokens == reply_blocks * BLOCK > (len(ids) - 1) // BLOCK * BLOCK
    assert filled == (reply_blocks - (len(ids) - 1) // BLOCK) * BLOCK


def test_an_agent_loop_recomputes_only_its_tail_and_stays_exact(family, tmp_path):
    """Turn after turn the prompt grows by the model's reply and a new message: every
    whole block before the new message comes from the cache (the prompt's own and the
    reply's, filled after each turn), and every turn equals the cache-off engine's."""
    turns = []
    with make_engine(family, tmp_path / "kv") as eng:
        prompt = prompt_ids(eng, 37)
        for turn in range(5):
            got = eng.generate(prompt, max_tokens=11 + turn)
            turns.append((prompt, got))
            prompt = prompt + got.token_ids + prompt_ids(eng, 9, salt=f"turn {turn} ")
    with make_engine(family, tmp_path / "none", prefix_cache=False) as plain:
        for prompt, got in turns:
            assert plain.generate(prompt, max_tokens=len(got.token_ids)).token_ids == got.token_ids
    for (before, reply), (prompt, got) in zip(turns, turns[1:]):
        seen = len(before) + len(reply.token_ids)  # all but the new message
        assert got.usage.cached_tokens == (seen - 1) // BLOCK * BLOCK


def test_reply_caching_can_be_turned_off(tmp_path):
    with make_engine("llama", tmp_path / "kv", cache_replies=False) as eng:
        ids = prompt_ids(eng, 40)
        first = eng.generate(ids, max_tokens=40)
        second = eng.generate(ids + first.token_ids + prompt_ids(eng, 9, salt="next "), max_tokens=4)
        assert eng.metrics()["cache_fill_tokens"] == 0
    assert second.usage.cached_tokens == (len(ids) - 1) // BLOCK * BLOCK


def _wide_window_gemma(tmp_path, window):
    """tiny gemma3_text with a sliding window wider than a block (as Gemma 3's 512 > 128)."""
    path = write_tiny_model("gemma3_text", tmp_path / f"gemma-window-{window}")
    config = json.loads((path / "config.json").read_text())
    config["sliding_window"] = window
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("window", [40, 48])
def test_sliding_window_wider_than_a_block_hits_are_exact(window, tmp_path):
    """Hits that end inside the first window, at it and past it (a multiple of the
    window or not), restore the rotating cache as block-by-block prefill leaves it."""
    path = _wide_window_gemma(tmp_path, window)
    cfg = dict(progress=False, block_size=BLOCK, step_token_budget=64, max_batch=8)
    lengths = (30, 41, 49, 97, 130)
    with Engine.load(path, EngineConfig(prefix_cache=False, **cfg)) as plain:
        base = prompt_ids(plain, max(lengths) + 3)
        want = {n: plain.generate(base[:n + 3], max_tokens=10).token_ids for n in lengths}
    with Engine.load(path, EngineConfig(cache_dir=str(tmp_path / "kv"), **cfg)) as eng:
        for n in lengths:
            eng.generate(base[:n], max_tokens=4)
            got = eng.generate(base[:n + 3], max_tokens=10)
            assert got.token_ids == want[n], n
            assert got.usage.cached_tokens >= (n - 1) // BLOCK * BLOCK  # the first prompt's blocks


def test_exiting_while_the_engine_works_does_not_abort(tmp_path):
    """A script that exits while its engine is still working (a reply streaming, the
    cache fill of the last reply) exits 0: MLX aborted the process when its thread was
    ended by the interpreter's exit in the middle of a step."""
    script = tmp_path / "exit_busy.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from tiny_models import tiny_model\n"
        "from engine import Engine, EngineConfig\n"
        f"eng = Engine.load(tiny_model('gemma3_text'), EngineConfig(progress=False, block_size=16, "
        f"cache_dir={str(tmp_path / 'kv')!r}))\n"
        "ids = eng.encode('hello world ' * 20)\n"
        "reply = eng.generate(ids, max_tokens=40).token_ids\n"
        "eng.generate(ids + reply + ids[:3], max_tokens=1)  # its cache fill runs on\n"
        "stream = eng.submit(ids * 3, max_tokens=4000)\n"
        "next(iter(stream))\n"
        "print('exiting', flush=True)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "exiting" in out.stdout and "terminate called" not in out.stderr
