"""DeMo's pieces in one process: the chunked DCT against scipy, the sparse
average, the optimizer's error-feedback and sign-step invariants, the payload
size, and bad options (plus gossip's topology checks) rejected on one line."""
import pytest
import scipy.fft as fft
import torch
from torch import nn

from cluster import Comm
from orchestrator.config import ConfigError, JobSpec
from strategies.decentralized.dct import ChunkedDCT, dct_matrix, index_dtype
from strategies.decentralized.demo import DeMo, demo_bytes_per_step
from strategies.optim import lr_factor

SHAPES = [(128, 192), (768,), (100, 37), (3, 4, 5, 5), (50257,), ()]


def test_dct_matrix_is_scipys_orthonormal_dct2():
    x = torch.randn(5, 48, dtype=torch.float64)
    d = dct_matrix(48, torch.float64)
    torch.testing.assert_close(x @ d.T, torch.from_numpy(fft.dct(x.numpy(), norm="ortho", axis=1)))
    torch.testing.assert_close(d @ d.T, torch.eye(48, dtype=torch.float64))


def test_blocks_are_2d_dcts_of_divisor_sized_chunks():
    plan = ChunkedDCT((100, 192), chunk=64, topk=32)
    assert (plan.r, plan.c, plan.blocks, plan.k) == (50, 64, 2 * 3, 32)  # 50 | 100, 64 | 192
    x = torch.randn(100, 192, dtype=torch.float64)
    coeffs = plan.encode(x)
    for b, (i, j) in enumerate([(i, j) for i in range(2) for j in range(3)]):
        block = x[50 * i:50 * (i + 1), 64 * j:64 * (j + 1)].numpy()
        torch.testing.assert_close(coeffs[b], torch.from_numpy(fft.dctn(block, norm="ortho")).flatten())


@pytest.mark.parametrize("shape", SHAPES)
def test_dct_round_trip(shape):
    plan = ChunkedDCT(shape, chunk=64, topk=32)
    x = torch.randn(shape)
    coeffs = plan.encode(x)
    assert coeffs.shape == (plan.blocks, plan.width)
    torch.testing.assert_close(plan.decode(coeffs), x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(coeffs.norm(), x.norm(), rtol=1e-5, atol=1e-5)  # orthonormal: norm kept


def test_prime_sizes_and_index_types():
    plan = ChunkedDCT((65537,), chunk=64, topk=32)  # prime: blocks of 1, every coefficient sent
    assert (plan.c, plan.k, plan.index_dtype) == (1, 1, torch.uint8)
    assert index_dtype(256) == torch.uint8 and index_dtype(257) == torch.int16
    assert index_dtype(64 * 64) == torch.int16 and index_dtype(2**15 + 1) == torch.int32


def test_sparse_mean_counts_only_the_ranks_that_sent_an_index():
    plan = ChunkedDCT((4,), chunk=4, topk=2)  # one block of 4 coefficients
    idx = torch.tensor([[[0, 1]], [[1, 3]]])  # (world=2, blocks=1, k=2)
    val = torch.tensor([[[2.0, 4.0]], [[6.0, -1.0]]])
    assert plan.mean_of(idx, val).tolist() == [[2.0, 5.0, 0.0, -1.0]]


def test_topk_keeps_the_largest_magnitudes_per_block():
    plan = ChunkedDCT((2, 4), chunk=4, topk=3)
    assert (plan.r, plan.c, plan.blocks) == (2, 4, 1)
    coeffs = torch.tensor([[0.1, -9.0, 3.0, 0.0, 2.0, -0.5, 7.0, 1.0]])
    idx, val = plan.topk_of(coeffs)
    assert sorted(idx[0].tolist()) == [1, 2, 6] and sorted(val[0].tolist()) == [-9.0, 3.0, 7.0]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 128), nn.LayerNorm(128), nn.Linear(128, 10))


