"""torch.distributed for training: process group from torchrun or from SageMaker's host list.

    torchrun --nproc_per_node 2 -m medpipe train --data DATA --out RUN        # one machine, 2 processes
    torchrun --nnodes 2 --node_rank R --nproc_per_node G --rdzv-endpoint HOST:29400 -m medpipe train ...

- Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* set), the group is formed from those.
- Started once per host by SageMaker without a distribution setting (SM_HOSTS lists several hosts
  and no WORLD_SIZE is set), the group is formed from SM_HOSTS / SM_CURRENT_HOST: world size = hosts,
  rank = index of the current host in the sorted list, master = the first host (MASTER_ADDR and
  MASTER_PORT override).
- NCCL on CUDA, gloo on CPU; a timeout (MEDPIPE_DIST_TIMEOUT_S, default 300 s) makes a stuck or
  failed rank end the job instead of hanging it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from medpipe.sagemaker.env import host_rank_env

log = logging.getLogger(__name__)
TIMEOUT_ENV = "MEDPIPE_DIST_TIMEOUT_S"


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather(self, obj):
        """Every rank's ``obj``, in rank order (all ranks get the list)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sync_buffers(self, model: torch.nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank. DDP broadcasts them at the
        start of each forward, so after the last step of an epoch each rank holds its own; validation and
        checkpoints must all use the same model."""
        if self.enabled:
            for b in model.buffers():
                dist.broadcast(b.data, src=0)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (e.g. SIGTERM reached one rank first)."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def sagemaker_env() -> None:
    """Fill RANK/WORLD_SIZE/MASTER_* from SM_HOSTS when SageMaker started one process per host."""

    env = host_rank_env()
    if env:
        os.environ.update(env)
        log.info("SageMaker multi-host: rank %s of %s (master %s)", env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"])


def init(device: torch.device) -> Dist:
    sagemaker_env()
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world < 2:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "300")))
        # torchrun keeps one store across restarts: namespace this round's keys, or a restarted worker
        # reads the dead round's peer addresses and cannot connect.
        store, rank, world = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"medpipe/round{restart}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return Dist(rank, world, local)


def params_digest(model: torch.nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for _, t in sorted(model.state_dict().items()):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
