"""Handcrafted schedules: GPipe, 1F1B, interleaved 1F1B, ZB-H1, ZB-H2, ZB-V.

Each generator returns a ``Schedule`` for ``p`` ranks and ``m`` micro-batches;
they depend on nothing but (p, m) (and the chunk count for interleaving), so the
same order runs whatever the measured costs are. ``auto.py`` searches with costs.
"""
from __future__ import annotations

from typing import Callable

from strategies.pipeline.actions import Action, Op, Schedule

HANDCRAFTED = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v")
SCHEDULES = HANDCRAFTED + ("auto",)


def chunks_per_rank(name: str, chunks: int = 2) -> int:
    """Model stages each rank holds under a schedule."""
    return 2 if name == "zb-v" else chunks if name == "interleaved-1f1b" else 1


def placement(name: str, p: int, chunks: int = 2) -> tuple[int, ...]:
    """Rank of every stage: one stage per rank, looped (interleaved) or V-shaped."""
    if name == "zb-v":
        return tuple(range(p)) + tuple(reversed(range(p)))
    return tuple(s % p for s in range(p * chunks_per_rank(name, chunks)))


def min_microbatches(name: str, p: int) -> int:
    """Fewest micro-batches a schedule is defined for. GPipe runs any m; the
    1F1B family needs m >= p to reach its steady phase (below that it is GPipe)."""
    return 1 if name in ("gpipe", "auto") else p


def check_microbatches(name: str, p: int, m: int) -> None:
    low = min_microbatches(name, p)
    if m < low:
        raise ValueError(f"microbatches={m}: schedule {name!r} on {p} stages needs at least {low} "
                         f"(fewer than the stages leaves no steady phase; use 'gpipe')")
    if name == "interleaved-1f1b" and m % p:
        raise ValueError(f"microbatches={m}: interleaved-1f1b needs a multiple of the {p} stages "
                         f"(micro-batches go round the loop in groups of {p})")


def generate(name: str, p: int, m: int, *, chunks: int = 2) -> Schedule:
    """The handcrafted schedule ``name`` for p ranks and m micro-batches."""
    if name not in HANDCRAFTED:
        raise ValueError(f"schedule={name!r}: not a handcrafted schedule (available: {', '.join(HANDCRAFTED)}; "
                         f"'auto' needs costs, see strategies.pipeline.auto)")
    if p < 2:
        raise ValueError(f"stages={p}: a pipeline needs at least 2")
    if name == "interleaved-1f1b" and chunks < 2:
        raise ValueError(f"chunks={chunks}: interleaving needs at least 2 model chunks per rank")
    check_microbatches(name, p, m)
    make: Callable[[int, int, int], list[Action]] = {
        "gpipe": _gpipe, "1f1b": _one_f_one_b, "zb-h1": _zb_h1, "zb-v": _zb_v,
        "interleaved-1f1b": lambda p, m, r: _interleaved(p, m, r, chunks),
    }.get(name)  # type: ignore[assignment]
    ranks = _zb_h2(p, m) if name == "zb-h2" else [make(p, m, r) for r in range(p)]
    return Schedule(name=name, microbatches=m, placement=placement(name, p, chunks), ranks=ranks)


def _gpipe(p: int, m: int, r: int) -> list[Action]:
    return [Action(r, Op.F, j) for j in range(m)] + [Action(r, Op.BW, j) for j in range(m)]


def _one_f_one_b(p: int, m: int, r: int) -> list[Action]:
    warmup = min(p - 1 - r, m)  # forwards in flight before the first backward arrives
    acts = [Action(r, Op.F, j) for j in range(warmup)]
    for k in range(m - warmup):
        acts += [Action(r, Op.F, warmup + k), Action(r, Op.BW, k)]
    return acts + [Action(r, Op.BW, j) for j in range(m - warmup, m)]


def _interleaved(p: int, m: int, r: int, v: int) -> list[Action]:
    """Megatron's interleaved 1F1B: rank r holds stages r, r+p, ..., r+(v-1)p;
    micro-batches pass through each chunk in groups of p."""
    def order(k: int, backward: bool) -> Action:
        group, q = divmod(k, p * v)
        chunk, i = divmod(q, p)
        if backward:
            chunk = v - 1 - chunk
        return Action(chunk * p + r, Op.BW if backward else Op.F, group * p + i)

    total = v * m
    warmup = min(total, 2 * (p - 1 - r) + (v - 1) * p)
    acts = [order(k, False) for k in range(warmup)]
    for k in range(total - warmup):
        acts += [order(warmup + k, False), order(k, True)]
    return acts + [order(k, True) for k in range(total - warmup, total)]


