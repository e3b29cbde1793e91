"""``python ARGV`` for tests that run a command as a user would, in one process or as two CPU
processes of one process group. Two are started as ``torch.distributed.run --nproc_per_node 2``
starts its workers (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set, gloo through
accelerate) but without the launcher's own process. Neither imports torch, transformers and
preftune again: processes are forked from a server process (multiprocessing's
``forkserver``) that imported them once for the whole test session and then never ran a
computation, so no thread pool is copied into the fork. That saves about 5 s of every test
here. A process then runs ``python ARGV`` in-process (``runpy``), with the command's environment,
working directory and output files. The multi-machine launch and its errors are tested through
torch.distributed.run itself (test_distributed.py)."""

import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import socket
import subprocess
import sys
import tempfile
import time

# What the ranks of these tests import; a module missing here (an optional extra) is skipped.
PRELOAD = ["torch", "transformers", "accelerate", "safetensors.torch", "deepspeed",
           "transformers.models.llama.modeling_llama", "diffusers.models.unets.unet_2d_condition",
           "preftune.cli", "preftune.train.loop", "preftune.diffusion.train"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# The environment the session started with: the server imports under it, whichever test
# happens to start it (a test's monkeypatched variables would otherwise reach every later
# command through the values libraries read once, on import).
SESSION_ENVIRONMENT = dict(os.environ)


def _forkserver():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    now = dict(os.environ)
    os.environ.clear()
    os.environ.update(SESSION_ENVIRONMENT)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(now)
    return context


def _python(argv: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    """The body of ``python ARGV`` in a forked process: its exit code is the command's."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for path, fd in ((out, 1), (err, 2)):
        with open(path, "w") as file:
            os.dup2(file.fileno(), fd)
    if "OMP_NUM_THREADS" in env:  # OpenMP was loaded with the server's environment
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        runpy.run_path(argv[0], run_name="__main__")


def run_python(argv: list[str], env: dict | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """``python ARGV`` (``-m MODULE ...`` or ``SCRIPT ...``) in one forked process, with
    ``env`` on top of this one's; as ``subprocess.run(..., capture_output=True, text=True)``
    returns it. Not for a command whose libraries read the environment when imported (the
    Hugging Face cache variables, for one): those were imported with the server's."""
    return _run(argv, [{**os.environ, **(env or {})}], timeout)


def run_on_two_processes(argv: list[str], env: dict | None = None,
                         timeout: float = 600) -> subprocess.CompletedProcess:
    """``python ARGV`` as ranks 0 and 1 of one process group; the result has the first failing
    exit code (0 if both succeed) and rank 0's output followed by rank 1's. When one rank fails
    the other is stopped, as the launcher would, rather than left waiting for its peer."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **(env or {}),
           "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    return _run(argv, [{**env, "RANK": str(r), "LOCAL_RANK": str(r)} for r in (0, 1)], timeout)


def _run(argv: list[str], envs: list[dict], timeout: float) -> subprocess.CompletedProcess:
    """One forked process per environment in ``envs``, all stopped as soon as one fails."""
    context = _forkserver()
    with tempfile.TemporaryDirectory() as logs:
        files = [(f"{logs}/out{r}", f"{logs}/err{r}") for r in range(len(envs))]
        processes = [context.Process(target=_python, args=(argv, env, os.getcwd(), *pair))
                     for env, pair in zip(envs, files)]
        for process in processes:
            process.start()
        deadline, code = time.monotonic() + timeout, 0
        while any(process.exitcode is None for process in processes):
            failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                code = failed[0] if failed else -9
                for process in processes:
                    process.kill()
                break
            time.sleep(0.05)
        for process in processes:
            process.join()
        code = code or next((p.exitcode for p in processes if p.exitcode), 0)
        texts = [[open(path).read() for path in pair] for pair in files]
    return subprocess.CompletedProcess(argv, code, "".join(out for out, _ in texts),
                                       "".join(err for _, err in texts))
