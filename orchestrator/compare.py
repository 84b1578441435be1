"""compare(): several jobs on one Ray instance, summarised side by side.

Each row is measured in that run (from its metrics.parquet); nothing is
estimated. The HTML/Markdown report with plots builds on this table.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from orchestrator.config import JobSpec

if TYPE_CHECKING:  # pandas (via metrics) is imported where a table is made: bad input answers without it
    import pandas as pd

    from orchestrator.driver import RunResult


def run(spec: JobSpec, **kwargs) -> "RunResult":
    """``orchestrator.driver.run``, imported when a job runs: it imports torch,
    which a matrix refused for bad input must not wait for."""
    from orchestrator.driver import run as run_job

    return run_job(spec, **kwargs)


@dataclass
class CompareResult:
    runs: list[RunResult]
    specs: list[JobSpec] = field(default_factory=list)  # in the order of runs

    @property
    def summary(self) -> pd.DataFrame:
        import pandas as pd

        from orchestrator.metrics import declared_warmup, summarize

        warmups = [declared_warmup(s.strategy.model_dump()) for s in self.specs] or [0] * len(self.runs)
        return pd.DataFrame([summarize(r.metrics, warmup_steps=w) for r, w in zip(self.runs, warmups)])


def compare(specs: Iterable[JobSpec], *, progress: bool = True, stream=None) -> CompareResult:
    """Run the jobs one after another on one Ray instance (started once)."""
    from cluster import runtime as ray_runtime

    specs = list(specs)
    addresses = {s.cluster.address for s in specs}
    if len(addresses) > 1:
        raise ValueError(f"cluster.address: compare() runs every job on one cluster, got {sorted(map(str, addresses))}")
    runtime = ray_runtime.start(address=addresses.pop())  # each run() below reuses it
    try:
        return CompareResult(runs=[run(s, progress=progress, stream=stream) for s in specs], specs=specs)
    finally:
        runtime.shutdown()


# -- a matrix of strategies x scenarios, with a report ------------------------

def strategy_label(strategy) -> str:
    """``{name: powersgd, rank: 4}`` -> ``powersgd:rank=4`` (the --strategies syntax)."""
    if isinstance(strategy, str):
        return strategy
    opts = {k: v for k, v in strategy.items() if k != "name"}
    return strategy["name"] + (":" + ",".join(f"{k}={v}" for k, v in opts.items()) if opts else "")


def parse_strategies(text: str) -> list[dict]:
    """``ddp,pipeline:schedule=zb-h1,powersgd:rank=4,min_compress=1`` -> strategy components.

    A comma ends a strategy unless the next item is an option (``k=v``) of the
    one before it."""
    import yaml

    from orchestrator.config import ConfigError

    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise ConfigError(f"--strategies {text!r}: empty (give e.g. ddp,fsdp,powersgd:rank=4)")
    out: list[dict] = []
    for item in items:
        name, colon, rest = item.partition(":")
        if "=" in name and not colon:  # another option of the previous strategy
            if not out:
                raise ConfigError(f"--strategies {text!r}: option {item!r} before any strategy name")
            name, rest = "", item
        elif "=" in name:
            raise ConfigError(f"--strategies {text!r}: {item!r} is not NAME or NAME:opt=v")
        else:
            out.append({"name": name})
        if rest:
            key, eq, raw = rest.partition("=")
            if not eq or not key:
                raise ConfigError(f"--strategies {text!r}: option {rest!r} is not opt=value")
            out[-1][key.strip()] = yaml.safe_load(raw)
    return out


@dataclass
class Combination:
    label: str
    scenario: str
    run_id: str
    url: str | None = None
    status: str = "pending"  # pending, ok, failed
    error: str = ""
    wall_s: float = 0.0
    repeat: int = 0  # which pass of --repeat (0-based)
    setting: str = ""  # the --tune grid point it runs at, e.g. optim.lr=1e-3 ("" untuned)


# -- --tune grids ------------------------------------------------------------------

SET_BY_COMPARE = ("steps", "storage", "run_id", "scenario", "resume")  # a tuning grid cannot move these


def _split_values(raw: str) -> list[str]:
    """``1e-3,3e-3`` -> two values; a comma inside [...] or {...} belongs to the value."""
    out, depth, cur = [], 0, ""
    for ch in raw:
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [v.strip() for v in out + [cur] if v.strip()]


def _check_tune_key(key: str, where: str) -> None:
    from orchestrator.config import ConfigError

    if not key or key.split(".")[0] in SET_BY_COMPARE:
        raise ConfigError(f"{where}: key {key!r} cannot be tuned (a --set-able training key, e.g. optim.lr; "
                          f"not {', '.join(SET_BY_COMPARE)}, which the comparison sets)")


def parse_tune(items: list[str]) -> dict[str, list[str]]:
    """``--tune optim.lr=1e-3,3e-3`` (repeatable) -> {key: [value as --set takes it]}; keys form a cartesian grid."""
    from orchestrator.config import ConfigError

    grid: dict[str, list[str]] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq:
            raise ConfigError(f"--tune {item!r}: expected KEY=v1,v2,... (e.g. optim.lr=1e-3,3e-3)")
        _check_tune_key(key, f"--tune {item!r}")
        if key in grid:
            raise ConfigError(f"--tune {item!r}: {key} given twice (one --tune per key)")
        grid[key] = _split_values(raw)
        if not grid[key]:
            raise ConfigError(f"--tune {item!r}: empty grid (give at least one value, e.g. {key}=1e-3,3e-3)")
    return grid


def file_tune(section, where: str) -> dict[str, list[str]]:
    """A compare file's ``tune:`` mapping ({key: [values]}, at the top or in one strategy) -> a grid."""
    from orchestrator.config import ConfigError

    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where}={section!r}: expected a mapping of KEY: [values] (e.g. optim.lr: [1e-3, 3e-3])")
    grid = {}
    for key, values in section.items():
        _check_tune_key(str(key), f"{where}.{key}")
        values = values if isinstance(values, list) else [values]
        if not values:
            raise ConfigError(f"{where}.{key}=[]: empty grid (give at least one value)")
        grid[str(key)] = [json.dumps(v) for v in values]  # JSON is YAML: --set parses it back to the same value
    return grid