def _set_grads(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16])
def test_buffer_plus_sent_is_decayed_buffer_plus_lr_grad(value_dtype):
    """Error feedback (reference convention m <- decay * m + lr * g): after a step the
    buffer plus what this rank sent (decoded) equals decay * buffer_before + lr * g."""
    model = _model()
    params = list(model.parameters())
    opt = DeMo(params, Comm(), topk=8, chunk=16, decay=0.9, value_dtype=value_dtype, decays=[False] * len(params))
    lr = 0.01
    for step in range(3):  # from step 2 on, the decayed buffer matters
        _set_grads(model, step)
        before = [opt.momentum_of(i) for i in range(len(params))]
        payload = opt.compress(lr)
        assert payload.dtype == torch.uint8 and payload.numel() == opt.payload_nbytes
        for i, (p, m0, plan, (idx, val)) in enumerate(zip(params, before, opt.plans, opt.unpack(payload[None]))):
            sent = plan.decode(plan.densify(idx[0], val[0]))
            torch.testing.assert_close(opt.momentum_of(i) + sent, 0.9 * m0 + lr * p.grad, rtol=1e-5, atol=1e-7)
            assert sent.abs().sum() > 0
        opt.apply(payload[None], lr, 0.0)


def test_every_update_element_is_exactly_plus_or_minus_lr():
    model = _model()
    params = list(model.parameters())
    opt = DeMo(params, Comm(), topk=32, chunk=64, decay=0.999, value_dtype=torch.bfloat16,
               decays=[p.dim() >= 2 for p in params])
    lr = 3e-3
    for step in range(2):
        _set_grads(model, 10 + step)
        before = [p.detach().clone() for p in params]
        opt.step(lr, weight_decay=0.0)
        moved = 0
        for p, x in zip(params, before):
            down, up, same = p == x - lr, p == x + lr, p == x
            assert bool((down | up | same).all()), "an element moved by something other than +-lr"
            moved += int((down | up).sum())
        assert moved > 0.9 * sum(p.numel() for p in params)  # the inverse DCT of the mean is dense


def test_weight_decay_is_decoupled_and_only_on_matrices():
    model = _model()
    params = list(model.parameters())
    opt = DeMo(params, Comm(), topk=4, chunk=8, decay=0.5, value_dtype=torch.float32,
               decays=[p.dim() >= 2 for p in params])
    _set_grads(model, 1)
    for p in params:
        p.grad.zero_()  # zero gradient and momentum: only weight decay moves anything
    before = [p.detach().clone() for p in params]
    opt.step(0.1, weight_decay=0.5)
    for p, x in zip(params, before):
        torch.testing.assert_close(p.detach(), x * (1 - 0.05) if p.dim() >= 2 else x, rtol=0, atol=0)


@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16])
def test_payload_is_sum_of_chunks_times_k_times_index_and_value_bytes(value_dtype):
    shapes = [(256, 768), (768,), (128, 256)]
    params = [nn.Parameter(torch.zeros(s)) for s in shapes]
    opt = DeMo(params, Comm(), topk=32, chunk=64, decay=0.999, value_dtype=value_dtype, decays=[True] * 3)
    v = value_dtype.itemsize
    # (256, 768): 4 x 12 blocks of 64 x 64 (int16 indices); (768,): 12 blocks of 64 (uint8); (128, 256): 2 x 4
    expected = 48 * 32 * (2 + v) + 12 * 32 * (1 + v) + 8 * 32 * (2 + v)
    assert opt.payload_nbytes == expected
    for p in params:
        p.grad = torch.ones_like(p)
    assert opt.compress(1e-3).numel() == expected


