"""ddp: torch DistributedDataParallel, its all-reduce routed through cluster.Comm."""
from __future__ import annotations

import inspect

from pydantic import BaseModel, ConfigDict, Field
from torch.nn.parallel import DistributedDataParallel

from cluster import Comm
from strategies.batchnorm import convert_sync_batchnorm, has_batchnorm
from strategies.registry import register_strategy
from strategies.single import Replicated


class DDPOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bucket_mb: float = Field(25.0, gt=0, description="gradient bucket size in MiB (DDP bucket_cap_mb)")
    static_graph: bool = Field(False, description="tell DDP the graph never changes (enables some optimisations)")
    sync_bn: bool = Field(
        True, description="batch norm over the global batch (matches single); false: per-rank statistics, "
        "running stats broadcast from rank 0 (torch DDP's default)"
    )


# torch >= 2.12 renamed DDP's per-forward buffer broadcast.
_BUFFER_SYNC_ARG = ("forward_sync_buffers" if "forward_sync_buffers" in
                    inspect.signature(DistributedDataParallel.__init__).parameters else "broadcast_buffers")


def allreduce_mean_hook(comm: Comm, bucket):  # DDP rejects a string annotation on `bucket`
    """DDP's default averaging all-reduce, through our accounting layer."""
    return comm.all_reduce_async(bucket.buffer().div_(comm.world))


@register_strategy("ddp")
class DDP(Replicated):
    """Data parallel: a replica per rank, gradients all-reduced in buckets overlapped with backward."""

    Options = DDPOptions

    def wrap(self, module):
        ctx = self.ctx
        sync_bn = self.options.sync_bn and has_batchnorm(module)
        if sync_bn:
            convert_sync_batchnorm(module, ctx.comm)
        # DDP broadcasts rank 0's parameters and buffers at construction: replicas start
        # equal. With synchronized batch norm the running stats stay equal without the
        # per-step buffer broadcast.
        ddp = DistributedDataParallel(
            module,
            device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            bucket_cap_mb=self.options.bucket_mb,
            static_graph=self.options.static_graph,
            **{_BUFFER_SYNC_ARG: not sync_bn},
        )
        self.register_hook(ddp)
        return ddp

    def register_hook(self, ddp: DistributedDataParallel) -> None:
        """How DDP's buckets are combined: the mean all-reduce (compression overrides it)."""
        ddp.register_comm_hook(self.ctx.comm, allreduce_mean_hook)

    def no_sync(self):
        return self.model.no_sync()

    def after_backward(self, t_backward: float) -> None:
        # DDP's backward returns only once every bucket is reduced, so the time
        # since the last bucket was launched is communication no compute hid.
        self.ctx.comm.close_launched(t_backward)