def grid_points(grid: dict[str, list[str]]) -> list[list[str]]:
    """The cartesian product as --set items, one list per point; no grid: one untuned point."""
    return [[f"{k}={v}" for k, v in zip(grid, values)] for values in itertools.product(*grid.values())]


def with_setting(fields: dict, setting: list[str]) -> dict:
    """A copy of a run's spec fields with a grid point's --set items applied."""
    from orchestrator.config import apply_overrides

    return apply_overrides(copy.deepcopy(fields), setting)


def _safe(text: str) -> str:
    return "".join(ch if (ch.isascii() and ch.isalnum()) or ch in "._-" else "-" for ch in text)


def matrix_specs(base: dict, strategies: list[dict], scenarios: list[str], storage: str, *, repeat: int = 1,
                 settings: list[list[str]] | None = None):
    """One (Combination, spec fields) per strategy x scenario, the whole matrix ``repeat``
    times round-robin (a, b, c, a, b, c: drifting load touches every run alike); same seed
    and data for all; strategy i at its grid point ``settings[i]``."""
    from orchestrator.config import ConfigError

    if not strategies:
        raise ConfigError("strategies: empty list (give at least one, e.g. ddp,fsdp)")
    if not scenarios:
        raise ConfigError("scenarios: empty list (give at least one, e.g. local)")
    out = []
    for rep in range(repeat):
        for sc in scenarios:
            for i, strat in enumerate(strategies):
                setting = settings[i] if settings else []
                fields = with_setting({**base, "strategy": strat, "scenario": sc, "storage": storage}, setting)
                label = strategy_label(fields["strategy"])
                fields["run_id"] = run_id = f"{len(out):02d}-{_safe(f'{label}-{sc}')}" + (
                    f"-r{rep + 1}" if repeat > 1 else "")
                out.append((Combination(label=label, scenario=sc, run_id=run_id, repeat=rep,
                                        setting=",".join(setting)), fields))
    return out


def common_batch(base: dict, specs: list[JobSpec]) -> int | None:
    """The global batch every run of a matrix takes when the user set none: each
    strategy's own default is the micro-batch x its data-parallel replicas, so a
    pipeline or sequence-parallel job on N workers would take 1/stages or 1/sp of
    ddp's samples a step and its loss and time per step would not compare. The
    least common multiple of the defaults (ddp's, micro-batch x N, where any
    strategy has N replicas) divides by every strategy's replicas. None: the user
    set ``batch_size``, or the runs already agree."""
    if "batch_size" in base or len({s.batch_size for s in specs}) <= 1:
        return None
    return math.lcm(*{s.batch_size for s in specs})


def matrix_job(combo: Combination, fields: dict, address: str | None) -> JobSpec:
    """The validated spec of one combination; bad input names the combination and stops the whole matrix."""
    from orchestrator.config import ConfigError

    cluster = fields.get("cluster") or {}
    if not isinstance(cluster, dict):
        raise ConfigError(f"invalid job spec: cluster={cluster!r}: expected a section of cluster.* options")
    try:
        return JobSpec(**{**fields, "cluster": {**cluster, "address": address}})
    except ConfigError as e:
        raise ConfigError(f"{combo.label} x {combo.scenario}: {e}") from None