def test_demo_on_detached_tensors_with_given_grads_equals_demo_on_parameters():
    """The outer sync's use: tensors that alias the parameters (as ``p.to_local()`` does)
    and gradients handed over, not read from ``.grad``."""
    model, other = _model(), _model()
    params, plain = list(model.parameters()), [p.detach() for p in other.parameters()]
    kw = dict(topk=8, chunk=16, decay=0.9, value_dtype=torch.bfloat16, decays=[p.dim() >= 2 for p in params])
    a, b = DeMo(params, Comm(), **kw), DeMo(plain, Comm(), **kw)
    for step in range(3):
        _set_grads(model, step)
        a.step(0.01, 0.1)
        b.step(0.01, 0.1, grads=[p.grad for p in params])
        assert all(x.grad is None for x in plain)
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)
    assert all(torch.equal(m, n) for m, n in zip(a.momentum, b.momentum))


def test_demo_unpacks_values_at_any_byte_offset_on_one_rank():
    """One uint8 index then one fp32 value: the value starts at byte 1 of a 5-byte row."""
    x = torch.zeros(3)
    opt = DeMo([x], Comm(), topk=1, chunk=3, decay=0.0, value_dtype=torch.float32, decays=[False])
    assert opt.payload_nbytes == 5
    opt.step(0.5, 0.0, grads=[torch.tensor([1.0, 1.0, 1.0])])  # the DC coefficient alone: a constant
    assert torch.equal(x, torch.full((3,), -0.5))


def test_demo_of_row_shards_is_demo_of_the_whole_tensor_when_rows_are_a_multiple_of_chunk():
    """FSDP2 shards dim 0: with shard rows a multiple of chunk a shard's blocks are the
    whole tensor's, so DeMo per shard (each with its own peers) is DeMo of the whole."""
    g = torch.Generator().manual_seed(3)
    whole = [torch.randn(32, 24, generator=g), torch.randn(48, generator=g)]
    shards = [[t[:16].clone(), b[:24].clone()] for t, b in [whole]] + [[whole[0][16:].clone(), whole[1][24:].clone()]]
    kw = dict(topk=3, chunk=8, decay=0.9, value_dtype=torch.float32, decays=[True, False])
    opt, per_shard = DeMo(whole, Comm(), **kw), [DeMo(s, Comm(), **kw) for s in shards]
    for step in range(3):
        grads = [torch.randn(t.shape, generator=g) for t in whole]
        opt.step(0.01, 0.1, grads=grads)
        for i, d in enumerate(per_shard):
            d.step(0.01, 0.1, grads=[grads[0][16 * i:16 * (i + 1)], grads[1][24 * i:24 * (i + 1)]])
    for j, t in enumerate(whole):
        torch.testing.assert_close(torch.cat([s[j] for s in shards]), t, rtol=0, atol=1e-7)


@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16, "bfloat16"])
def test_demo_bytes_per_step_is_the_all_gather_of_the_payload(value_dtype):
    shapes = [(256, 768), (768,), (128, 256)]
    v = 4 if value_dtype == torch.float32 else 2
    payload = 48 * 32 * (2 + v) + 12 * 32 * (1 + v) + 8 * 32 * (2 + v)  # as in the payload test above
    assert demo_bytes_per_step(shapes, 32, 64, value_dtype, 4) == 3 * payload
    assert demo_bytes_per_step(shapes, 32, 64, value_dtype, 1) == 0


def test_gossip_at_one_worker_is_single_exactly(small_gpt):
    """No neighbours: the wrapper must leave the usual optimizer's trajectory alone."""
    from orchestrator.trainer import RankTrainer

    def losses(strategy):
        spec = JobSpec(workload=small_gpt, strategy=strategy, workers=1, steps=3, batch_size=4, seed=1)
        t = RankTrainer(spec, rank=0, world=1, device=torch.device("cpu"))
        out = [t.train_step()["loss"] for _ in range(3)]
        return out, t.strategy.module.state_dict()

    (lg, sg), (ls, ss) = losses({"name": "gossip", "consensus_every": 1}), losses("single")
    assert lg == ls
    for k in ss:
        assert torch.equal(sg[k], ss[k]), k


def test_gossip_keeps_its_old_import_path_and_registered_name():
    import strategies.gossip as old
    from strategies import STRATEGIES
    from strategies.decentralized.gossip import Gossip, GossipOptions

    assert (old.Gossip, old.GossipOptions) == (Gossip, GossipOptions)
    assert STRATEGIES.get("gossip") is Gossip and Gossip.checkpoint_format == "dcp-gossip"


