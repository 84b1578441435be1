"""compare(): several jobs on one Ray instance, summarised side by side.

Each row is measured in that run (from its metrics.parquet); nothing is
estimated. The HTML/Markdown report with plots builds on this table.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import pandas as pd

from orchestrator.config import JobSpec
from orchestrator.metrics import WARMUP_STEPS, summarize  # noqa: F401  (summarize is part of this module's API)

if TYPE_CHECKING:
    from orchestrator.driver import RunResult


def run(spec: JobSpec, **kwargs) -> "RunResult":
    """``orchestrator.driver.run``, imported when a job runs: it imports torch,
    which a matrix refused for bad input must not wait for."""
    from orchestrator.driver import run as run_job

    return run_job(spec, **kwargs)


@dataclass
class CompareResult:
    runs: list[RunResult]

    @property
    def summary(self) -> pd.DataFrame:
        return pd.DataFrame([summarize(r.metrics) for r in self.runs])


def compare(specs: Iterable[JobSpec], *, progress: bool = True, stream=None) -> CompareResult:
    """Run the jobs one after another on one Ray instance (started once)."""
    from cluster import runtime as ray_runtime

    specs = list(specs)
    addresses = {s.cluster.address for s in specs}
    if len(addresses) > 1:
        raise ValueError(f"cluster.address: compare() runs every job on one cluster, got {sorted(map(str, addresses))}")
    runtime = ray_runtime.start(address=addresses.pop())  # each run() below reuses it
    try:
        return CompareResult(runs=[run(s, progress=progress, stream=stream) for s in specs])
    finally:
        runtime.shutdown()


# -- a matrix of strategies x scenarios, with a report ------------------------

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


def matrix_specs(base: dict, strategies: list[dict], scenarios: list[str], storage: str):
    """One (Combination, spec fields) per strategy x scenario; same seed and data for all."""
    from orchestrator.config import ConfigError
    from orchestrator.report import strategy_label

    if not strategies:
        raise ConfigError("strategies: empty list (give at least one, e.g. ddp,fsdp)")
    if not scenarios:
        raise ConfigError("scenarios: empty list (give at least one, e.g. local)")
    out = []
    for sc in scenarios:
        for strat in strategies:
            label = strategy_label(strat)
            safe = "".join(ch if (ch.isascii() and ch.isalnum()) or ch in "._-" else "-" for ch in f"{label}-{sc}")
            run_id = f"{len(out):02d}-{safe}"
            fields = {**base, "strategy": strat, "scenario": sc, "storage": storage, "run_id": run_id}
            out.append((Combination(label=label, scenario=sc, run_id=run_id), fields))
    return out


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


def run_matrix(base: dict, strategies: list[dict], scenarios: list[str], out: str, *, address: str | None = None,
               target_loss: float | None = None, progress: bool = True, stream=None):
    """Run every strategy x scenario one after another on one Ray instance, keep
    going past failures (recorded with their one-line error), write the run
    folders under ``out/runs``, ``out/matrix.yaml`` and the report."""
    import sys

    import fsspec
    import yaml

    from orchestrator.report import Failure, Report, load_run, write_report

    stream = stream or sys.stderr
    out = out if "://" in out else os.path.abspath(out)
    combos = matrix_specs(base, strategies, scenarios, f"{out.rstrip('/')}/runs")
    specs = [matrix_job(combo, fields, address) for combo, fields in combos]  # all valid before the first run
    from cluster import runtime as ray_runtime  # Ray and torch: only once the matrix is valid
    from orchestrator.driver import check_before_ray

    for spec in specs:
        check_before_ray(spec)
    runtime = ray_runtime.start(address=address)
    runs, failures = [], []
    try:
        for i, ((combo, _), spec) in enumerate(zip(combos, specs), 1):
            print(f"[{i}/{len(combos)}] {combo.label} x {combo.scenario}", file=stream, flush=True)
            t0 = time.perf_counter()
            try:
                combo.url = run(spec, progress=progress, stream=stream).url
                runs.append(load_run(combo.url))
                combo.status = "ok"
            except KeyboardInterrupt:
                raise
            except Exception as e:  # ConfigError, RunFailed, ClusterError, a strategy's bug: recorded, not fatal
                combo.status, combo.error = "failed", (str(e).splitlines() or [type(e).__name__])[0]
                url = combo.url or f"{out.rstrip('/')}/runs/{combo.run_id}"
                fs, p = fsspec.core.url_to_fs(url)
                combo.url = url if fs.exists(f"{p}/spec.yaml") else None
                failures.append(Failure(label=combo.label, scenario=combo.scenario, error=combo.error, url=combo.url))
            combo.wall_s = time.perf_counter() - t0
            word = "ok" if combo.status == "ok" else f"FAILED: {combo.error}"
            print(f"[{i}/{len(combos)}] {combo.label} x {combo.scenario}: {word} ({combo.wall_s:.1f} s)",
                  file=stream, flush=True)
    finally:
        runtime.shutdown()
    fs, path = fsspec.core.url_to_fs(out)
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(f"{path}/matrix.yaml", yaml.safe_dump(
        {"combinations": [vars(c) for c, _ in combos]}, sort_keys=False).encode())
    html_url, md_url = write_report(Report(runs=runs, failures=failures, target_loss=target_loss), out)
    return [c for c, _ in combos], html_url, md_url
