"""Launch a command as N local processes the way torchrun / mlx.launch would (their
environment variables, ports on 127.0.0.1), and read a run dir back; for the distributed tests
and the scaling benchmark."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def rank_envs(prog: str, n: int, workdir: Path) -> list[dict[str, str]]:
    """The environment of each rank: torchrun's (env:// rendezvous) for cuda_ft, the ring
    backend's (``MLX_RANK`` + ``MLX_HOSTFILE``) for mlx_ft."""
    base = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}
    if prog == "cuda_ft":
        port = free_ports(1)[0]
        return [{**base, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n),
                 "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)} for r in range(n)]
    hostfile = workdir / f"hosts-{time.monotonic_ns()}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(n)]))
    return [{**base, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)} for r in range(n)]


def start(prog: str, n: int, argv: list[str], workdir: Path) -> list[subprocess.Popen]:
    """N ranks of ``python -m prog argv``, each logging to ``workdir/rank<r>.log``."""
    procs = []
    for r, env in enumerate(rank_envs(prog, n, workdir)):
        log = (workdir / f"rank{r}.log").open("w")
        procs.append(subprocess.Popen([sys.executable, "-m", prog, *argv], env=env, cwd=ROOT,
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return codes


def launcher_command(prog: str, n: int) -> list[str]:
    """The real launcher: ``torchrun`` for cuda_ft, ``mlx.launch`` (ring on 127.0.0.1) for
    mlx_ft, each on free ports."""
    if prog == "cuda_ft":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
                "--master-addr", "127.0.0.1", "--master-port", str(free_ports(1)[0]),
                "-m", prog]
    while True:  # mlx.launch takes n consecutive ports from --starting-port
        first = free_ports(1)[0]
        if first + n < 65536 and all(_free(first + i) for i in range(n)):
            break
    script = Path(sys.executable).with_name("mlx.launch")
    return [str(script) if script.is_file() else shutil.which("mlx.launch") or "mlx.launch",
            "-n", str(n), "--starting-port", str(first), "--python", sys.executable, "--",
            "-m", prog]


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def launch(prog: str, n: int, argv: list[str], workdir: Path, timeout: float = 300,
           via_launcher: bool = False) -> list[int]:
    """Run the ranks to the end; their exit codes (one code, the launcher's, with
    ``via_launcher``: its output goes to ``rank0.log``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if not via_launcher:
        return wait(start(prog, n, argv, workdir), timeout)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with (workdir / "rank0.log").open("w") as log:
        job = subprocess.Popen([*launcher_command(prog, n), *argv], env=env, cwd=ROOT,
                               stdout=log, stderr=subprocess.STDOUT)
        return wait([job], timeout)


def logs(workdir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(workdir.glob("rank*.log")))


def read_run(run_dir: Path) -> tuple[list[float], dict]:
    """The train losses of ``metrics.jsonl`` and the last checkpoint's trainable weights."""
    from safetensors.numpy import load_file

    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    last = max((run_dir / "checkpoints").iterdir())
    name = "trainable.safetensors"
    return losses, load_file(str(last / name))