@dataclass(frozen=True, kw_only=True)
class Tuning:
    """What ``--tune`` asks: per strategy its grid ({} : not tuned), and the short budget."""

    grids: list[dict[str, list[str]]]
    steps: int | None = None  # None: a quarter of the comparison's steps (rounded up)

    def budget(self, steps: int) -> int:
        return self.steps if self.steps is not None else math.ceil(steps / 4)


def tuning_specs(base: dict, strategies: list[dict], tuning: Tuning, scenario: str, storage: str, steps: int):
    """One (Combination, fields, point) per grid point of every strategy that has a grid, on the
    short budget under ``scenario``; points interleaved across strategies (drifting load)."""

    points = [grid_points(g) if g else [] for g in tuning.grids]
    out = []
    for j in range(max(map(len, points), default=0)):
        for strat, pts in zip(strategies, points):
            if j < len(pts):
                fields = with_setting({**base, "strategy": strat, "scenario": scenario, "storage": storage,
                                       "steps": steps}, pts[j])
                label = strategy_label(strat)
                fields["run_id"] = run_id = f"{len(out):02d}-{_safe(label + '-' + ','.join(pts[j]))}"[:120]
                out.append((Combination(label=label, scenario=scenario, run_id=run_id, setting=",".join(pts[j])),
                            fields, pts[j]))
    return out


def check_grids(base: dict, strategies: list[dict], scenarios: list[str], tuning: Tuning, storage: str,
                address: str | None) -> None:
    """Every grid point of every strategy, in every scenario, is a valid job (bad input
    before any run: an unknown key, a value out of range)."""
    from orchestrator.config import ConfigError

    for strat, grid in zip(strategies, tuning.grids):
        for point in grid_points(grid) if grid else []:
            for combo, fields in matrix_specs(base, [strat], scenarios, storage, settings=[point]):
                try:
                    matrix_job(combo, fields, address)
                except ConfigError as e:
                    own = " (a key only some strategies have goes in that strategy's own tune: in a --config " \
                        "compare file)" if any(p.startswith("strategy.") for p in point) else ""
                    raise ConfigError(f"--tune {','.join(point)}: {e}{own}") from None


def choose(results: list[tuple[str, dict | None]]) -> str | None:
    """The setting with the best final held-out loss (training loss where a run has no
    held-out evaluation; a diverged run never wins); None when no run finished."""
    from orchestrator.metrics import quality

    scored = [(quality(s)[1], setting) for setting, s in results if s is not None]
    scored = [(math.inf if math.isnan(v) else v, setting) for v, setting in scored]
    return min(scored, key=lambda x: x[0])[1] if scored else None


def _run_all(combos, specs, *, what: str, progress: bool, stream) -> None:
    """Run one after another, recording each one's status, error (one line), url and seconds;
    a failure is recorded, not fatal."""
    import fsspec

    from orchestrator.report import load_run

    for i, (combo, spec) in enumerate(zip(combos, specs), 1):
        name = f"{combo.label} x {combo.scenario}" + (f" [{combo.setting}]" if combo.setting else "") + (
            f" (repeat {combo.repeat + 1})" if combo.repeat else "")
        print(f"[{what}{i}/{len(combos)}] {name}", file=stream, flush=True)
        t0 = time.perf_counter()
        try:
            combo.url = run(spec, progress=progress, stream=stream).url
            load_run(combo.url)  # a run the report cannot read is a failed run
            combo.status = "ok"
        except KeyboardInterrupt:
            raise
        except Exception as e:  # ConfigError, RunFailed, ClusterError, a strategy's bug: recorded, not fatal
            combo.status, combo.error = "failed", (str(e).splitlines() or [type(e).__name__])[0]
            url = combo.url or f"{spec.storage.rstrip('/')}/{combo.run_id}"
            fs, p = fsspec.core.url_to_fs(url)
            combo.url = url if fs.exists(f"{p}/spec.yaml") else None
        combo.wall_s = time.perf_counter() - t0
        word = "ok" if combo.status == "ok" else f"FAILED: {combo.error}"
        print(f"[{what}{i}/{len(combos)}] {name}: {word} ({combo.wall_s:.1f} s)", file=stream, flush=True)


