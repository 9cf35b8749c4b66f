"""A replica fleet on this machine: N `apex-grpc serve` processes on loopback behind HAProxy
running deploy/kubernetes/haproxy.cfg (its servers rewritten to the local replicas).

Used by tests/e2e/test_fleet.py, and runnable as the balancer-cost benchmark:

    .venv/bin/python scripts/fleet.py [--replicas 3] [--num-prompts 60]

which measures, in one run, the median time to first token of sequential streams sent to one
replica directly and through HAProxy (the balancer's added latency), then the spread of
requests over the replicas under a steady load through HAProxy, and prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
HAPROXY_CONFIG = REPO_ROOT / "deploy/kubernetes/haproxy.cfg"
# A tiny random-weight Llama (the e2e tests' model): every replica gets the same weights.
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
    "bos_token_id": 1, "eos_token_id": 2,
}


class FleetError(RuntimeError):
    """The fleet could not be started (a replica or the balancer failed)."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def haproxy_binary() -> str:
    """The haproxy executable; scripts/bootstrap.sh installs it (Debian package haproxy)."""
    path = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.path.exists(p)), None)
    if path is None:
        raise FleetError("haproxy is not installed: run scripts/bootstrap.sh as root "
                         "(apt-get install haproxy)")
    return path


@dataclass
class Replica:
    """One `apex-grpc serve` child; its stderr is collected in lines by a reader thread."""

    name: str
    process: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    port: int = 0
    metrics_port: int = 0
    _ready: threading.Event = field(default_factory=threading.Event)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)
            if "event=listening" in line:
                self.port = int(re.search(r"address=127\.0\.0\.1:(\d+)", line).group(1))
                self.metrics_port = int(re.search(r"metrics_port=(\d+)", line).group(1))
            elif "apex-grpc ready on" in line:
                self._ready.set()
        self._ready.set()  # the process ended: wake the waiter, which then sees the exit

    def wait_ready(self, timeout_s: float) -> None:
        if not self._ready.wait(timeout_s) or self.process.poll() is not None:
            raise FleetError(f"replica {self.name} did not start:\n{''.join(self.lines[-30:])}")

    def finished_request_ids(self) -> list[str]:
        return [m.group(1) for line in list(self.lines)
                if (m := re.search(r"request_id=(\S+) event=finished", line))]


def start_replica(name: str, model_config: str, shutdown_grace_s: float = 20.0,
                  extra_args: tuple[str, ...] = ()) -> Replica:
    """Launch a replica of the tiny model on free ports (returns before it is ready)."""
    command = [sys.executable, "-m", "apex_grpc", "serve", "--load-format", "dummy",
               "--dummy-config", model_config, "--device", "cpu", "--dtype", "float32",
               "--port", "0", "--metrics-port", "0", "--replica-id", name,
               "--gpu-kv-blocks", "128", "--host-kv-gb", "0.01", "--max-num-seqs", "16",
               "--cpu-attention-threads", "1", "--shutdown-grace", str(shutdown_grace_s),
               *extra_args]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=env)
    replica = Replica(name, process)
    threading.Thread(target=replica._read, daemon=True).start()
    return replica


def render_haproxy_config(replicas: list[Replica], listen_port: int) -> str:
    """deploy/kubernetes/haproxy.cfg with the frontend on loopback and one static server per
    local replica (its readiness check on that replica's metrics port) instead of DNS."""
    text = HAPROXY_CONFIG.read_text()
    text, binds = re.subn(r"^(\s*)bind :50051 ", rf"\g<1>bind 127.0.0.1:{listen_port} ", text,
                          flags=re.M)
    templates = re.findall(r"^\s*server-template \S+ \S+ \S+ (.*)$", text, flags=re.M)
    if binds != 1 or len(templates) != 1:
        raise FleetError(f"{HAPROXY_CONFIG} no longer has one 'bind :50051' and one "
                         f"'server-template' line to rewrite")
    # The template's options minus DNS discovery; the check port becomes each metrics port.
    options = re.sub(r"\b(resolvers|init-addr) \S+\s*", "", templates[0]).strip()
    servers = "".join(f"    server {r.name} {r.target} "
                      + re.sub(r"\bport \d+", f"port {r.metrics_port}", options) + "\n"
                      for r in replicas)
    text = re.sub(r"^\s*server-template .*\n", servers, text, flags=re.M)
    # No DNS here: drop the resolvers section (it would read this machine's resolv.conf).
    return re.sub(r"^resolvers .*?\n\n", "", text, flags=re.M | re.S)


