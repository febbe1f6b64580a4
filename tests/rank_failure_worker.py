"""A 2-rank gloo job in which rank 1 fails mid-run (``MODE``: ``die`` = os._exit, ``raise`` = an
uncaught exception); rank 0 is inside a collective then and must stop promptly, naming rank 1."""
import os
import sys
import time

import torch
import torch.distributed as dist

import sketchattr.distributed as sad

mode = sys.argv[1]
dist.init_process_group("gloo")
c = sad.get_collective(stale_after=2.0, on_failure="exit")
c.activity("featurize: batch 3 of 10")
c.sum(torch.ones(2))
if c.rank == 1:
    time.sleep(0.5)
    if mode == "die":
        os._exit(9)
    raise ValueError("out of memory in batch 4 (simulated)")
c.activity("fit: all-reduce of F")
c.sum(torch.ones(2))  # rank 1 never arrives
print("rank 0 finished?!", flush=True)
