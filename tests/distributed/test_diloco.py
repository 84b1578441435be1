"""DiLoCo's outer step against references written here.

Two ranks (``run_ranks``, one launch for every check) start from the same
tensors and take hand-made inner updates, so every rank can compute the
expected outer step without communicating:

- every=1, lr=1, momentum=0 is plain parameter averaging after every step;
- every=2, lr=0.7, Nesterov momentum 0.9: after each outer step the tensors
  equal torch.optim.SGD(nesterov=True) applied to the global copy with the
  ranks' mean (global - current) as its gradient (and the same without
  Nesterov); nothing moves or is sent on the steps between;
- the bytes Comm counts for an outer step: one ring all-reduce of the fp32
  deltas.

One process: checkpoints (``state``/``load_state``) resume the same
trajectory; bad arguments and bad states are one line.
"""
import pytest
import torch

from cluster import Comm, ring_allreduce_bytes
from strategies.decentralized.diloco import DiLoCo
from tests.ranks import run_ranks

SHAPES = [(4, 3), (5,)]
N = sum(torch.Size(s).numel() for s in SHAPES)


def _start() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _inner_update(rank: int, step: int) -> list[torch.Tensor]:
    """Rank ``rank``'s made-up change at inner step ``step``: any rank can compute any rank's."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [0.1 * torch.randn(s, generator=g) for s in SHAPES]


def _train(rank: int, world: int, diloco: DiLoCo, steps: int, comm: Comm) -> list[dict]:
    """Inner steps of made-up updates, each followed by ``after_step``; per step the
    tensors, whether an outer step ran and the bytes sent."""
    out = []
    for step in range(1, steps + 1):
        for t, u in zip(diloco.tensors, _inner_update(rank, step)):
            t.sub_(u)
        comm.take_stats()
        ran = diloco.after_step(step)
        out.append({"tensors": [t.clone() for t in diloco.tensors], "ran": ran, "sent": comm.take_stats().bytes_sent})
    return out


def diloco_ranks(rank: int, world: int) -> dict:
    comm = Comm()
    runs = {"average": DiLoCo(_start(), comm, every=1, lr=1.0, momentum=0.0),
            "nesterov": DiLoCo(_start(), comm, every=2, lr=0.7, momentum=0.9, nesterov=True),
            "momentum": DiLoCo(_start(), comm, every=2, lr=0.7, momentum=0.9, nesterov=False)}
    return {name: _train(rank, world, d, 6, comm) for name, d in runs.items()}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(diloco_ranks, 2, tmp_path_factory.mktemp("diloco"))


def test_every_step_with_lr_1_and_no_momentum_is_parameter_averaging(two_ranks):
    x = [_start(), _start()]  # each rank's tensors, plainly averaged after every step
    for i, step in enumerate(range(1, 7)):
        for r in range(2):
            x[r] = [t - u for t, u in zip(x[r], _inner_update(r, step))]
        x[0] = x[1] = [(a + b) / 2 for a, b in zip(*x)]
        for r in range(2):
            row = two_ranks[r]["average"][i]
            assert row["ran"]
            for got, want in zip(row["tensors"], x[r]):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("run, nesterov", [("nesterov", True), ("momentum", False)])
def test_outer_step_is_torch_sgd_on_the_mean_outer_gradient(two_ranks, run, nesterov):
    global_params = [torch.nn.Parameter(t) for t in _start()]
    opt = torch.optim.SGD(global_params, lr=0.7, momentum=0.9, nesterov=nesterov)
    current = [_start(), _start()]
    for i, step in enumerate(range(1, 7)):
        for r in range(2):
            current[r] = [t - u for t, u in zip(current[r], _inner_update(r, step))]
        if step % 2 == 0:  # the outer step: gradient = mean over ranks of (global - current)
            for p, a, b in zip(global_params, *current):
                p.grad = ((p.detach() - a) + (p.detach() - b)) / 2
            opt.step()
            current = [[p.detach().clone() for p in global_params] for _ in range(2)]
        for r in range(2):
            row = two_ranks[r][run][i]
            assert row["ran"] == (step % 2 == 0)
            assert row["sent"] == (ring_allreduce_bytes(4 * N, 2) if step % 2 == 0 else 0)
            for got, want in zip(row["tensors"], current[r]):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(two_ranks[0]["nesterov"][-1]["tensors"][0], two_ranks[0]["momentum"][-1]["tensors"][0])


# -- one process -------------------------------------------------------------------------------------

def test_state_round_trip_resumes_the_same_trajectory():
    comm = Comm()
    a = DiLoCo(_start(), comm, every=2, lr=0.7, momentum=0.9)
    _train(0, 1, a, 4, comm)  # two outer steps: global copies and momentum both moved
    saved = {k: v.clone() for k, v in a.state().items()}
    b = DiLoCo([t.clone() for t in a.tensors], comm, every=2, lr=0.7, momentum=0.9)
    b.load_state(saved)
    assert all(torch.equal(b.state()[k], v) for k, v in saved.items())
    for step in (5, 6):
        for d in (a, b):
            for t, u in zip(d.tensors, _inner_update(0, step)):
                t.sub_(u)
            d.after_step(step)
    assert all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors))
    assert a.bytes_per_outer_step == 0  # one rank: nothing to send


def test_reset_takes_the_tensors_as_they_are_now():
    """After parameters are loaded from a checkpoint without DiLoCo state, the next outer
    step must start from them, not pull them back to the stale global copies."""
    comm = Comm()
    d = DiLoCo(_start(), comm, every=1, lr=0.7, momentum=0.9)
    _train(0, 1, d, 2, comm)  # momentum is not zero now
    loaded = [torch.full(s, 3.0) for s in SHAPES]
    for t, x in zip(d.tensors, loaded):
        t.copy_(x)
    d.reset()
    assert all(torch.equal(g, x) for g, x in zip(d.global_params, loaded))
    assert all(not b.any() for b in d.momentum_buffers)
    d.after_step(3)  # no inner change since: the outer step moves nothing
    assert all(torch.equal(t, x) for t, x in zip(d.tensors, loaded))


def test_bf16_tensors_keep_fp32_global_copies():
    x = [torch.ones(3, dtype=torch.bfloat16)]
    d = DiLoCo(x, Comm(), every=1, lr=0.25, momentum=0.0)
    x[0].sub_(2**-7)  # exact in bf16
    d.after_step(1)
    assert d.global_params[0].dtype == torch.float32 and x[0].dtype == torch.bfloat16
    assert d.state_bytes == 2 * 3 * 4  # global copy and momentum, fp32 whatever the tensors' dtype
    assert torch.equal(d.global_params[0], torch.full((3,), 1 - 2**-9))  # exact in fp32, between two bf16 values
    assert torch.equal(x[0], d.global_params[0].to(torch.bfloat16)) and not torch.equal(x[0].float(), d.global_params[0])


@pytest.mark.parametrize("kwargs, expected", [
    ({"every": 0}, "diloco every=0: must be an integer >= 1 (inner steps per outer step)"),
    ({"every": 2, "lr": 0.0}, "diloco lr=0.0: must be > 0"),
    ({"every": 2, "momentum": 1.0}, "diloco momentum=1.0: must lie in [0, 1)"),
])
def test_bad_arguments_one_line(kwargs, expected):
    with pytest.raises(ValueError) as e:
        DiLoCo(_start(), Comm(), **kwargs)
    assert str(e.value) == expected


def test_bad_state_one_line():
    d = DiLoCo(_start(), Comm(), every=1)
    with pytest.raises(ValueError) as e:
        d.load_state({k: v for k, v in d.state().items() if k != "momentum.1"})
    assert str(e.value) == "diloco state: keys ['momentum.1'] differ (expected global.0..1 and momentum.0..1)"
    with pytest.raises(ValueError) as e:
        d.load_state({**d.state(), "global.0": torch.zeros(1)})
    assert str(e.value) == "diloco state global.0: shape (1,) != (4, 3)"
