"""demo and gossip on gloo ranks, against references computed here.

Both run in one 4-rank launch (``four_ranks``).

- demo: parameters bit-identical across ranks; bytes per step equal
  (world - 1) x sum(blocks x k x (index bytes + value bytes)), computed here
  from the model's shapes; with compression switched off (chunk=1, topk=1, fp32
  values: every coefficient sent, the buffer empties each step) it is sign-SGD
  on the mean gradient, checked against a plain single-process loop. ``DeMo``
  on plain tensors with gradients handed over, over sub-groups of two (the
  outer sync's shape): each group bit-identical, bytes as the formula; and on
  FSDP2 shards (FSDP inside nodes of two, DeMo across them on ``p.to_local()``
  with ``p.grad.to_local()``) equal to DeMo of the whole parameters.
- gossip: each topology's round equals W @ (every rank's parameters) for the
  topology's matrix and preserves the average; complete equals the all-reduce
  average, through the all-reduce and through neighbour exchanges;
  one-peer-exp reaches exact (bit-identical) consensus after log2(n) rounds
  at 4 and 8 ranks with no updates; bytes, consensus distance, global
  averaging; ring (with and without overlap) and complete training against
  a single-process reference (``_gossip_reference``); checkpoints that
  resume bit-exactly; ``GossipMixer`` on plain tensors over sub-groups of two.
"""
import math

import pytest
import torch
import torch.distributed as dist

from cluster import Comm, all_gather_bytes, ring_allreduce_bytes
from strategies.base import OptimConfig, StrategyContext
from strategies.decentralized.demo import demo_bytes_per_step
from strategies.decentralized.flat import flatten, unflatten_into
from strategies.decentralized.topology import TOPOLOGIES, mixing_matrix, num_rounds, rank_round, topology_error
from strategies.optim import lr_factor
from tests.ranks import run_ranks

GPT = {"name": "gpt-tiny", "n_layers": 2, "d_model": 64, "seq_len": 64}  # every dim a multiple of 64
STEPS = 3


# orchestrator (pandas, pyarrow, ...) is imported only where a whole trainer is needed:
# spawned ranks import this module, and 8 of them share 2 cores.
def _spec(strategy: dict, workers: int, steps: int = STEPS, **kw):
    from orchestrator.config import JobSpec

    return JobSpec(workload=GPT, strategy=strategy, workers=workers, steps=steps, batch_size=8, seed=5, **kw)


def _trainer(strategy: dict, rank: int, world: int, **kw):
    from orchestrator.trainer import RankTrainer

    return RankTrainer(_spec(strategy, world, **kw), rank=rank, world=world, device=torch.device("cpu"))


def _params(trainer) -> list[torch.Tensor]:
    return [p for p in trainer.strategy.module.parameters() if p.requires_grad]


def _state(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.strategy.module.state_dict().items()}


def _gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's vector (the test's own collective, outside the code under test)."""
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return torch.stack(out)


def _held_out(state: dict) -> float:
    """single's held-out loss with ``state`` loaded (in this process)."""
    t = _trainer({"name": "single"}, 0, 1)
    t.strategy.module.load_state_dict(state)
    return t.evaluate()["val_loss"]


def _resume_is_exact(rank: int, world: int, strategy: dict, folder: str) -> bool:
    """Train 2 steps, checkpoint, train 1; a fresh trainer restored from the
    checkpoint trains the same step to the same bits."""
    from orchestrator.checkpoint import Checkpointer, restore

    a = _trainer(strategy, rank, world)
    a.train_step(), a.train_step()
    meta = {"format": type(a.strategy).checkpoint_format}
    url = Checkpointer(folder, every=2, keep=1, rank=rank, world=world, meta=meta).save(a)
    a.train_step()
    b = _trainer(strategy, rank, world)
    restore(b, url)
    b.train_step()
    sa, sb = _state(a), _state(b)
    return all(torch.equal(sa[k], sb[k]) for k in sa)


# -- demo --------------------------------------------------------------------------------------------