def _tune(tunes, specs, *, progress: bool, stream) -> dict[str, list[str]]:
    """Run every grid point; per strategy label, the point ``choose`` picks ([]: none finished)."""
    from orchestrator.metrics import summarize
    from orchestrator.report import load_run

    _run_all([c for c, _, _ in tunes], specs, what="tune ", progress=progress, stream=stream)
    chosen = {}
    for label in dict.fromkeys(c.label for c, _, _ in tunes):
        mine = [(c, p) for c, _, p in tunes if c.label == label]
        best = choose([(c.setting, summarize(load_run(c.url).metrics) if c.status == "ok" else None)
                       for c, _ in mine])
        chosen[label] = next((p for c, p in mine if c.setting == best), [])
        print(f"tuned {label}: {best if best is not None else 'no grid point finished; it runs untuned'}",
              file=stream, flush=True)
    return chosen


def _write_matrix(out: str, combos: list[Combination], tunes, chosen: dict[str, list[str]], note: str) -> None:
    """``out/matrix.yaml``: every combination, and every tuning run with whether it was chosen."""
    import fsspec
    import yaml

    fs, path = fsspec.core.url_to_fs(out)
    fs.makedirs(path, exist_ok=True)
    doc = {"combinations": [vars(c) for c in combos]}
    if tunes:
        doc["tuning"] = [dict(vars(c), chosen=bool(chosen.get(c.label)) and p == chosen[c.label])
                         for c, _, p in tunes]
        doc["tuning_note"] = note
    fs.pipe_file(f"{path}/matrix.yaml", yaml.safe_dump(doc, sort_keys=False).encode())


def run_matrix(base: dict, strategies: list[dict], scenarios: list[str], out: str, *, address: str | None = None,
               target_loss: float | None = None, progress: bool = True, stream=None, repeat: int = 1,
               tuning: Tuning | None = None, project_on=None):
    """Run every strategy x scenario (``repeat`` times round-robin) one after another on
    one Ray instance, each strategy first tuned over its grid (``tuning``) on a short
    budget and then run at its best point; keep going past failures (recorded with
    their one-line error); write the run folders under ``out/runs`` (tuning runs under
    ``out/tune``), ``out/matrix.yaml`` and the report."""
    import sys

    from orchestrator.config import ConfigError

    if repeat < 1:
        raise ConfigError(f"--repeat {repeat}: must be >= 1 (passes of the whole matrix)")
    stream = stream or sys.stderr
    out = out if "://" in out else os.path.abspath(out)
    root = out.rstrip("/")

    def jobs(base: dict, settings=None):  # the matrix's combinations and their validated specs
        combos = matrix_specs(base, strategies, scenarios, f"{root}/runs", repeat=repeat, settings=settings)
        return combos, [matrix_job(combo, fields, address) for combo, fields in combos]

    combos, specs = jobs(base)  # all valid before the first run
    common = common_batch(base, specs)
    if common is not None:  # every run on the same samples a step, whatever its replicas
        base = {**base, "batch_size": common}
        combos, specs = jobs(base)
    tunes, tune_specs, budget = [], [], 0
    if tuning is not None and any(tuning.grids):
        check_grids(base, strategies, scenarios, tuning, f"{root}/runs", address)
        budget = tuning.budget(specs[0].steps)
        if not 1 <= budget <= specs[0].steps:
            raise ConfigError(f"--tune-steps {budget}: must be 1..{specs[0].steps} (the comparison's steps; "
                              f"tuning runs a short budget)")
        tunes = tuning_specs(base, strategies, tuning, scenarios[0], f"{root}/tune", budget)
        tune_specs = [matrix_job(c, f, address) for c, f, _ in tunes]
    from cluster import runtime as ray_runtime  # Ray, torch, pandas: only once the matrix is valid
    from orchestrator.driver import check_before_ray
    from orchestrator.report import report_from_urls
    from orchestrator.storage import check_writable

    for spec in specs + tune_specs:
        check_before_ray(spec)
    check_writable(out, "--out")
    runtime = ray_runtime.start(address=address)
    chosen: dict[str, list[str]] = {}  # strategy label -> its best grid point
    try:
        if tunes:
            chosen = _tune(tunes, tune_specs, progress=progress, stream=stream)
            settings = [chosen.get(strategy_label(s), []) for s in strategies]
            combos, specs = jobs(base, settings)
        _run_all([c for c, _ in combos], specs, what="", progress=progress, stream=stream)
    finally:
        runtime.shutdown()
    note = (f"Each strategy with a grid ran every point once for {budget} of the comparison's {specs[0].steps} "
            f"steps under `{scenarios[0]}` (the first scenario: loss after a number of steps does not depend on "
            f"the network model's delays); the comparison runs it at its best point by final held-out loss "
            f"(training loss where a run has no held-out evaluation).")
    _write_matrix(out, [c for c, _ in combos], tunes, chosen, note)
    html_url, md_url = report_from_urls([out], out, target_loss=target_loss, project_on=project_on)
    return [c for c, _ in combos], html_url, md_url
