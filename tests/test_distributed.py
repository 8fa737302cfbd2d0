"""One model across two processes (engine/distributed) on 127.0.0.1, MLX's ring backend.

Each group is formed by a fresh rank-0 process (tests/distributed_driver.py), since
MLX keeps one ring group per process; rank 0 starts rank 1 itself from the hostfile.
Tiny random models: llama and qwen3 split by mlx-lm's tensor parallelism over 2 ranks,
qwen3_5 (GatedDeltaNet + attention hybrid) by its pipeline parallelism over 3.

Tolerance: tensor parallelism sums each layer's two halves with the ring's all_sum,
so logits differ from one process in the last bits. Tokens are compared exactly
(greedy and seeded sampling, plain and speculative); the chosen tokens' logprobs
within 1e-3 (measured: < 6e-5).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil  # installed with ipykernel
import pytest

from engine import Engine, EngineConfig
from engine.errors import UnsupportedModelError
from tiny_models import write_tiny_model

DRIVER = Path(__file__).with_name("distributed_driver.py")
ROOT = Path(__file__).resolve().parent.parent
LOGPROB_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("distributed")
    hostfile = d / "hosts.json"
    hostfile.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2))
    (d / "hosts3.json").write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 3))
    models = {f: write_tiny_model(f, d / f, seed=1) for f in ("llama", "qwen3", "qwen3_5", "gemma3_text")}
    return d, hostfile, models


def drive(action, model, hostfile, cache_dir, layout="auto", timeout=240) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(DRIVER), action, str(model), str(hostfile), str(cache_dir), layout],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"driver failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_two_ranks_match_one_process(setup, family):
    d, hostfile, models = setup
    r = drive("compare", models[family], hostfile, d / f"kv-{family}")
    assert (r["layout"], r["ranks"]) == ("tensor", 2)
    assert_same_outputs(r)


def assert_same_outputs(r: dict) -> None:
    for run in ("dist-none", "dist-ngram"):
        for i, (want, got) in enumerate(zip(r["single"], r[run], strict=True)):
            kind = "greedy" if i % 2 == 0 else "seeded sample"
            assert got["tokens"] == want["tokens"], f"{run} request {i} ({kind}) differs"
            worst = max(abs(a - b) for a, b in zip(want["logprobs"], got["logprobs"], strict=True))
            assert worst < LOGPROB_TOLERANCE, f"{run} request {i}: logprob off by {worst}"
    assert r["dist_verify_calls"] > 0  # speculation ran verify/commit across the ranks
    assert "split across ranks" in r["train_refused"]


def test_three_ranks(setup):
    """Pipeline parallelism over 3 ranks (qwen3_5's 4 layers as 2 + 1 + 1, hand-offs
    between followers too) matches one process; tensor parallelism over 3 ranks cannot
    split 2 KV heads: a clear error once the group has formed, and no rank left running."""
    d, _, models = setup
    r = drive("compare", models["qwen3_5"], d / "hosts3.json", d / "kv-3", layout="pipeline")
    assert (r["layout"], r["ranks"]) == ("pipeline", 3)
    assert_same_outputs(r)
    failed = drive("load_error", models["llama"], d / "hosts3.json", d / "kv-3t")
    # Rank 0's own shard() error, or (when a follower got there first) the group's, quoting it.
    assert failed["error"].startswith(("UnsupportedModelError", "ModelLoadError"))
    assert "cannot split model family 'llama' across 3 ranks" in failed["error"]
    assert failed["children"] == []


def test_prefix_cache_hit_after_group_restart(setup):
    d, hostfile, models = setup
    kv = d / "kv-restart"
    first = drive("prefix", models["llama"], hostfile, kv)
    assert first["cached_tokens"] == 0
    for rank in (0, 1):  # each rank wrote its own shard of every block under the same keys
        files = sorted(p.name for p in (kv / "ranks" / f"rank-{rank}").glob("*.safetensors"))
        assert len(files) >= first["prompt_tokens"] // 32
    assert files == sorted(p.name for p in (kv / "ranks" / "rank-0").glob("*.safetensors"))
    second = drive("prefix", models["llama"], hostfile, kv)  # a new group: new processes
    assert second["cached_tokens"] == (first["prompt_tokens"] - 1) // 32 * 32 > 0
    assert second["ssd_hits"] > 0
    assert second["tokens"] == first["tokens"]
    # Rank 1 lost its SSD tier: the ranks agree on the blocks all of them hold (none),
    # recompute, and the output does not change.
    shutil.rmtree(kv / "ranks" / "rank-1")
    third = drive("prefix", models["llama"], hostfile, kv)
    assert third["cached_tokens"] == 0
    assert third["tokens"] == first["tokens"]


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_lost_rank_fails_in_flight_requests_and_refuses_new(setup, fault):
    """SIGKILL: the ring and the plan connection close. SIGSTOP: heartbeats stop and
    the watchdog fails the group after distributed_timeout (3 s in the driver)."""
    d, hostfile, models = setup
    r = drive(fault, models["llama"], hostfile, d / f"kv-{fault}")
    assert r["error"] is not None and r["error"].startswith("DistributedGroupError")
    if fault == "kill":
        assert "rank 1 (127.0.0.1) was killed by signal 9" in r["error"]
    else:  # the heartbeat and the step deadline both expire ~3 s after the stop; either may be first
        assert "rank 1 (127.0.0.1) sent no heartbeat" in r["error"] or "one step of the group ran" in r["error"]
    assert r["elapsed"] < 3.0 + 7.0  # bounded: the timeout plus slack for a loaded machine
    assert r["refused"] is not None and "group is down" in r["refused"]
    assert r["follower_exit"] is not None  # rank 0 left no process behind


def test_followers_exit_when_rank_0_dies(setup):
    d, hostfile, models = setup
    pid = drive("orphan", models["llama"], hostfile, d / "kv-orphan")["follower_pid"]
    deadline = time.monotonic() + 15
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "rank 1 outlived rank 0"


def _alive(pid: int) -> bool:
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_family_without_sharding_is_refused_by_name(setup):
    d, hostfile, models = setup
    with pytest.raises(UnsupportedModelError, match="gemma3_text"):
        Engine.load(models["gemma3_text"], EngineConfig(progress=False, hostfile=str(hostfile),
                                                        cache_dir=str(d / "kv-gemma")))


def test_bad_hostfiles_are_clear_errors(tmp_path, setup):
    d, _, models = setup
    one = tmp_path / "one.json"
    one.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}]))
    with pytest.raises(Exception, match="2 or more"):
        Engine.load(models["llama"], EngineConfig(progress=False, hostfile=str(one)))
    with pytest.raises(Exception, match="does not exist"):
        EngineConfig(hostfile=str(tmp_path / "missing.json"))
    no_rdma = tmp_path / "no-rdma.json"
    no_rdma.write_text(json.dumps({"backend": "jaccl", "hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2}))
    with pytest.raises(Exception, match='needs "rdma"'):
        Engine.load(models["llama"], EngineConfig(progress=False, hostfile=str(no_rdma)))


def test_jaccl_without_rdma_fails_cleanly(setup, tmp_path):
    """A JACCL hostfile where RDMA over Thunderbolt is not there (this machine): a clear
    load error from MLX, at once, and no rank left running."""
    d, _, models = setup
    hostfile = tmp_path / "jaccl.json"
    hostfile.write_text(json.dumps({"backend": "jaccl", "hosts": [
        {"ssh": "127.0.0.1", "ips": ["127.0.0.1"], "rdma": [None, "rdma_en2"]},
        {"ssh": "127.0.0.1", "ips": ["127.0.0.1"], "rdma": ["rdma_en2", None]}]}))
    r = drive("load_error", models["llama"], hostfile, d / "kv-jaccl", timeout=60)
    assert r["error"].startswith("ModelLoadError: could not form the jaccl group")
    assert r["children"] == []


PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n" * 12  # > one 128-token block


def single_process_text(model, cache_dir, max_tokens=12) -> str:
    with Engine.load(model, EngineConfig(progress=False, cache_dir=str(cache_dir))) as eng:
        return eng.generate(PROMPT, max_tokens=max_tokens, temperature=0).text


def test_kernelext_serve_with_a_hostfile(setup):
    """`kernelext serve --hostfile`: the official OpenAI client gets the one-process text;
    after rank 1 is killed, 503s that say so, and a clean exit."""
    import httpx
    import openai

    d, hostfile, models = setup
    want = single_process_text(models["qwen3"], d / "kv-serve-single")
    env = dict(os.environ, PYTHONPATH=str(ROOT), KERNELEXT_KV_CACHE=str(d / "kv-serve"))
    proc = subprocess.Popen([sys.executable, "-m", "kernelext", "serve", "--model", str(models["qwen3"]),
                             "--hostfile", str(hostfile), "--port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        for line in proc.stdout:
            if m := re.search(r"at (http://127\.0\.0\.1:\d+)", line):
                url = m[1]
                break
        assert url, proc.stderr.read()
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        got = client.completions.create(model=str(models["qwen3"]), prompt=PROMPT, max_tokens=12,
                                        temperature=0)
        assert got.choices[0].text == want
        # Rank 1 dies: requests get 503 with the group's error, /health says why.
        follower = psutil.Process(proc.pid).children()[0].pid
        os.kill(follower, signal.SIGKILL)
        with pytest.raises(openai.APIStatusError) as failed:
            for _ in range(50):  # until rank 0 has noticed (the next step's collective fails at once)
                client.completions.create(model=str(models["qwen3"]), prompt=PROMPT, max_tokens=4)
                time.sleep(0.1)
        assert failed.value.status_code == 503 and "group is down" in str(failed.value)
        health = httpx.get(url + "/health").json()
        assert health["status"] == "degraded" and "killed by signal 9" in health["errors"][str(models["qwen3"])]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()


def test_llm_load_with_a_hostfile_in_a_kernel(setup):
    """`%llm load MODEL --hostfile FILE --layout pipeline` in a real Jupyter kernel (rank 0
    is the kernel); `%llm status` shows the group."""
    from jupyter_client.manager import start_new_kernel

    d, hostfile, models = setup
    want = single_process_text(models["qwen3_5"], d / "kv-kernel-single")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT),
               KERNELEXT_KV_CACHE=str(d / "kv-kernel"))
    km, kc = start_new_kernel(kernel_name="python3", env=env, startup_timeout=120)
    outputs = []

    def run(code):
        reply = kc.execute_interactive(code, timeout=180, output_hook=lambda m: outputs.append(m))
        assert reply["content"]["status"] == "ok", (code, [m["content"] for m in outputs])

    try:
        run("%load_ext kernelext")
        run(f"%llm load {models['qwen3_5']} --hostfile {hostfile} --layout pipeline")
        run("from kernelext import get_engine\n"
            f"c = get_engine().generate({PROMPT!r}, max_tokens=12, temperature=0)\n"
            "print('TEXT', repr(c.text), get_engine().metrics()['ranks'])")
        text = "".join(m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream")
        assert f"TEXT {want!r} 2" in text
        assert "2 ranks" in text  # the load line says so
        outputs.clear()
        run("%llm status")
        status = "".join(m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream")
        assert "ranks  2 · pipeline parallel · all up" in status
        run("%llm unload")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_plan_connections_must_show_the_group_token():
    """Only processes this group started (they get its token in their environment) may
    join as a follower; anything else connecting to rank 0's plan port is dropped."""
    import socket

    from engine.distributed.channel import Channel
    from engine.distributed.group import DistributedGroup
    from engine.distributed.hostfile import Cluster, Host

    hosts = [Host(r, "127.0.0.1", "127.0.0.1", []) for r in range(3)]
    group = DistributedGroup(Cluster(hosts, "ring", []), timeout=3.0)
    group.processes = {1: None, 2: None}  # the ranks it started and waits for
    for hello, want in [({"hello": 1, "token": group.token}, 1),
                        ({"hello": 1, "token": "0" * 32}, None),  # a stranger
                        ({"hello": 1}, None),
                        ({"hello": 5, "token": group.token}, None),  # a rank it did not start
                        ({"rank": 1}, None)]:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            theirs = socket.create_connection(listener.getsockname())
            ours, _ = listener.accept()
        Channel(theirs).send(hello)
        assert group._greet(Channel(ours)) == want, hello
        ours.close()
        theirs.close()
