"""Two processes (torch.distributed.run, gloo on CPU, through accelerate) train exactly like one
process with the same global batch: each process takes its share of every step's examples."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from test_train_loop import final_weights, losses, run, workspace  # noqa: F401

from preftune.train.logging import read_metrics


@pytest.mark.parametrize("layout", ["padded", "prefix_shared"])
def test_two_processes_equal_one_with_the_same_global_batch(workspace, tmp_path, layout):  # noqa: F811
    one = run(workspace, f"one-process-{layout}", train__batch_size=8, train__max_steps=3,
              train__layout=layout)  # dpo: a precomputed reference
    tree = yaml.safe_load((one / "config.yaml").read_text())
    tree["output_dir"] = str(workspace / "runs" / f"two-processes-{layout}")
    tree["train"]["batch_size"] = 4  # per process: 2 x 4 = the same 8 examples a step
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tree))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "-m", "preftune", "train", str(config)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = workspace / "runs" / f"two-processes-{layout}"
    assert [r["step"] for r in read_metrics(two / "metrics.jsonl")] == [1, 2, 3]  # logged once
    assert losses(two) == pytest.approx(losses(one), rel=1e-6)
    assert json.loads((two / "run.json").read_text())["processes"] == 2
    ours, theirs = final_weights(two), final_weights(one)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6, msg=name)
