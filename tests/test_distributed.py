"""Two processes equal one: ``N`` ranks of micro-batch ``b`` train exactly like one process of
micro-batch ``N b`` (losses per step and the trained weights, fp32), on both backends, through
their own engines (gloo under torchrun's variables, MLX's ring backend on 127.0.0.1), for SFT,
DPO, KTO (the step-wide KL estimate summed over ranks) and GRPO (groups sampled and scored by
rank, then gathered: the group statistics are the whole batch's); FSDP2 on the CPU; a killed
rank stops the job in bounded time and the run resumes to the uninterrupted numbers, also on
another world size when the global micro-batch is kept, and is refused when it is not.

Regressions these catch: a denominator left per rank (num_items, micro_fraction, the chosen
tokens, KTO's KL estimate, the rollout group statistics) or a gradient averaged instead of
summed changes the update by ~2x and fails the weight comparison; a rank that skips a pass
when it has no rows hangs the job (the timeouts here turn that into a failure).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx")
pytest.importorskip("torch")

from dist_helpers import ROOT, free_ports, launch, logs, read_run, start

from algorithms.cli import run_cli

SPECS = {"mlx_ft": "mlx_ft.backend:MLXBackend", "cuda_ft": "cuda_ft.backend:TorchBackend"}
COMMON = ["--learning-rate", "1e-2", "--adam-epsilon", "1e-4", "--no-progress", "--no-plots",
          "--dtype", "float32", "--max-length", "64", "--seed", "5", "--lora-rank", "4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "sky"]
    rows = {
        "sft.jsonl": [{"messages": [{"role": "user", "content": f"say {w}"},
                                    {"role": "assistant", "content": f"{w} {w} ok"}]}
                      for w in words],
        "pairs.jsonl": [{"prompt": f"say {w}", "chosen": f" {w} yes", "rejected": f" no {w} x"}
                        for w in words[:8]],
        "kto.jsonl": [{"prompt": f"say {w}", "completion": f" {w}", "label": i % 2 == 0}
                      for i, w in enumerate(words[:8])],
        "prompts.jsonl": [{"prompt": [{"role": "user", "content": f"say {w}"}]}
                          for w in words],
    }
    for name, lines in rows.items():
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in lines))
    from tiny import make_tiny_model

    make_tiny_model(d / "teacher", family="llama", seed=7)
    (d / "reward.py").write_text(
        "def odd(prompts, completions, completion_ids=None, **kw):\n"
        "    return [float(sum(ids) % 3) / 2 for ids in completion_ids]\n")
    return d


def _argv(algo, model, data, extra=()):
    files = {"sft": "sft.jsonl", "dpo": "pairs.jsonl", "kto": "kto.jsonl", "bco": "kto.jsonl",
             "gkd": "sft.jsonl"}
    argv = [algo, "--model", str(model), "--data", str(data / files.get(algo, "prompts.jsonl")),
            *COMMON]
    online = ["--reward", f"{data / 'reward.py'}:odd", "--max-completion-length", "6",
              "--temperature", "1.3", "--log-completions-every", "0", "--num-iterations", "2"]
    if algo == "grpo":
        argv += [*online, "--prompts-per-step", "3", "--num-generations", "3", "--beta", "0.05"]
    if algo == "ppo":  # value head, GAE, whitened advantages over the whole batch
        argv += [*online, "--prompts-per-step", "4", "--num-generations", "1"]
    if algo in ("online_dpo", "xpo"):  # 3 pairs over 2 ranks: one rank samples and trains
        argv += [*online, "--prompts-per-step", "3"]  # one pair, the other two
    if algo == "gkd":  # the teacher: another tiny model over the same tokenizer
        argv += ["--teacher", str(data / "teacher"), "--max-completion-length", "6",
                 "--prompts-per-step", "3", "--lmbda", "1", "--log-completions-every", "0"]
    return [*argv, *extra]


def _one(prog, argv, run_dir):
    """The one-process reference, in this process."""
    assert run_cli(prog, SPECS[prog], [*argv, "--run-dir", str(run_dir)]) == 0
    return read_run(run_dir)


def _two(prog, argv, run_dir, timeout=300, via_launcher=False):
    codes = launch(prog, 2, [*argv, "--run-dir", str(run_dir)], run_dir.parent / "logs",
                   timeout, via_launcher)
    assert not any(codes), logs(run_dir.parent / "logs")
    return read_run(run_dir)


def _same(a, b):
    (losses_a, weights_a), (losses_b, weights_b) = a, b
    assert len(losses_a) == len(losses_b)
    np.testing.assert_allclose(losses_b, losses_a, rtol=1e-5, atol=1e-6)
    assert set(weights_a) == set(weights_b)
    for key in weights_a:
        np.testing.assert_allclose(weights_b[key], weights_a[key], rtol=1e-5, atol=1e-6,
                                   err_msg=key)
    assert any(not np.allclose(w, 0) for k, w in weights_a.items() if "lora_b" in k.lower())


# SFT: 9 examples in global micro-batches of 4 (1 on the last of the epoch: one rank has an
# empty share), under the real launchers (torchrun, mlx.launch); the others under their
# variables. GRPO: 3 groups of 3 over 2 ranks (uneven shares) and 9 rows cut into micro-batches
# of 1 per rank (one rank has one fewer).
CASES = {
    "torch-sft": ("cuda_ft", "sft", ["--steps", "3"], 2),
    "torch-dpo": ("cuda_ft", "dpo", ["--steps", "2"], 2),
    "torch-kto": ("cuda_ft", "kto", ["--steps", "2"], 2),
    "torch-grpo": ("cuda_ft", "grpo", ["--steps", "2"], 1),
    "torch-ppo": ("cuda_ft", "ppo", ["--steps", "2"], 1),
    "mlx-sft": ("mlx_ft", "sft", ["--steps", "3"], 2),
    "mlx-dpo": ("mlx_ft", "dpo", ["--steps", "2", "--loss-type", "sigmoid", "sft"], 2),
    "mlx-kto": ("mlx_ft", "kto", ["--steps", "2", "--grad-accumulation-steps", "2"], 1),
    "mlx-grpo": ("mlx_ft", "grpo", ["--steps", "2"], 1),
    # pairs sampled and trained by rank (never split), BCO's running delta folded from every rank's rows,
    # GKD's token mean over the whole step
    "torch-online_dpo": ("cuda_ft", "online_dpo", ["--steps", "2"], 1),
    "mlx-xpo": ("mlx_ft", "xpo", ["--steps", "2"], 1),
    "mlx-bco": ("mlx_ft", "bco", ["--steps", "2"], 2),
    "torch-gkd": ("cuda_ft", "gkd", ["--steps", "2"], 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process(case, data, tiny_llama_dir, tmp_path):
    prog, algo, extra, per_rank = CASES[case]
    argv = _argv(algo, tiny_llama_dir, data, extra)
    one = _one(prog, [*argv, "--batch-size", str(2 * per_rank)], tmp_path / "one")
    two = _two(prog, [*argv, "--batch-size", str(per_rank)], tmp_path / "two",
               via_launcher=algo == "sft")
    _same(one, two)
    text = logs(tmp_path / "logs")
    assert "distributed: world size 2 (1 host" in text
    assert text.count('"steps"') == 1  # rank 0 alone reports


@pytest.mark.parametrize("algo", ["sft", "grpo"])
def test_fsdp2_on_cpu_equals_one_process(algo, data, tiny_llama_dir, tmp_path):
    """FSDP2 shards over gloo: the same numbers, and a checkpoint in the one-process format
    (whole tensors), which a one-process run resumes."""
    per_rank = 2 if algo == "sft" else 1
    argv = _argv(algo, tiny_llama_dir, data, ["--steps", "2", "--rollout-batch-size", "2"]
                 if algo == "grpo" else ["--steps", "3"])
    one = _one("cuda_ft", [*argv, "--batch-size", str(2 * per_rank)], tmp_path / "one")
    two = _two("cuda_ft", [*argv, "--batch-size", str(per_rank), "--parallel", "fsdp"],
               tmp_path / "two")
    _same(one, two)
    assert "data parallel: FSDP2" in (tmp_path / "logs" / "rank0.log").read_text()
    assert (tmp_path / "two" / "adapters" / "adapter_model.safetensors").is_file()


def test_resume_on_one_process_with_the_same_global_batch(data, tiny_llama_dir, tmp_path,
                                                          capsys):
    """2 ranks x 2 for 2 steps, then 1 process x 4 resumes to step 4: the uninterrupted
    one-process run's numbers. 1 x 2 would change the global micro-batch (the data cursor
    counts global micro-batches): refused with exit 2, naming the batch size that fits."""
    argv = _argv("sft", tiny_llama_dir, data, ["--save-every", "1"])
    _two("mlx_ft", [*argv, "--batch-size", "2", "--steps", "2"], tmp_path / "run")
    prog, spec = "mlx_ft", SPECS["mlx_ft"]
    capsys.readouterr()
    refused = [*argv, "--batch-size", "2", "--steps", "4", "--resume",
               "--run-dir", str(tmp_path / "run")]
    assert run_cli(prog, spec, refused) == 2
    err = capsys.readouterr().err
    assert "2 rank(s) x --batch-size 2 = a global micro-batch of 4" in err
    assert "resume with --batch-size 4" in err
    assert run_cli(prog, spec, [*argv, "--batch-size", "4", "--steps", "4", "--resume",
                                "--run-dir", str(tmp_path / "run")]) == 0
    _same(_one(prog, [*argv, "--batch-size", "4", "--steps", "4"], tmp_path / "one"),
          read_run(tmp_path / "run"))


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _rank_pid(launcher_pid: int, rank: int, deadline: float) -> int:
    """The pid of ``rank`` among the descendants of a launcher (its RANK / MLX_RANK)."""
    while time.monotonic() < deadline:
        todo, seen = [launcher_pid], []
        while todo:
            pid = todo.pop()
            try:
                kids = _children(pid)
            except OSError:
                continue
            seen += kids
            todo += kids
        for pid in seen:
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            ours = f"RANK={rank}".encode() in env or f"MLX_RANK={rank}".encode() in env
            if ours and b"-m" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                return pid
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} under {launcher_pid}")


def _wait_for(path: Path, deadline: float) -> None:
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_killed_rank_stops_torchrun_and_the_run_resumes(data, tiny_llama_dir, tmp_path):
    """torchrun: rank 1 killed after the step-2 checkpoint; the job exits non-zero within a
    minute naming rank 1; --resume on 2 ranks ends with the uninterrupted run's numbers."""
    argv = _argv("sft", tiny_llama_dir, data, ["--steps", "7", "--save-every", "2"])
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(free_ports(1)[0]),
                "-m", "cuda_ft"]
    log = (tmp_path / "torchrun.log").open("w")
    job = subprocess.Popen([*torchrun, *argv, "--batch-size", "1", "--run-dir", str(run)],
                           env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        victim = _rank_pid(job.pid, 1, deadline)
        _wait_for(run / "checkpoints" / "step_000002", deadline)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        code = job.wait(timeout=90)
    finally:
        job.kill()
    assert code != 0
    assert time.monotonic() - killed < 90
    text = (tmp_path / "torchrun.log").read_text()
    assert "rank      : 1" in text or "rank: 1" in text, text[-3000:]
    assert not (run / "adapters").exists()
    resumed = _two("cuda_ft", [*argv, "--batch-size", "1", "--resume"], run)
    _same(_one("cuda_ft", [*argv, "--batch-size", "2"], tmp_path / "one"), resumed)


def test_killed_rank_stops_mlx_ranks_with_a_message(data, tiny_llama_dir, tmp_path):
    """MLX ring backend: rank 1 killed mid-run; rank 0 stops with exit 1 within a minute and a
    message naming rank 1, never a hang; the checkpoints left are whole and resume."""
    argv = _argv("sft", tiny_llama_dir, data, ["--steps", "7", "--save-every", "2"])
    run = tmp_path / "run"
    logs_dir = tmp_path / "logs"
    logs_dir.mkdir()
    procs = start("mlx_ft", 2, [*argv, "--batch-size", "1", "--run-dir", str(run)], logs_dir)
    try:
        _wait_for(run / "checkpoints" / "step_000002", time.monotonic() + 240)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        code = procs[0].wait(timeout=60)
    finally:
        for p in procs:
            p.kill()
    assert code == 1
    assert time.monotonic() - killed < 60
    text = (logs_dir / "rank0.log").read_text()
    assert "[rank 0/2" in text and "lost rank 1" in text, text[-2000:]
    for checkpoint in (run / "checkpoints").iterdir():
        assert (checkpoint / "manifest.json").is_file()
    resumed = _two("mlx_ft", [*argv, "--batch-size", "1", "--resume"], run)
    _same(_one("mlx_ft", [*argv, "--batch-size", "2"], tmp_path / "one"), resumed)


def test_wrong_launcher_is_refused(data, tiny_llama_dir, tmp_path):
    """mlx_ft under torchrun's variables (or cuda_ft under mlx.launch's) would run N
    independent jobs into one run dir: refused with exit 2 and the launcher to use."""
    argv = _argv("sft", tiny_llama_dir, data, ["--steps", "1", "--batch-size", "2",
                                               "--run-dir", str(tmp_path / "run")])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_ports(1)[0])}
    done = subprocess.run([sys.executable, "-m", "mlx_ft", *argv], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert "mlx.launch" in done.stderr and "Traceback" not in done.stderr


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_devices() < 1, reason="needs a CUDA GPU")
def test_fsdp2_world_size_one_on_a_gpu(data, tiny_llama_dir, tmp_path):
    """torchrun with one GPU and --parallel fsdp: the wrapping, NCCL, the sharded optimiser and
    the checkpoint format (whole tensors) on real hardware; a one-process run resumes it and
    equals the uninterrupted one-process run."""
    argv = _argv("sft", tiny_llama_dir, data, ["--batch-size", "4", "--save-every", "1"])
    codes = launch("cuda_ft", 1, [*argv, "--steps", "2", "--parallel", "fsdp",
                                  "--run-dir", str(tmp_path / "run")], tmp_path / "logs",
                   via_launcher=True)
    assert codes == [0], logs(tmp_path / "logs")
    assert "data parallel: FSDP2" in logs(tmp_path / "logs")
    assert run_cli("cuda_ft", SPECS["cuda_ft"], [*argv, "--steps", "3", "--resume",
                                                 "--run-dir", str(tmp_path / "run")]) == 0
    _same(_one("cuda_ft", [*argv, "--steps", "3"], tmp_path / "one"), read_run(tmp_path / "run"))


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_devices() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gpus_equal_one(parallel, data, tiny_llama_dir, tmp_path):
    """NCCL: two GPUs of micro-batch 1 equal one GPU of micro-batch 2 (GRPO: sampling,
    gathering, the reference pass and the update)."""
    argv = _argv("grpo", tiny_llama_dir, data, ["--steps", "2"])
    one = _one("cuda_ft", [*argv, "--batch-size", "2"], tmp_path / "one")
    two = _two("cuda_ft", [*argv, "--batch-size", "1", "--parallel", parallel],
               tmp_path / "two", via_launcher=True)
    _same(one, two)