def demo_rank(rank: int, world: int, folder: str) -> dict:
    t = _trainer({"name": "demo"}, rank, world)
    rows = [t.train_step() for _ in range(STEPS)]
    off = _trainer({"name": "demo", "chunk": 1, "topk": 1, "value_dtype": "float32"}, rank, world)
    off_losses = [off.train_step()["loss"] for _ in range(STEPS)]
    # under a simulated network: set-up's broadcast goes through Comm before the first step
    _trainer({"name": "demo"}, rank, world, steps=1, scenario="internet-1g").train_step()
    return {"state": _state(t), "rows": rows, "off_state": _state(off), "off_losses": off_losses,
            "resume_exact": _resume_is_exact(rank, world, {"name": "demo"}, folder),
            "subgroup": demo_on_subgroup(rank, world), "fsdp": demo_on_fsdp_shards(rank, world)}


SUB_SHAPES, SUB_STEPS = [(64, 128), (64,)], 2


def demo_on_subgroup(rank: int, world: int) -> dict:
    """DeMo on plain tensors with gradients handed over (not a module's) over the
    sub-groups {0, 2} and {1, 3}: the outer sync's shape, one rank per node of two."""
    from strategies.decentralized.demo import DeMo

    comm = Comm()
    dp = comm.split([[0, 2], [1, 3]])
    start, own = torch.Generator().manual_seed(rank % 2), torch.Generator().manual_seed(300 + rank)
    x = [torch.randn(s, generator=start) for s in SUB_SHAPES]  # equal within a group, not across
    opt = DeMo(x, dp, topk=4, chunk=32, decay=0.9, value_dtype=torch.bfloat16, decays=[True, False])
    comm.take_stats()
    for _ in range(SUB_STEPS):
        opt.step(0.01, 0.1, grads=[torch.randn(s, generator=own) for s in SUB_SHAPES])
    return {"x": _gather(flatten(x)), "sent": comm.take_stats().bytes_sent}


def _demo_payload_bytes(shapes: list[torch.Size], topk: int = 32, chunk: int = 64, value_bytes: int = 2) -> int:
    """sum over parameters of blocks x k x (index bytes + value bytes), for shapes whose
    every dimension is a multiple of chunk: chunk x chunk blocks (int16 indices) for
    matrices, chunk-long blocks (uint8 indices) for vectors."""
    total = 0
    for s in shapes:
        assert all(d % chunk == 0 for d in s), s
        blocks, index_bytes = (math.prod(d // chunk for d in s), 2) if len(s) == 2 else (s[0] // chunk, 1)
        total += blocks * topk * (index_bytes + value_bytes)
    return total


def _sign_sgd_reference(steps: int, world: int) -> tuple[dict, list[float]]:
    """Sign-SGD on the mean of the ranks' gradients, each clipped to grad_clip by its
    own norm first (as DeMo's paper, where every rank clips its local gradient), with
    decoupled weight decay on matrices: what demo is when nothing is compressed."""
    from orchestrator.trainer import RankTrainer

    spec = _spec({"name": "demo"}, 1, steps)
    t = RankTrainer(spec, rank=0, world=1, device=torch.device("cpu"))  # same seed, model and global batches
    model, workload, losses = t.strategy.module, t.workload, []
    params = list(model.parameters())
    for s in range(steps):
        x, y = t.loader.next_batch()
        mean = [torch.zeros_like(p) for p in params]
        step_loss = 0.0
        for xs, ys in zip(x.chunk(world), y.chunk(world)):  # each rank's slice of the global batch
            model.zero_grad()
            loss = workload.loss(model(xs), (xs, ys))
            loss.backward()
            step_loss += loss.item() / world
            torch.nn.utils.clip_grad_norm_(params, spec.optim.grad_clip)
            for m, p in zip(mean, params):
                m.add_(p.grad, alpha=1 / world)
        losses.append(step_loss)
        lr = spec.optim.lr * lr_factor(s, spec.optim, steps)
        with torch.no_grad():
            for p, g in zip(params, mean):
                if p.dim() >= 2:
                    p.mul_(1 - lr * spec.optim.weight_decay)
                p.add_(g.sign(), alpha=-lr)
    return _state(t), losses


def _two_linears() -> torch.nn.Module:
    torch.manual_seed(0)  # every row count of a shard of two (16, 32) a multiple of chunk=16
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 32))