def test_gossip_mixer_on_plain_tensors_of_one_rank():
    """Any tensors (not a module's parameters): alone, a round leaves them as they are."""
    from strategies.decentralized.mixing import GossipMixer

    tensors = [torch.randn(3, 4), torch.randn(5)]
    before = [t.clone() for t in tensors]
    mixer = GossipMixer(tensors, Comm(), topology="ring", overlap=True)
    m = mixer.launch(0)
    tensors[1].add_(1.0)  # a local update between launch and finish stays (overlap)
    mixer.finish(m)
    assert torch.equal(tensors[0], before[0]) and torch.equal(tensors[1], before[1] + 1.0)
    assert mixer.consensus()["consensus_distance"] == 0.0
    assert mixer.buffer_bytes() == 17 * 4  # the snapshot, no neighbour


def test_gossip_mixer_rejects_mixed_dtypes_on_one_line():
    from strategies.decentralized.mixing import GossipMixer

    with pytest.raises(ValueError) as e:
        GossipMixer([torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16)], Comm())
    assert str(e.value) == "gossip tensors: dtypes torch.bfloat16, torch.float32: must all share one dtype"


# -- bad input: one line, before any worker starts ------------------------------------------------

def _job(strategy: dict, workers: int = 4):
    return JobSpec(workload={"name": "gpt-tiny", "n_layers": 1, "d_model": 64}, strategy=strategy,
                   workers=workers, steps=2)


@pytest.mark.parametrize("options, expected", [
    ({"topk": 65}, "strategy.topk=65: must not exceed chunk=64"),
    ({"topk": 9, "chunk": 8}, "strategy.topk=9: must not exceed chunk=8"),
    ({"decay": 1.0}, "strategy.decay=1.0: must lie in [0, 1)"),
    ({"decay": -0.1}, "strategy.decay=-0.1: must lie in [0, 1)"),
    ({"chunk": 0}, "strategy.chunk=0: Input should be greater than or equal to 1"),
    ({"value_dtype": "int8"}, "strategy.value_dtype='int8'"),
])
def test_demo_bad_options_one_line(options, expected):
    with pytest.raises(ConfigError) as e:
        _job({"name": "demo", **options})
    assert expected in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)


@pytest.mark.parametrize("topology, workers, expected", [
    ("one-peer-exp", 6, "workers=6: topology 'one-peer-exp' needs a power-of-two number of workers"),
    ("one-peer-exp", 3, "workers=3: topology 'one-peer-exp' needs a power-of-two number of workers"),
    ("torus", 7, "workers=7: topology 'torus' needs workers = rows x cols with rows, cols >= 2"),
    ("torus", 2, "workers=2: topology 'torus' needs workers = rows x cols"),
])
def test_gossip_topology_needs_the_right_worker_count(topology, workers, expected):
    from strategies.decentralized.gossip import Gossip, GossipOptions

    workload = _job({"name": "ddp"}, 1).build_workload()
    with pytest.raises(ValueError) as e:
        Gossip.check_job(workers=workers, workload=workload, options=GossipOptions(topology=topology))
    assert expected in str(e.value) and len(str(e.value).splitlines()) == 1
    Gossip.check_job(workers=8 if topology == "one-peer-exp" else 6, workload=workload,
                     options=GossipOptions(topology=topology))  # a count that fits passes
    with pytest.raises(ConfigError) as e:
        _job({"name": "gossip", "topology": topology}, workers)
    assert expected in str(e.value) and len(str(e.value).splitlines()) == 1


def test_gossip_bad_option_one_line():
    with pytest.raises(ConfigError) as e:
        _job({"name": "gossip", "topology": "star"})
    msg = str(e.value)
    assert "strategy.topology='star'" in msg and "ring" in msg and len(msg.splitlines()) == 1


