"""Pipeline checkpoints in the format single, ddp and fsdp write (DCP).

A rank holds some blocks under their whole-model names (``3.attn.qkv.weight``),
so model and optimizer-state keys are the single-process ones: each rank
writes its own, data-parallel replicas write the same keys (DCP keeps one
copy), and any cut or world size — or a ddp/fsdp run — can load them. The
optimizer's ``param_groups`` name parameters; every rank writes the whole
model's lists (identical everywhere), and reads back only the hyperparameters.
"""
from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from strategies.checkpoint import _reader, _writer
from strategies.optim import param_groups
from workloads import Workload


def full_param_groups(workload: Workload, weight_decay: float) -> list[list[str]]:
    """Names of the whole model's parameters in each optimizer group, in the order
    ``build_optimizer`` puts them (what a single-process checkpoint records)."""
    with torch.random.fork_rng(), torch.device("meta"):
        model = workload.model()
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in param_groups(model, weight_decay)]


def _groups(groups: list[dict], names: list[list[str]]) -> list[dict]:
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": list(n)} for g, n in zip(groups, names)]


def save(url: str, module: nn.Module, opt: torch.optim.Optimizer, sched, full_groups: list[list[str]]) -> None:
    """Collective over every rank of the job."""
    model_sd, optim_sd = get_state_dict(module, opt)
    optim = {"state": optim_sd["state"], "param_groups": _groups(optim_sd["param_groups"], full_groups)}
    dcp.save({"model": model_sd, "optim": optim, "extra": {"sched": sched.state_dict()}},
             storage_writer=_writer(url))


def load(url: str, module: nn.Module, opt: torch.optim.Optimizer, sched, full_groups: list[list[str]]) -> None:
    """Collective: this rank's blocks, their optimizer state, the groups'
    hyperparameters and the LR schedule, from any DCP checkpoint of the model."""
    model_sd, optim_sd = get_state_dict(module, opt)
    mine = optim_sd["param_groups"]
    state = {"model": model_sd, "optim": {"state": optim_sd["state"], "param_groups": _groups(mine, full_groups)},
             "extra": {"sched": sched.state_dict()}}
    dcp.load(state, storage_reader=_reader(url))
    loaded = state["optim"]["param_groups"]
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": m["params"]} for g, m in zip(loaded, mine)]
    set_state_dict(module, opt, model_state_dict=state["model"],
                   optim_state_dict={"state": state["optim"]["state"], "param_groups": groups},
                   options=StateDictOptions(strict=True))
    sched.load_state_dict(state["extra"]["sched"])