def demo_on_fsdp_shards(rank: int, world: int) -> dict:
    """The outer sync's real shape: FSDP2 inside each node of two ({0, 1}, {2, 3}),
    DeMo across nodes ({0, 2}, {1, 3}) on this rank's shards (``p.to_local()``) with
    their gradients (``p.grad.to_local()``). Returns the full parameters after the
    step and the (FSDP-averaged) full gradients this rank's node computed."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    from strategies.decentralized.demo import DeMo

    comm = Comm()
    node, dp = comm.split([[0, 1], [2, 3]]), comm.split([[0, 2], [1, 3]])
    model = _two_linears()
    fully_shard(model, mesh=DeviceMesh.from_group(node.group, "cpu"))
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(rank))
    model(x).square().mean().backward()
    params = list(model.parameters())
    opt = DeMo([p.to_local() for p in params], dp, topk=4, chunk=16, decay=0.9, value_dtype=torch.float32,
               decays=[p.dim() >= 2 for p in params])
    opt.step(0.01, 0.1, grads=[p.grad.to_local() for p in params])
    return {"params": [p.full_tensor() for p in params], "grads": [p.grad.full_tensor() for p in params]}


def _demo_whole_across_two_nodes(grads: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """The reference: DeMo of the whole parameters, one optimizer per node, the
    all-gather done by hand (node 0's payload first, as the group orders it)."""
    from strategies.decentralized.demo import DeMo

    nodes = [list(_two_linears().parameters()) for _ in grads]
    opts = [DeMo(ps, Comm(), topk=4, chunk=16, decay=0.9, value_dtype=torch.float32,
                 decays=[p.dim() >= 2 for p in ps]) for ps in nodes]
    gathered = torch.stack([o.compress(0.01, grads=g) for o, g in zip(opts, grads)])
    for o in opts:
        o.apply(gathered, 0.01, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(*nodes))
    return [p.detach() for p in nodes[0]]


# -- one 4-rank run for both strategies (spawning ranks is most of the cost on 2 cores) ----------------

WORLD = 4


def four_rank(rank: int, world: int, folder: str) -> dict:
    return {"demo": demo_rank(rank, world, f"{folder}/demo"), "gossip": gossip_rank(rank, world, f"{folder}/gossip")}


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("four-ranks")
    return run_ranks(four_rank, WORLD, tmp, str(tmp / "run"))


@pytest.mark.slow
def test_demo_ranks_identical_bytes_exact_and_uncompressed_is_sign_sgd(four_ranks):
    out = [r["demo"] for r in four_ranks]
    # bit-identical parameters on every rank, after steps that changed them
    for r in out[1:]:
        for k, v in out[0]["state"].items():
            assert torch.equal(v, r["state"][k]), k
    init = _trainer({"name": "demo"}, 0, 1).strategy.module.state_dict()
    assert all(not torch.equal(init[k], v) for k, v in out[0]["state"].items())
    # bytes: one all-gather of the packed (index, value) pairs per step
    shapes = [p.shape for p in _trainer({"name": "demo"}, 0, 1).strategy.module.parameters()]
    expected = all_gather_bytes(_demo_payload_bytes(shapes), WORLD)
    for r in out:
        for row in r["rows"]:
            assert (row["bytes_sent"], row["bytes_received"]) == (expected, expected)
    # uncompressed demo == sign-SGD on the mean of the clipped gradients. A sign can differ only where the
    # mean gradient is within float rounding of zero (summed in another order here).
    ref, ref_losses = _sign_sgd_reference(STEPS, WORLD)
    lr, n, differ = _spec({"name": "demo"}, 1).optim.lr, 0, 0
    for k, v in ref.items():
        got = out[0]["off_state"][k]
        assert all(torch.equal(got, r["off_state"][k]) for r in out[1:])
        torch.testing.assert_close(got, v, rtol=0, atol=2 * lr * STEPS)
        n, differ = n + v.numel(), differ + int((got != v).sum())
    assert differ <= 1e-3 * n, f"{differ} of {n} elements differ from sign-SGD"
    mean_losses = torch.tensor([r["off_losses"] for r in out]).mean(0)  # equal slices: the batch's mean
    torch.testing.assert_close(mean_losses, torch.tensor(ref_losses), rtol=1e-4, atol=1e-4)
    assert all(r["resume_exact"] for r in out)
    # on a sub-group, plain tensors: each pair bit-identical, the pairs apart, bytes as the formula
    x = out[0]["subgroup"]["x"]
    assert torch.equal(x[0], x[2]) and torch.equal(x[1], x[3]) and not torch.allclose(x[0], x[1])
    per_step = all_gather_bytes(_demo_payload_bytes(SUB_SHAPES, topk=4, chunk=32), 2)
    assert demo_bytes_per_step(SUB_SHAPES, 4, 32, torch.bfloat16, 2) == per_step
    assert all(r["subgroup"]["sent"] == SUB_STEPS * per_step for r in out)
    # on FSDP2 shards: DeMo per shard, across nodes, is DeMo of the whole parameters
    expected = _demo_whole_across_two_nodes([out[0]["fsdp"]["grads"], out[2]["fsdp"]["grads"]])
    for r in out:
        for got, want in zip(r["fsdp"]["params"], expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


# -- gossip: topologies as data (no processes) -------------------------------------------------------

@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_mixing_matrices_are_doubly_stochastic_and_connected(topology):
    for n in range(1, 17):
        if topology_error(topology, n):
            continue
        rounds = [mixing_matrix(topology, n, i) for i in range(num_rounds(topology, n))]
        product = torch.eye(n, dtype=torch.float64)
        for w in rounds:
            assert (w >= 0).all()
            torch.testing.assert_close(w.sum(0), torch.ones(n, dtype=torch.float64))
            torch.testing.assert_close(w.sum(1), torch.ones(n, dtype=torch.float64))
            product = w @ product
        if n > 1:  # information spreads: every mode but the average shrinks over one cycle of rounds
            assert torch.linalg.matrix_norm(product - 1.0 / n, ord=2) < 1 - 1e-9


def test_one_peer_exp_rounds_multiply_to_the_exact_average():
    for n in (2, 4, 8, 16, 32):
        product = torch.eye(n, dtype=torch.float64)
        for i in range(num_rounds("one-peer-exp", n)):
            product = mixing_matrix("one-peer-exp", n, i) @ product
        assert torch.equal(product, torch.full((n, n), 1.0 / n, dtype=torch.float64))  # exact, not close


# -- gossip on 4 ranks -------------------------------------------------------------------------------

def _gossip(rank: int, world: int, **options):
    """A gossip strategy alone (no loader, no orchestrator): what the mixing checks need."""
    from strategies.decentralized.gossip import Gossip, GossipOptions
    from workloads import WORKLOADS

    workload = WORKLOADS.get(GPT["name"])(**{k: v for k, v in GPT.items() if k != "name"})
    strategy = Gossip(GossipOptions(**options))
    torch.manual_seed(5)
    strategy.setup(workload, StrategyContext(rank=rank, world=world, device=torch.device("cpu"), comm=Comm(),
                                             optim=OptimConfig(), total_steps=STEPS))
    return strategy


def _scrambled(strategy, rank: int) -> list[torch.Tensor]:
    """Different parameters on every rank; returns them."""
    g = torch.Generator().manual_seed(100 + rank)
    params = [p for p in strategy.module.parameters() if p.requires_grad]
    unflatten_into(torch.randn(sum(p.numel() for p in params), generator=g), params)
    return params


def _rounds(strategy, rank: int, rounds: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's parameters before and after ``rounds`` rounds of mixing and nothing else."""
    params = _scrambled(strategy, rank)
    before = _gather(flatten(params))
    for i in range(rounds):
        strategy.mixer.round(i)
    return before, _gather(flatten(params))


def gossip_rank(rank: int, world: int, folder: str) -> dict:
    ring = _gossip(rank, world, topology="ring")
    out: dict = {"rounds": {t: _rounds(ring if t == "ring" else _gossip(rank, world, topology=t), rank)
                            for t in TOPOLOGIES}}
    out["consensus_measured"] = ring.consensus()  # of the ring round's result, gathered above
    # complete through neighbour exchanges (the generic path) instead of the all-reduce
    g = _gossip(rank, world, topology="complete")
    g.mixer.all_reduce_complete = False
    g.mixer.rounds = [rank_round(mixing_matrix("complete", world), rank)]
    out["complete_by_exchange"] = _rounds(g, rank)
    out["consensus"] = _rounds(_gossip(rank, world, topology="one-peer-exp"), rank, int(math.log2(world)))
    # training steps: bytes, consensus distance, overlap, global averaging
    out["train"] = {}
    for name, opts in {"ring": {}, "ring-overlap": {"overlap": True}, "complete": {"topology": "complete"},
                       "global": {"topology": "one-peer-exp", "global_every": 3, "consensus_every": 3}}.items():
        t = _trainer({"name": "gossip", "consensus_every": 2, **opts}, rank, world)
        rows = [t.train_step() for _ in range(STEPS)]
        out["train"][name] = {"rows": rows, "final": _gather(flatten(_params(t)))}
        if name == "ring":  # replicas differ: evaluated on their average, with their spread
            out["train"][name].update(eval=t.evaluate(), state=_state(t))
    out["resume_exact"] = _resume_is_exact(rank, world, {"name": "gossip", "overlap": True}, folder)
    out["subgroup"] = mixer_on_subgroup(rank, world)
    return out


def mixer_on_subgroup(rank: int, world: int) -> dict:
    """GossipMixer on plain tensors (not a module's) over the sub-groups {0, 2} and {1, 3}:
    the outer sync's shape, one rank per node of two."""
    from strategies.decentralized.mixing import GossipMixer

    comm = Comm()
    dp = comm.split([[0, 2], [1, 3]])
    g = torch.Generator().manual_seed(200 + rank)
    tensors = [torch.randn(4, 3, generator=g), torch.randn(7, generator=g)]
    before = _gather(flatten(tensors))
    comm.take_stats()
    mixer = GossipMixer(tensors, dp, topology="ring")
    mixer.round(0)
    sent = comm.take_stats().bytes_sent
    return {"before": before, "after": _gather(flatten(tensors)), "sent": sent, "consensus": mixer.consensus()}


@pytest.mark.slow
def test_gossip_on_4_ranks(four_ranks):
    world = WORLD
    out = four_ranks[0]["gossip"]  # every rank gathered the same
    for topology, (before, after) in out["rounds"].items():
        w = mixing_matrix(topology, world).to(before.dtype)
        torch.testing.assert_close(after, w @ before, rtol=1e-5, atol=1e-6, msg=topology)
        torch.testing.assert_close(after.mean(0), before.mean(0), rtol=0, atol=1e-6, msg=topology)  # average kept
        assert not torch.allclose(after, before)
    before, after = out["rounds"]["complete"]
    for r in range(world):
        torch.testing.assert_close(after[r], before.mean(0), rtol=0, atol=1e-6)  # the all-reduce average
        torch.testing.assert_close(out["complete_by_exchange"][1][r], after[r], rtol=0, atol=1e-6)
    after = out["rounds"]["ring"][1]
    expected = float((after.double() - after.double().mean(0)).square().sum()) / world
    assert out["consensus_measured"]["consensus_distance"] == pytest.approx(expected, rel=1e-6)
    start, end = out["consensus"]
    assert all(torch.equal(end[r], end[0]) for r in range(world)), "consensus is bit-identical"
    torch.testing.assert_close(end[0], start.mean(0), rtol=0, atol=1e-6)

    param_bytes = start.shape[1] * 4
    ring, overlap, glob = (out["train"][k] for k in ("ring", "ring-overlap", "global"))
    consensus_bytes = ring_allreduce_bytes(param_bytes, world) + ring_allreduce_bytes(8, world)
    for i, row in enumerate(ring["rows"], start=1):
        extra = consensus_bytes if i % 2 == 0 else 0
        assert (row["bytes_sent"], row["bytes_received"]) == (2 * param_bytes + extra,) * 2  # two neighbours
        assert ("consensus_distance" in row) == (i % 2 == 0)
    assert ring["rows"][1]["consensus_distance"] > 0 and ring["rows"][1]["consensus_bytes"] == consensus_bytes
    assert overlap["rows"][0]["bytes_sent"] == 2 * param_bytes
    # overlap mixes a step older parameters: a different trajectory from the same start
    assert not torch.equal(overlap["final"], ring["final"])
    final = glob["final"]  # global average after step 3: every rank equal
    assert all(torch.equal(final[r], final[0]) for r in range(world))
    assert glob["rows"][2]["consensus_distance"] == 0.0
    assert glob["rows"][0]["bytes_sent"] == param_bytes  # one peer per round
    complete = out["train"]["complete"]
    assert complete["rows"][0]["bytes_sent"] == ring_allreduce_bytes(param_bytes, world)
    assert all(torch.equal(complete["final"][r], complete["final"][0]) for r in range(world))
    # Every rank's own AdamW step and the mixing, against the same in one process. Tolerance:
    # sums in another order (the all-reduce, the weighted neighbour sum): a few ulp per step.
    torch.testing.assert_close(complete["final"], _gossip_reference("complete", world, overlap=False),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ring["final"], _gossip_reference("ring", world, overlap=False), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(overlap["final"], _gossip_reference("ring", world, overlap=True), rtol=1e-5, atol=1e-7)
    assert out["resume_exact"]
    # held-out: the loss of the replicas' average, and the range of their own losses
    states = [rank_out["gossip"]["train"]["ring"]["state"] for rank_out in four_ranks]
    own = [_held_out(s) for s in states]
    mean = _held_out({k: sum(s[k] for s in states) / world for k in states[0]})
    for rank_out in four_ranks:
        got = rank_out["gossip"]["train"]["ring"]["eval"]
        assert got["val_loss"] == pytest.approx(mean, rel=1e-5)
        assert got["val_spread"] == pytest.approx(max(own) - min(own), rel=1e-3, abs=1e-7)
    assert max(own) > min(own)
    for r, rank_out in enumerate(four_ranks):  # the mixer over a sub-group: each pair averages, one send each
        sub = rank_out["gossip"]["subgroup"]
        torch.testing.assert_close(sub["after"][r], (sub["before"][r] + sub["before"][r ^ 2]) / 2, rtol=0, atol=1e-6)
        assert sub["sent"] == 19 * 4 and sub["consensus"]["consensus_distance"] == 0.0


def _gossip_reference(topology: str, world: int, *, overlap: bool) -> torch.Tensor:
    """gossip in one process: ``world`` replicas from one initialisation, each with its
    own AdamW on its own slice of every global batch, mixed with W after every step:
    x_i <- sum_j W_ij x_j (stepped), or with ``overlap`` (D-PSGD) x_i <- sum_j W_ij s_j + u_i
    where s are the parameters the step started from and u_i = x_i - s_i its own update.
    Returns every replica's final parameters (world, n). With ``complete`` this is not
    ddp: AdamW's update is not linear in the gradient, so averaging updates differs
    from updating on the mean gradient."""
    from strategies.optim import build_optimizer, clip_and_step
    from workloads import ShardedLoader

    spec = _spec({"name": "gossip", "topology": topology}, world)
    workload, w = spec.build_workload(), mixing_matrix(topology, world).float()
    replicas = []
    for r in range(world):
        torch.manual_seed(spec.seed)
        model = workload.model()
        replicas.append((model, *build_optimizer(model, spec.optim, spec.steps),
                         ShardedLoader(workload.train_source(), rank=r, world=world, global_batch=spec.global_batch,
                                       seed=spec.seed)))
    params = lambda: torch.stack([flatten(list(m.parameters())) for m, *_ in replicas])  # noqa: E731
    for _ in range(spec.steps):
        start = params()
        for model, opt, sched, loader in replicas:
            batch = loader.next_batch()
            workload.loss(model(batch[0]), batch).backward()
            clip_and_step(model, opt, sched, spec.optim)
        stepped = params()
        mixed = w @ start + (stepped - start) if overlap else w @ stepped
        for (model, *_), x in zip(replicas, mixed):
            unflatten_into(x, list(model.parameters()))
    return params()


def consensus_rank(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _rounds(_gossip(rank, world, topology="one-peer-exp"), rank, int(math.log2(world)))


def test_one_peer_exp_exact_consensus_on_8_ranks(tmp_path):
    start, end = run_ranks(consensus_rank, 8, tmp_path)[0]
    assert all(torch.equal(end[r], end[0]) for r in range(8))
    torch.testing.assert_close(end[0], start.mean(0), rtol=0, atol=1e-6)
    assert not torch.allclose(start[0], start.mean(0))
