"""Two CPU processes of one command, started as ``torch.distributed.run --nproc_per_node 2``
starts its workers (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set, gloo through
accelerate) but without the launcher's own process, which costs about 4 s of every test here
(it imports torch again and runs an agent). The multi-machine launch and its errors are tested
through torch.distributed.run itself (test_distributed.py)."""

import os
import socket
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_on_two_processes(argv: list[str], env: dict | None = None,
                         timeout: float = 600) -> subprocess.CompletedProcess:
    """``python ARGV`` as ranks 0 and 1 of one process group; the result has the first failing
    exit code (0 if both succeed) and rank 0's output followed by rank 1's. When one rank fails
    the other is stopped, as the launcher would, rather than left waiting for its peer."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **(env or {}),
           "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    with tempfile.TemporaryDirectory() as logs:
        files = [(open(f"{logs}/out{r}", "w+"), open(f"{logs}/err{r}", "w+")) for r in (0, 1)]
        ranks = [subprocess.Popen([sys.executable, *argv], stdout=out, stderr=err, text=True,
                                  env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
                 for r, (out, err) in enumerate(files)]
        deadline, code = time.monotonic() + timeout, 0
        while any(rank.poll() is None for rank in ranks):
            failed = [rank.returncode for rank in ranks if rank.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                code = failed[0] if failed else -9
                for rank in ranks:
                    rank.kill()
                break
            time.sleep(0.05)
        for rank in ranks:
            rank.wait()
        code = code or next((rank.returncode for rank in ranks if rank.returncode), 0)
        texts = []
        for out, err in files:
            out.seek(0)
            err.seek(0)
            texts.append((out.read(), err.read()))
            out.close()
            err.close()
    return subprocess.CompletedProcess(argv, code, texts[0][0] + texts[1][0],
                                       texts[0][1] + texts[1][1])
