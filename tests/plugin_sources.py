"""Source text of user workloads that tests write to temporary files."""

GOOD = '''
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from workloads import TensorSource, Workload, register_workload


@register_workload("{name}")
class TinyReg(Workload):
    """Linear regression on fixed random data."""

    width: int = Field(16, ge=1, description="hidden width")

    def blocks(self):
        return [nn.Sequential(nn.Linear(4, self.width), nn.ReLU()), nn.Linear(self.width, 1)]

    def source(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 4, generator=g)
        return TensorSource(x, x.sum(1, keepdim=True))

    def loss(self, out, batch):
        return F.mse_loss(out, batch[1])
'''

NOT_A_WORKLOAD = "class Thing:\n    pass\n"

MISSING_METHODS = '''
from workloads import Workload


class Half(Workload):
    def blocks(self):
        return []
'''

BROKEN = "def oops(:\n"

DUPLICATE = '''
from workloads import Workload, register_workload


@register_workload("gpt-tiny")
class Impostor(Workload):
    def blocks(self): ...
    def source(self): ...
    def loss(self, out, batch): ...
'''

FAILS_AT_STEP_3 = GOOD + '''

class FailsAtStep3(TinyReg):
    """Raises in its loss on the third step of rank 1."""

    def loss(self, out, batch):
        import torch.distributed as dist

        self.__dict__.setdefault("_calls", [0])[0] += 1
        if self.__dict__["_calls"][0] == 3 and dist.get_rank() == 1:
            raise RuntimeError("injected failure in loss")
        return super().loss(out, batch)
'''
