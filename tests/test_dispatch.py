"""The local Ray a stage starts when RAY_ADDRESS is unset, and train_dit's process group on it: all on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Starts the stages' local Ray the way `presto stage` does (defaults set before ray is imported), runs a task,
# and prints every TCP/UDP address that this process or any process under it (GCS, raylet, agents, workers)
# listens on.
LISTENERS = """
import json, os, psutil
from flows.env import set_defaults
set_defaults()
import ray
from flows.dispatch import ray_init
ray_init()
node = ray.get(ray.remote(lambda: ray.util.get_node_ip_address()).remote())
pids = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
bound = sorted({c.laddr.ip for c in psutil.net_connections("inet")
                if c.pid in pids and (c.status == psutil.CONN_LISTEN or c.type == 2)})
print(json.dumps({"node": node, "bound": bound, "processes": len(pids)}))
ray.shutdown()
"""


# train_dit's process group: two Ray Train workers on BoundStoreTorchConfig (as the stage runs them), each
# summing its rank + 1 over the group and writing down every address its own process listens on meanwhile.
PROCESS_GROUP = """
import json, os, tempfile
from flows.env import set_defaults
set_defaults()
import ray, ray.train
from ray.train.torch import TorchTrainer
from flows.dispatch import ray_init
from stages.process_group import BoundStoreTorchConfig

def loop(config):
    import psutil, torch, torch.distributed as dist
    total = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(total)
    bound = sorted({c.laddr.ip for c in psutil.net_connections("inet")
                    if c.pid == os.getpid() and c.status == psutil.CONN_LISTEN})
    with open(os.path.join(config["out"], f"{dist.get_rank()}.json"), "w") as f:
        json.dump({"bound": bound, "sum": total.item(), "world": dist.get_world_size()}, f)

ray_init()
out = tempfile.mkdtemp()
TorchTrainer(loop, train_loop_config={"out": out}, torch_config=BoundStoreTorchConfig(),
             scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
             run_config=ray.train.RunConfig(storage_path=out)).fit()
print("WORKERS", json.dumps([json.load(open(os.path.join(out, f"{rank}.json"))) for rank in range(2)]))
ray.shutdown()
"""

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=base | env, capture_output=True, text=True,
                          timeout=300)


def test_the_local_ray_listens_on_loopback_only() -> None:
    done = _python(LISTENERS)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["node"] == "127.0.0.1"
    assert seen["processes"] >= 3  # the driver, GCS and raylet at least: the walk found Ray's processes
    assert seen["bound"], "no listening socket found at all"
    assert set(seen["bound"]) <= LOOPBACK, seen["bound"]


def test_the_training_process_group_listens_on_loopback_only() -> None:
    # torch's own rank-0 store would listen on "::" (every interface); the group must still form and work.
    done = _python(PROCESS_GROUP)
    assert done.returncode == 0, done.stderr[-3000:]
    # Ray Train prints its own lines to stdout too
    workers = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("WORKERS "))[8:])
    assert [w["world"] for w in workers] == [2, 2]
    assert [w["sum"] for w in workers] == [3.0, 3.0]  # 1 + 2: the all-reduce went through the group
    assert workers[0]["bound"], "no listening socket found in worker 0 (the store's host)"
    for w in workers:
        assert set(w["bound"]) <= LOOPBACK, w["bound"]


def test_a_local_ray_on_the_routable_address_is_refused() -> None:
    # Ray's switch turned back on, as when ray is imported before the defaults are set.
    done = _python(LISTENERS, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1")
    if done.returncode == 0 and json.loads(done.stdout.strip().splitlines()[-1])["node"] == "127.0.0.1":
        pytest.skip("this machine has no routable address for Ray to move to")
    assert done.returncode != 0
    assert "not 127.0.0.1" in done.stderr and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in done.stderr


@pytest.mark.parametrize(("address", "loopback"), [
    ("", True), ("127.0.0.1:6379", True), ("localhost:6379", True), ("ray://127.0.0.1:10001", True),
    ("[::1]:6379", True), ("10.0.0.5:6379", False), ("ray://head:10001", False), ("127.0.0.2:6379", False),
    ("http://127.0.0.1:8265", False),  # the Jobs API: this process never joins the cluster itself
])
def test_the_loopback_switch_is_set_for_a_ray_on_this_machines_loopback_only(
        address: str, loopback: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.env import OFFLINE_ENV, on_loopback, set_defaults

    for key, value in OFFLINE_ENV.items():  # so that they are restored afterwards too
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", address)
    assert on_loopback(address) is loopback
    set_defaults()
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == ("0" if loopback else None)
