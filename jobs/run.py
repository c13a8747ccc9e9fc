"""Entry point for ``ray job submit``: the same CLI, connected to the cluster that runs the job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/run.py run jobs/configs/cluster.yaml data.paths=[/mnt/shared/sft/] output=/mnt/shared/run-002

Paths are local to every node: a shared file system (NFS, EFS, Lustre, or object storage mounted
with s3fs/gcsfuse), or file:// URLs of one.

Any ``grads-ray`` command line works after ``jobs/run.py`` (``run CONFIG``, ``score --model ...``);
a first argument ending in .yaml means ``run``. Inside a submitted job RAY_ADDRESS is set, so the
job joins the cluster instead of starting a local one.
"""

from __future__ import annotations

import sys
from pathlib import Path

# torch before ray and pyarrow: seen on a two-node cluster on one machine (Ray 2.60, torch 2.13 CPU),
# a job driver that loaded libtorch after `ray.init` died in oneMKL's start-up ("Cannot load
# libtorch_cpu.so"); loaded first, it works.
import torch  # noqa: E402, F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir

from grads_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0].endswith((".yaml", ".yml")):
        args = ["run", *args]
    sys.exit(main(args))