def _zb_h1(p: int, m: int, r: int) -> list[Action]:
    """1F1B with the backward split and each W delayed by r micro-batches: every
    rank then holds p micro-batches (1F1B's peak) and the tail bubbles of 1F1B
    are filled with the delayed W's; bubble (p-1)(T_F + T_B - T_W)."""
    warmup = min(p - 1 - r, m)
    acts = [Action(r, Op.F, j) for j in range(warmup)]
    nf, nw = warmup, 0
    for j in range(m):
        if nf < m:
            acts.append(Action(r, Op.F, nf))
            nf += 1
        acts.append(Action(r, Op.B, j))
        if j + 1 - nw > r:
            acts.append(Action(r, Op.W, nw))
            nw += 1
    return acts + [Action(r, Op.W, j) for j in range(nw, m)]


def _zb_h2(p: int, m: int) -> list[list[Action]]:
    """Up to 2p-1 micro-batches in flight: extra forwards fill the warm-up bubble
    and W's move to the tail, so each rank's span is m(T_F+T_B+T_W) when m >= 2p-1.
    Built by list scheduling at unit cost: every time slot, each rank runs a ready
    B, else a ready F if fewer than 2p-1 micro-batches await their W, else a W."""
    cap = 2 * p - 1
    ready: dict[tuple[int, str, int], int] = {}  # (stage, 'F' | 'B', mb) -> slot it finished in
    nf, nb, nw = [0] * p, [0] * p, [0] * p
    ranks: list[list[Action]] = [[] for _ in range(p)]
    t = 0
    while min(nw) < m:
        finished = []
        for r in range(p):
            j_b, j_f = nb[r], nf[r]
            b_ready = j_b < nf[r] and ((r == p - 1 and ready.get((r, "F", j_b), t) < t)
                                       or ready.get((r + 1, "B", j_b), t) < t)
            f_ready = j_f < m and nf[r] - nw[r] < cap and (r == 0 or ready.get((r - 1, "F", j_f), t) < t)
            if b_ready:
                ranks[r].append(Action(r, Op.B, j_b))
                finished.append(((r, "B", j_b), t))
                nb[r] += 1
            elif f_ready:
                ranks[r].append(Action(r, Op.F, j_f))
                finished.append(((r, "F", j_f), t))
                nf[r] += 1
            elif nw[r] < nb[r]:
                ranks[r].append(Action(r, Op.W, nw[r]))
                nw[r] += 1
        ready.update(finished)
        t += 1
    return ranks


def _zb_v(p: int, m: int, r: int) -> list[Action]:
    """Two chunks per rank in a V (rank r holds stages r and 2p-1-r), B and W
    split; the rank holds at most 2p chunk activations, i.e. p micro-batches of
    its share of the model, as 1F1B does. Phases: chunk-0 forwards to fill the
    pipe, forwards of both chunks, the first chunk-1 backwards, a steady
    F B W f b w rhythm, then the backwards drain with W's last."""
    down, up = r, 2 * p - 1 - r
    acts: list[Action] = []
    count = {(s, op): 0 for s in (down, up) for op in (Op.F, Op.B, Op.W)}

    def add(stage: int, op: Op) -> bool:
        j = count[(stage, op)]
        if j >= m:
            return False
        acts.append(Action(stage, op, j))
        count[(stage, op)] += 1
        return True

    for _ in range(2 * (p - r) - 1):
        add(down, Op.F)
    for _ in range(r):
        add(up, Op.F), add(down, Op.F)
    for _ in range(p - r):
        add(up, Op.F), add(up, Op.B), add(up, Op.W)
    while count[(down, Op.F)] < m or count[(up, Op.F)] < m:
        for stage in (down, up):
            add(stage, Op.F), add(stage, Op.B), add(stage, Op.W)
    for _ in range(r):
        add(down, Op.B), add(up, Op.B)
    for _ in range(p - r):
        add(down, Op.B), add(down, Op.W)
    while add(up, Op.B) or add(down, Op.B):
        pass
    while add(up, Op.W):
        pass
    while add(down, Op.W):
        pass
    return acts
