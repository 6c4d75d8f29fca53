#!/usr/bin/env python
"""Run N processes of one command on this machine, as one multi-process JAX job over loopback.

    python launch/local.py -n 2 --cpu-devices 2 -- dsa-train train recipes/warmup.yaml --set model=configs/tiny.yaml

Each process gets DSA_COORDINATOR_ADDRESS=127.0.0.1:PORT, DSA_NUM_PROCESSES=N, DSA_PROCESS_ID=i
(read by ``dsa_train.parallel.distributed.initialize_from_env``, which ``dsa-train train`` calls
first) and, with ``--cpu-devices``, DSA_CPU_DEVICES so each process exposes that many CPU devices
with gloo collectives: the same code path as a multi-host GPU/TPU job, on one machine.

Output of process i is prefixed with ``[i]``. If any process fails, the others are stopped and
the launcher exits with the first failure's status.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"{prefix}{line}")
        out.flush()
    stream.close()


def launch(command: list[str], num_processes: int, cpu_devices: int = 0, port: int | None = None,
           env: dict | None = None, timeout: float | None = None, quiet: bool = False) -> int:
    """Start the processes, wait for all of them; returns 0 or the first non-zero exit status."""
    port = port or free_port()
    base = dict(os.environ if env is None else env)
    procs, pumps = [], []
    for i in range(num_processes):
        penv = dict(base, DSA_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", DSA_NUM_PROCESSES=str(num_processes),
                    DSA_PROCESS_ID=str(i), PYTHONUNBUFFERED="1")
        if cpu_devices:
            penv["DSA_CPU_DEVICES"] = str(cpu_devices)
            penv["JAX_PLATFORMS"] = "cpu"
        p = subprocess.Popen(command, env=penv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
        procs.append(p)
        t = threading.Thread(target=_pump, args=(p.stdout, f"[{i}] ", open(os.devnull, "w") if quiet else sys.stdout),
                             daemon=True)
        t.start()
        pumps.append(t)
    deadline = None if timeout is None else time.time() + timeout
    status = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed or (deadline is not None and time.time() > deadline):
                status = failed[0].returncode if failed else 124
                break
            time.sleep(0.2)
        else:
            status = next((p.returncode for p in procs if p.returncode), 0)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for t in pumps:
            t.join(timeout=5)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--num-processes", type=int, required=True)
    parser.add_argument("--cpu-devices", type=int, default=0,
                        help="CPU devices per process (gloo collectives); 0 = use the machine's accelerators")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before every process is stopped")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command each process runs")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --, e.g. -- dsa-train train recipes/warmup.yaml")
    if args.num_processes < 1:
        parser.error("--num-processes must be >= 1")
    return launch(command, args.num_processes, args.cpu_devices, args.port, timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
