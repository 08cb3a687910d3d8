"""``--ray-address``: a run joins a Ray cluster started with ``ray start --head`` (here, on this machine).

The head runs with ``--block`` in its own process group, so ending that group ends exactly this cluster
(``ray stop`` would end every Ray instance on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_run_joins_a_started_cluster(tmp_path: Path) -> None:
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # a throw-away cluster on this machine; real clusters keep Ray's token authentication
    env["RAY_AUTH_MODE"] = "disabled"
    # its own temporary folder: the address file it leaves is not where other Ray drivers look
    temp = tempfile.mkdtemp(prefix="qkray")  # short: Ray's socket paths must fit in 107 characters
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
         "--include-dashboard=false", "--node-ip-address", "127.0.0.1", "--temp-dir", temp],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    out = tmp_path / "out"
    try:
        cmd = [
            sys.executable,
            "-m",
            "qk_subspace.cli",
            "run",
            "--n-tokens",
            "4096",
            "--ctx",
            "128",
            "--no-png",
        ]
        cmd += ["--no-progress", "--executor", "ray", "--ray-address", f"127.0.0.1:{port}", "--out", str(out)]
        deadline = time.monotonic() + 120
        while True:  # the head needs a few seconds before it takes drivers
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)
            if res.returncode == 0 or time.monotonic() > deadline or "Failed to connect" not in res.stderr:
                break
            time.sleep(2)
        assert res.returncode == 0, res.stderr[-2000:]
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)
    data = json.loads((out / "exp6_stories260K.json").read_text())
    assert data["status"]["complete"]
    ex = data["metadata"]["executor"]
    assert ex["name"] == "ray" and ex["address"] == f"127.0.0.1:{port}"
    assert ex["workers"] == 2  # the cluster's CPUs / --threads-per-worker
