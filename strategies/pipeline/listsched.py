"""List scheduling with real costs: the building block of the automatic scheduler.

Ranks decide in time order. A free rank runs a ready B (the critical path),
else a ready F if the micro-batch's activations on all of this rank's stages
fit under ``cap``, else a pending W if the next B or F is at least
``theta * T_W`` away (a W then cannot delay it by much), else it waits for the
next moment something may change.
"""
from __future__ import annotations

import heapq

from strategies.pipeline.actions import Action, Op, Schedule
from strategies.pipeline.simulate import StageCost

EPS = 1e-9


def list_schedule(place: tuple[int, ...], m: int, costs: list[StageCost], *, cap: float,
                  theta: float) -> Schedule | None:
    """One greedy run; None if it stalls (the cap starves the pipeline)."""
    return _ListScheduler(place, m, costs, cap=cap, theta=theta).build()


class _ListScheduler:
    def __init__(self, place: tuple[int, ...], m: int, costs: list[StageCost], *, cap: float, theta: float):
        self.place, self.m, self.costs, self.cap, self.theta = place, m, costs, cap, theta
        S, p = len(place), max(place) + 1
        self.S = S
        self.local = [[s for s in range(S) if place[s] == r] for r in range(p)]  # ascending: [0] is entered first
        self.nf, self.nb = [0] * S, [0] * S
        self.pending_w: list[list[int]] = [[] for _ in range(S)]
        self.ends: dict[tuple[int, str, int], float] = {}
        self.held, self.reserved = [0.0] * p, [0.0] * p
        self.orders: list[list[Action]] = [[] for _ in range(p)]
        self.left = [3 * m * len(self.local[r]) for r in range(p)]

    def build(self) -> Schedule | None:
        p = len(self.local)
        heap = [(0.0, r, r) for r in range(p)]
        seq, stalled = p, {}  # rank -> when it last found nothing to run (since the last progress)
        while heap:
            now, _, r = heapq.heappop(heap)
            if self.left[r] == 0:
                continue
            choice, later = self._choose(r, now)
            seq += 1
            if choice is not None:
                stalled.clear()
                heapq.heappush(heap, (self._run(r, choice, now), seq, r))
                continue
            stalled[r] = now
            others = [(t, q) for t, _, q in heap if q != r]
            same = [t for t, q in others if abs(t - now) <= EPS and abs(stalled.get(q, -1.0) - now) > EPS]
            future = [t for t in later + [t for t, _ in others] if t > now + EPS]
            if same:  # a rank deciding at (about) the same time may still feed this one
                heapq.heappush(heap, (max(same), seq, r))
            elif future:
                heapq.heappush(heap, (min(future), seq, r))
            else:
                return None
        return Schedule(name="list", microbatches=self.m, placement=self.place, ranks=self.orders)

    def _choose(self, r: int, now: float) -> tuple[Action | None, list[float]]:
        """The action r runs at ``now`` (None: wait) and the known ready times after now."""
        cands = self._candidates(r)
        # B before F; among B's the oldest micro-batch; among F's the deepest stage (finishes
        # micro-batches, so memory comes back), then the oldest
        ready = sorted((prio, -a.stage if prio else a.mb, a.mb, a) for t, prio, a in cands if t <= now + EPS)
        later = [t for t, _, _ in cands if t > now + EPS]
        if ready:
            return ready[0][3], later
        w_stage = next((s for s in reversed(self.local[r]) if self.pending_w[s]), None)
        if w_stage is not None and (not later or min(later) - now >= self.theta * self.costs[w_stage].w):
            return Action(w_stage, Op.W, self.pending_w[w_stage][0]), later
        return None, later

    def _hop(self, a: int, b: int, boundary: int) -> float:
        return self.costs[boundary].comm if self.place[a] != self.place[b] else 0.0

    def _candidates(self, r: int) -> list[tuple[float, int, Action]]:
        """(ready time, priority, action) of r's next B and F per stage whose inputs are scheduled."""
        out, S, ends = [], self.S, self.ends
        for s in self.local[r]:
            j = self.nb[s]
            if j < self.nf[s]:
                up = ends.get((s + 1, "B", j)) if s < S - 1 else ends.get((s, "F", j))
                if up is not None:
                    ready = max(ends[(s, "F", j)], up + (self._hop(s, s + 1, s) if s < S - 1 else 0.0))
                    out.append((ready, 0, Action(s, Op.B, j)))
            j = self.nf[s]
            if j < self.m and self._fits(s, r):
                prev = ends.get((s - 1, "F", j)) if s > 0 else 0.0
                if prev is not None:
                    out.append((prev + (self._hop(s - 1, s, s - 1) if s > 0 else 0.0), 1, Action(s, Op.F, j)))
        return out

    def _fits(self, s: int, r: int) -> bool:
        if s != self.local[r][0]:
            return True  # reserved when the micro-batch entered this rank's first stage
        need = sum(self.costs[t].mem for t in self.local[r])
        return self.held[r] + self.reserved[r] + need <= self.cap + EPS

    def _run(self, r: int, a: Action, start: float) -> float:
        c = self.costs[a.stage]
        end = start + c.duration(a.op)
        self.orders[r].append(a)
        self.left[r] -= 1
        if a.op is Op.F:
            self.nf[a.stage] += 1
            self.ends[(a.stage, "F", a.mb)] = end
            first = a.stage == self.local[r][0]
            self.reserved[r] += sum(self.costs[t].mem for t in self.local[r] if t > a.stage) if first else -c.mem
            self.held[r] += c.mem
        elif a.op is Op.B:
            self.nb[a.stage] += 1
            self.ends[(a.stage, "B", a.mb)] = end
            self.pending_w[a.stage].append(a.mb)
            self.held[r] -= c.mem - c.held_until_w
        else:
            self.pending_w[a.stage].remove(a.mb)
            self.held[r] -= c.held_until_w
        return end
