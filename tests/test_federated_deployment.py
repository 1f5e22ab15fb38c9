"""dptrain.federated on a real Flower deployment: a SuperLink and 3 SuperNodes on localhost, started and stopped here.

The app of tests/fl_app is submitted with ``flwr run`` and travels over Flower's own transport (HTTP on 127.0.0.1);
its result must equal Flower's simulation of the same app with the same seeds (``clipped_run``, which
tests/test_federated.py checks against a hand computation; float tolerance: the clients train in other processes).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from federated_helpers import APP_DIR, CLIPPED_RUN

BIN = Path(sys.executable).parent
NODES = CLIPPED_RUN["num-clients"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the SuperLink exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the SuperLink did not listen on 127.0.0.1:{port} within {timeout} s")


def processes_mentioning(marker: str) -> list[int]:
    """Pids of processes whose command line holds ``marker`` (Flower's detached SuperExec and ClientApp processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def stop(processes: list[subprocess.Popen], markers: list[str]) -> None:
    """SIGTERM what we started (and what it detached), SIGKILL what is left after 10 s."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for _ in range(50):
        left = [pid for marker in markers for pid in processes_mentioning(marker)]
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGTERM if _ < 25 else signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"processes still running after stop: {left}")


@pytest.fixture
def deployment(tmp_path: Path):
    """A SuperLink and NODES SuperNodes on 127.0.0.1, with a Flower home in tmp_path; stopped at the end."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    link_port = free_port()
    node_ports = [free_port() for _ in range(NODES)]
    (home / "config.toml").write_text(f'[superlink.local]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "PATH": f"{BIN}:{os.environ['PATH']}"}
    processes: list[subprocess.Popen] = []
    markers = [f"127.0.0.1:{p}" for p in (link_port, *node_ports)] + [str(tmp_path)]
    try:
        link_log = tmp_path / "superlink.log"
        link = subprocess.Popen(
            [BIN / "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link_port),
             "--disable-runtime-dependency-installation", "--database", str(tmp_path / "superlink.db")],
            env=env, stdout=link_log.open("w"), stderr=subprocess.STDOUT, cwd=tmp_path,
        )
        processes.append(link)
        wait_for_port(link_port, link, link_log)
        for i, port in enumerate(node_ports):
            processes.append(subprocess.Popen(
                [BIN / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}", "--port", str(port),
                 "--node-config", f"partition-id={i} num-partitions={NODES}"],
                env=env, stdout=(tmp_path / f"supernode-{i}.log").open("w"), stderr=subprocess.STDOUT, cwd=tmp_path,
            ))
        yield env
    finally:
        stop(processes, markers)


def test_superlink_and_supernodes_give_the_simulations_result(tmp_path: Path, deployment, clipped_run: dict):
    out = tmp_path / "deployed.json"
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in {**CLIPPED_RUN, "out": str(out)}.items())
    run = subprocess.run(
        [BIN / "flwr", "run", str(APP_DIR), "local", "--stream", "--run-config", overrides],
        env=deployment, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert run.returncode == 0 and out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    deployed, simulated = json.loads(out.read_text()), clipped_run
    assert deployed["rounds_run"] == simulated["rounds_run"] == 2
    assert deployed["sampled"] == simulated["sampled"]  # the same clients, by partition, in every round
    assert [r["contributed"] for r in deployed["rounds"]] == [r["sampled"] for r in deployed["rounds"]]
    # The SuperNodes' ClientApps clipped their updates before sending them over Flower's transport.
    assert all(n <= CLIPPED_RUN["max-norm"] * (1 + 1e-9) for r in deployed["rounds"] for n in r["norms"])
    for name, value in simulated["final"].items():
        np.testing.assert_allclose(deployed["final"][name], value, rtol=0, atol=1e-6)
