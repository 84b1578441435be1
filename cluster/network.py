"""A simulated network: latency and bandwidth per link, nodes x workers per node.

Under a scenario every call through ``cluster.Comm`` lasts at least the time
this model gives for its bytes (the call is delayed by the difference), so the
wall clock of a run on one machine reflects the simulated cluster. Workers are
placed node-major: rank r lives on node r // per_node.

The model is the usual alpha-beta one for the ring algorithms gloo and NCCL
use: a collective is a number of sequential rounds, each paying the link
latency, and the bytes a rank sends cross its slowest link at that link's
bandwidth. A group within one node uses the intra-node link; a group that
spans nodes is bound by the inter-node link.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
_TIME = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


@dataclass(frozen=True, kw_only=True)
class Link:
    gbit_s: float  # bandwidth, Gbit/s
    latency_s: float

    def seconds(self, nbytes: int, rounds: int) -> float:
        return rounds * self.latency_s + nbytes * 8 / (self.gbit_s * 1e9)


@dataclass(frozen=True, kw_only=True)
class Scenario:
    name: str
    description: str
    per_node: int  # workers per node
    intra: Link
    inter: Link
    nodes: int | None = None  # None: as many as the workers need

    def check(self, workers: int) -> None:
        if self.nodes is not None and self.nodes * self.per_node < workers:
            raise ValueError(f"scenario={self.name!r}: {self.nodes} nodes x {self.per_node} per node = "
                             f"{self.nodes * self.per_node} workers, fewer than workers={workers}")

    def node(self, rank: int) -> int:
        return rank // self.per_node

    def link(self, ranks: tuple[int, ...]) -> Link:
        return self.intra if len({self.node(r) for r in ranks}) <= 1 else self.inter

    def seconds(self, op: str, sent: int, received: int, ranks: tuple[int, ...]) -> float:
        """Least time of one call: ``sent``/``received`` are this rank's bytes on the
        wire (Comm's exact counts), ``ranks`` the global ranks taking part."""
        p = len(ranks)
        if p <= 1:
            return 0.0
        return self.link(ranks).seconds(max(sent, received), rounds(op, p))

    def __str__(self) -> str:
        return self.name


def rounds(op: str, p: int) -> int:
    """Sequential rounds of one ``op`` over ``p`` ranks, each paying the link latency (the ring algorithms)."""
    return {"all_reduce": 2 * (p - 1), "all_gather": p - 1, "reduce_scatter": p - 1,
            "all_to_all": p - 1, "broadcast": p - 1}.get(op, 1)  # p2p, exchange, others: one round


def _link(gbit: float, latency: float) -> Link:
    return Link(gbit_s=gbit, latency_s=latency)


SCENARIOS: dict[str, Scenario | None] = {
    "local": None,
    "datacenter-100g": Scenario(name="datacenter-100g", description="8 GPUs a node on NVLink-class links, "
                                "100 Gbit/s RDMA between nodes", per_node=8,
                                intra=_link(2400, 2e-6), inter=_link(100, 5e-6)),
    "cloud-10g": Scenario(name="cloud-10g", description="4 workers a VM, 10 Gbit/s between VMs",
                          per_node=4, intra=_link(100, 5e-6), inter=_link(10, 50e-6)),
    "internet-1g": Scenario(name="internet-1g", description="one worker a machine across the internet: "
                            "1 Gbit/s, 10 ms", per_node=1, intra=_link(100, 5e-6), inter=_link(1, 10e-3)),
    "edge-100m": Scenario(name="edge-100m", description="one worker a device at the edge: 100 Mbit/s, 30 ms",
                          per_node=1, intra=_link(100, 5e-6), inter=_link(0.1, 30e-3)),
}
_DESCRIPTIONS = {"local": "no simulated network: calls take what this machine takes"}

CUSTOM_KEYS = ("nodes", "per_node", "inter", "intra", "latency", "intra_latency")
CUSTOM_EXAMPLE = "nodes=2,per_node=2,inter=1gbit,intra=50gbit,latency=200us"


def _rate(key: str, raw: str, text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)\s*([a-zµ]*)", raw.strip().lower())
    unit = (m.group(2) or "gbit").removesuffix("/s").removesuffix("ps") if m else ""
    unit = {"g": "gbit", "m": "mbit", "k": "kbit", "gb": "gbit", "mb": "mbit"}.get(unit, unit)
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"{key}={raw!r} is not a bandwidth like 1gbit or 100mbit")
    return float(m.group(1)) * _UNITS[unit] / 1e9


def _duration(key: str, raw: str, text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)\s*(s|ms|us|µs|ns)", raw.strip().lower())
    if not m:
        raise ValueError(f"{key}={raw!r} is not a duration like 200us or 10ms")
    return float(m.group(1)) * _TIME[m.group(2)]


def parse_scenario(text: str) -> Scenario | None:
    """A named scenario, or the custom form ``nodes=2,per_node=2,inter=1gbit,...``.
    None for ``local``. ValueError naming the problem otherwise."""
    text = text.strip()
    if text in SCENARIOS:
        return SCENARIOS[text]
    if "=" not in text:
        raise ValueError(f"unknown (named: {', '.join(SCENARIOS)}; or custom: {CUSTOM_EXAMPLE})")
    values: dict[str, str] = {}
    for item in text.split(","):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or key not in CUSTOM_KEYS:
            raise ValueError(f"{item!r} is not KEY=VALUE with KEY in {', '.join(CUSTOM_KEYS)}")
        values[key] = raw
    for key in ("per_node", "inter"):
        if key not in values:
            raise ValueError(f"custom scenarios need {key} (e.g. {CUSTOM_EXAMPLE})")
    ints = {}
    for key in ("nodes", "per_node"):
        if key in values:
            if not values[key].strip().isdigit() or int(values[key]) < 1:
                raise ValueError(f"{key}={values[key]!r} must be a whole number >= 1")
            ints[key] = int(values[key])
    inter_lat = _duration("latency", values.get("latency", "100us"), text)
    intra = values.get("intra", values["inter"])
    return Scenario(name=text, description="custom", per_node=ints["per_node"], nodes=ints.get("nodes"),
                    inter=_link(_rate("inter", values["inter"], text), inter_lat),
                    intra=_link(_rate("intra", intra, text),
                                _duration("intra_latency", values.get("intra_latency", "5us"), text)))


def describe() -> list[tuple[str, str]]:
    """(name, one line) for every named scenario, for ``polytrain scenarios``."""
    out = []
    for name, sc in SCENARIOS.items():
        if sc is None:
            out.append((name, _DESCRIPTIONS[name]))
            continue
        out.append((name, f"{sc.description} [per node {sc.per_node}; intra {_fmt(sc.intra)}; inter {_fmt(sc.inter)}]"))
    out.append(("custom", f"e.g. {CUSTOM_EXAMPLE} (latency: inter-node; intra_latency default 5us)"))
    return out


def _fmt(link: Link) -> str:
    bw = f"{link.gbit_s:g} Gbit/s" if link.gbit_s >= 1 else f"{link.gbit_s * 1000:g} Mbit/s"
    lat = link.latency_s
    return f"{bw}, {lat * 1e3:g} ms" if lat >= 1e-3 else f"{bw}, {lat * 1e6:g} us"


def ring_allreduce_seconds(scenario: Scenario, nbytes: int, world: int) -> float:
    """Modelled time of a ring all-reduce of ``nbytes`` over ranks 0..world-1 (for docs and tests)."""
    sent = 0 if world <= 1 else 2 * (world - 1) * nbytes // world
    return scenario.seconds("all_reduce", sent, sent, tuple(range(world)))