class Balancer:
    """haproxy in the foreground (-db) on a rendered config; its log is kept in lines."""

    def __init__(self, replicas: list[Replica], workdir: Path) -> None:
        self.port = free_port()
        self.config_path = workdir / "haproxy.cfg"
        self.config_path.write_text(render_haproxy_config(replicas, self.port))
        self.lines: list[str] = []
        self.process = subprocess.Popen([haproxy_binary(), "-db", "-f", str(self.config_path)],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=lambda: self.lines.extend(self.process.stdout),
                         daemon=True).start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_listening(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise FleetError(f"haproxy exited:\n{''.join(self.lines)}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise FleetError(f"haproxy not listening on {self.port}:\n{''.join(self.lines)}")


class Fleet:
    """N replicas and the balancer; stop() ends every process it started (SIGKILL after 20 s)."""

    def __init__(self, num_replicas: int = 3, shutdown_grace_s: float = 20.0) -> None:
        self._workdir = tempfile.TemporaryDirectory(prefix="apex-fleet-")
        workdir = Path(self._workdir.name)
        model_config = workdir / "config.json"
        model_config.write_text(json.dumps(TINY_LLAMA))
        self.replicas: list[Replica] = []
        self.balancer: Balancer | None = None
        try:
            self.replicas = [start_replica(f"replica-{i}", str(model_config), shutdown_grace_s)
                             for i in range(num_replicas)]
            for replica in self.replicas:
                replica.wait_ready(timeout_s=180)
            self.balancer = Balancer(self.replicas, workdir)
            self.balancer.wait_listening()
        except BaseException:
            self.stop()
            raise

    def wait_all_in_rotation(self, timeout_s: float = 30.0) -> None:
        """Until a request through the balancer has reached every replica."""
        from clients.client import ApexClient

        seen: set[str] = set()
        deadline = time.monotonic() + timeout_s
        with ApexClient(self.balancer.target) as client:
            while seen != {r.name for r in self.replicas}:
                if time.monotonic() > deadline:
                    raise FleetError(f"only {sorted(seen)} answered through haproxy")
                seen.add(client.generate(token_ids=[5, 6], max_new_tokens=1).replica_id)

    def stop(self) -> None:
        processes = [r.process for r in self.replicas]
        if self.balancer is not None:
            processes.append(self.balancer.process)
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        self._workdir.cleanup()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _bench(target: str, *flags: str) -> dict:
    """One apex-bench run (its summary goes to stdout); returns the result file's content."""
    from clients.bench.cli import main as bench_main

    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        status = bench_main(["--target", target, "--dataset-name", "fixed",
                             "--fixed-input-len", "16", "--disable-tqdm",
                             "--result-json", str(result_path), *flags])
        if status != 0:
            raise FleetError(f"apex-bench failed against {target}")
        return json.loads(result_path.read_text())


def _median_ttft_ms(target: str, num_prompts: int) -> float:
    """Sequential streams (one at a time, so the replica is idle for each)."""
    return _bench(target, "--num-prompts", str(num_prompts), "--max-concurrency", "1",
                  "--fixed-output-len", "4", "--num-warmups", "5")["median_ttft_ms"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--num-prompts", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternate direct and balanced runs this many times")
    parser.add_argument("--steady-prompts", type=int, default=300,
                        help="requests of the steady-load run that measures the balance")
    parser.add_argument("--steady-rate", type=float, default=30.0)
    args = parser.parse_args(argv)
    with Fleet(args.replicas) as fleet:
        fleet.wait_all_in_rotation()
        direct, balanced = [], []
        for _ in range(args.rounds):  # alternated, so drift on a shared machine hits both
            direct.append(_median_ttft_ms(fleet.replicas[0].target, args.num_prompts))
            balanced.append(_median_ttft_ms(fleet.balancer.target, args.num_prompts))
        steady = _bench(fleet.balancer.target, "--num-prompts", str(args.steady_prompts),
                        "--request-rate", str(args.steady_rate), "--fixed-output-len", "16")
    direct_ms, balanced_ms = sorted(direct)[len(direct) // 2], sorted(balanced)[len(balanced) // 2]
    counts = steady["requests_per_replica"]
    print(json.dumps({"direct_median_ttft_ms": direct, "haproxy_median_ttft_ms": balanced,
                      "direct_ms": direct_ms, "haproxy_ms": balanced_ms,
                      "added_ms": balanced_ms - direct_ms,
                      "steady_requests_per_replica": counts,
                      "steady_max_over_min": max(counts.values()) / min(counts.values())},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main())