def _demo_reference_step(p: torch.Tensor, m: torch.Tensor, g: torch.Tensor, *, lr: float, wd: float,
                         decay: float, topk: int, chunk: int) -> None:
    """DeMo's update of one parameter written plainly (float64, scipy's DCT, one block
    at a time, the momentum held in parameter space as in the paper's Algorithm 1
    with the reference code's lr-scaled buffer), in place on ``p`` and ``m``."""
    import numpy as np
    from scipy.fft import dctn, idctn

    m.mul_(decay).add_(g.double(), alpha=lr)
    mat = m.view(1, -1) if m.dim() == 1 else m.view(m.shape[0], -1)
    rows, cols = mat.shape
    r = max(d for d in range(1, min(rows, chunk) + 1) if rows % d == 0)
    c = max(d for d in range(1, min(cols, chunk) + 1) if cols % d == 0)
    q = torch.zeros_like(mat)
    for i in range(0, rows, r):
        for j in range(0, cols, c):
            coeffs = dctn(mat[i:i + r, j:j + c].numpy(), norm="ortho").reshape(-1)
            keep = np.argsort(-np.abs(coeffs), kind="stable")[:min(topk, r * c)]
            sent = np.zeros_like(coeffs)
            sent[keep] = torch.from_numpy(coeffs[keep]).to(torch.bfloat16).double().numpy()  # values go as bf16
            block = torch.from_numpy(idctn(sent.reshape(r, c), norm="ortho"))
            mat[i:i + r, j:j + c] -= block  # error feedback: what was sent leaves the buffer
            q[i:i + r, j:j + c] = block  # one rank: the average is its own coefficients
    with torch.no_grad():
        if p.dim() >= 2:
            p.mul_(1 - lr * wd)
        p.sub_(lr * q.view_as(p).sign().to(p.dtype))


def test_demo_on_one_rank_is_a_plain_single_process_demo(small_gpt):
    """The strategy (one rank, default options) against ``_demo_reference_step``: same
    model, batches, gradient clipping and LR schedule. Tolerance: the reference is float64, the strategy
    float32, so a sign may differ where an element of the decoded update is within
    rounding of 0, or a block's k-th and (k+1)-th coefficients swap places; at most
    0.1% of elements may differ, each by at most 2 lr per step."""
    from orchestrator.trainer import RankTrainer

    steps = 3
    spec = JobSpec(workload=small_gpt, strategy="demo", workers=1, steps=steps, batch_size=4, seed=3)
    t = RankTrainer(spec, rank=0, world=1, device=torch.device("cpu"))
    torch.manual_seed(spec.seed)
    ref = t.workload.model()
    params = [p for p in ref.parameters() if p.requires_grad]
    momenta = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    o, wd = t.strategy.options, spec.optim.weight_decay
    for s in range(steps):
        x, y = t.loader.next_batch()
        ref.zero_grad()
        t.workload.loss(ref(x), (x, y)).backward()
        torch.nn.utils.clip_grad_norm_(params, spec.optim.grad_clip)  # as DeMo's paper, before the step
        lr = spec.optim.lr * lr_factor(s, spec.optim, steps)
        for p, m in zip(params, momenta):
            _demo_reference_step(p.data, m, p.grad, lr=lr, wd=wd, decay=o.decay, topk=o.topk, chunk=o.chunk)
    t2 = RankTrainer(spec, rank=0, world=1, device=torch.device("cpu"))  # the same batches from the start
    for _ in range(steps):
        t2.train_step()
    got = dict(t2.strategy.module.named_parameters())
    init = dict(t.strategy.module.named_parameters())  # t's strategy never stepped
    n = differ = 0
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got[name], p, rtol=0, atol=2 * spec.optim.lr * steps, msg=name)
        n, differ = n + p.numel(), differ + int((got[name] != p).sum())
    assert differ <= 1e-3 * n, f"{differ} of {n} elements differ from the reference"
    assert all(not torch.equal(got[k], init[k]) for k in got)
