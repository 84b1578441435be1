"""JobSpec: one validated, keyword-only description of a job.

Everything that can be checked without starting a process is checked when a
JobSpec is built, and every error names the field, the value and what is
allowed, on one line.
"""
from __future__ import annotations

import datetime as dt
import inspect
import math
import os
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from cluster.faults import Injection, parse_injection
from cluster.network import Scenario, parse_scenario
from orchestrator.errors import ConfigError

if TYPE_CHECKING:  # the registries import torch and every strategy: only once the schema is valid (_resolve)
    from strategies import Strategy
    from workloads import Workload


RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def short_name(ref: str) -> str:
    """A registered name, or a plugin reference's class name (``path/file.py:Class``,
    ``module:Class`` -> ``Class``), made safe for a run id."""
    name = ref.rpartition(":")[2] or os.path.splitext(os.path.basename(ref.rpartition(":")[0]))[0]
    return re.sub(r"[^A-Za-z0-9._-]", "-", name).strip(".-") or "job"


def check_protocol(url: str) -> str:
    """``url`` unchanged if fsspec knows its protocol and its implementation is
    installed (no connection is made); a one-line ValueError otherwise."""
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise ValueError(f"unknown protocol {protocol!r} (fsspec knows: file, memory, s3, gs, az, hdfs, ...)") from None
    except ImportError as e:  # a known protocol whose package is missing: fsspec says which to install
        raise ValueError(f"protocol {protocol!r} needs a package that is not installed "
                         f"({str(e).strip().splitlines()[0]})") from None
    return url


def format_validation_error(e: ValidationError, prefix: str = "") -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if not loc:  # raised by a model validator: the message names its fields
            parts.append(prefix + msg)
            continue
        field = f"{prefix}{loc}"
        if err["type"] == "extra_forbidden":
            parts.append(f"{field}: unknown key")
        elif err["type"] == "missing":
            parts.append(f"{field}: required")
        else:
            parts.append(f"{field}={err['input']!r}: {msg}")
    return "; ".join(parts)


def _finite(options: BaseModel, prefix: str) -> BaseModel:
    """A plugin's options, refused when a float is inf or nan (a bound like gt=0 lets inf through)."""
    for key, value in options:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{prefix}{key}={value!r}: must be a finite number")
    return options


class Component(BaseModel):
    """A registered name plus its options (``{name: ddp, bucket_mb: 10}``)."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ClusterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    address: str | None = Field(None, description="Ray cluster to join (HOST:PORT, ray://HOST:PORT, auto); none: embedded Ray")
    placement: Literal["PACK", "SPREAD"] = Field("PACK", description="placement-group strategy for the workers")
    cpus_per_worker: float | None = Field(
        None, gt=0, description="CPUs reserved per worker; default: 1 on a cluster, this machine's CPUs / workers embedded"
    )
    gpus_per_worker: float = Field(0, ge=0, description="GPUs per worker (NCCL when > 0)")
    dashboard: bool = Field(False, description="start Ray's dashboard with an embedded instance")
    collective_timeout_s: float = Field(300, gt=0, description="torch.distributed process-group timeout")
    placement_timeout_s: float = Field(60, gt=0, description="how long to wait for the workers to be placed")


DEFAULT_STORAGE = "~/polytrain_results"


class FailureSpec(BaseModel):
    """What the controller does when a worker dies, hangs or produces a NaN loss."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_failures: int = Field(0, ge=0, description="restarts allowed before the run fails (0, as in Ray Train: fail at once)")
    backoff_s: float = Field(1.0, ge=0, description="wait before the first restart; doubles each restart")
    snapshot_every: int = Field(10, ge=1, description="keep an in-memory snapshot in Ray's object store every N steps")
    snapshots: bool = Field(True, description="in-memory snapshots on (restore from them first, else the newest checkpoint)")
    heal: bool = Field(True, description="replace only a lost worker, the others keep their process and state "
                       "(strategies that cannot heal in place restart every worker)")
    elastic: bool = Field(False, description="on failure, continue with the healthy workers instead of replacing the lost one")
    min_workers: int = Field(1, ge=1, description="elastic and straggler evict: never shrink below this many workers")
    hang_factor: float = Field(10.0, gt=1, description="a step is hung after hang_factor x the recent median step time ...")
    hang_floor_s: float = Field(60.0, gt=0, description="... and never sooner than this")
    nan: Literal["skip", "rollback", "fail"] = Field(
        "skip", description="a non-finite loss: skip the update, roll back to the last snapshot, or fail the run")
    max_nan_steps: int = Field(5, ge=1, description="nan='skip': fail the run after this many non-finite steps in a row")

    def heal_mode(self, strategy_heal: str) -> str:
        """How a lost worker is recovered: in place, the strategy's own way
        (``Strategy.heal``: "peer", "snapshot"), where healing is on and a failure may
        be retried; else "restart". The driver's spare, the ranks' abort hooks and the
        controller's decision all ask this."""
        return strategy_heal if self.heal and self.max_failures > 0 else "restart"


class StragglerSpec(BaseModel):
    """How slow ranks are found (compute time over a sliding window) and what is done."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    mitigation: Literal["none", "rebalance", "backup", "evict"] = Field(
        "none", description="rebalance: smaller batch share; backup: drop the late gradients; evict: restart without it")
    factor: float = Field(1.5, gt=1, description="slower than factor x the median compute time ...")
    patience: int = Field(5, ge=1, description="... for this many steps in a row is a straggler")
    window: int = Field(10, ge=2, description="steps of compute time the median and speeds are taken over")


_TOP_KEYS = (
    "workload", "strategy", "workers", "steps", "batch_size", "grad_accum", "seed",
    "storage", "run_id", "optim", "cluster", "scenario", "checkpoint_every", "keep_checkpoints", "resume",
    "eval_every", "eval_samples", "failure", "straggler", "inject",
)


class JobSpec(BaseModel):
    """A training job. ``workload`` and ``strategy`` take a name or ``{name, **options}``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    workload: Component = Field(description="registered workload name and its options")
    strategy: Component = Field(description="registered strategy name and its options")
    workers: int = Field(1, ge=1, description="ranks, one Ray actor each")
    steps: int = Field(100, ge=1, description="optimizer steps")
    batch_size: int | None = Field(
        None, ge=1, description="global samples per step; default (resolved when built): "
        "workload micro_batch x workers x grad_accum"
    )
    grad_accum: int = Field(1, ge=1, description="micro-batches per rank per step")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds model init and data order (0..2**32-1, numpy's range)")
    # a fixed place in the home folder (as Ray Train's ~/ray_results), never the current folder unasked
    storage: str = Field(DEFAULT_STORAGE, validate_default=True,
                         description="folder or fsspec URL under which the run folder is written")
    run_id: str | None = Field(None, description="run folder name (letters, digits, '.', '_', '-'; "
                               "not '.' or '..'); default: generated")
    scenario: Scenario | None = Field(
        "local", validate_default=True, description="simulated network: local (none), a name from "
        "`polytrain scenarios`, or nodes=2,per_node=2,inter=1gbit,intra=50gbit,latency=200us")
    checkpoint_every: int = Field(0, ge=0, description="write a checkpoint every N steps (0: never)")
    eval_every: int | None = Field(
        None, ge=0, description="score the held-out split every N steps and always after the last (0: only after "
        "the last; default, resolved when built: about 4 times a run)")
    eval_samples: int = Field(64, ge=1, description="held-out samples each evaluation scores (all of them if fewer); "
                              "the same samples every time")
    keep_checkpoints: int = Field(2, ge=1, description="committed checkpoints to keep (oldest deleted first)")
    resume: str | None = Field(None, description="'latest' (this run's newest committed checkpoint) or a checkpoint URL")
    # strategies.OptimConfig once built (_resolve): importing it imports torch, which bad input must not wait for
    optim: Any = Field(default_factory=dict, description="optimizer options (strategies.OptimConfig)")
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    failure: FailureSpec = Field(default_factory=FailureSpec)
    straggler: StragglerSpec = Field(default_factory=StragglerSpec)
    inject: list[Injection] = Field(default_factory=list, description="faults to inject, e.g. kill:rank=1,step=30")

    def __init__(self, **data: Any):
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(f"invalid job spec: {format_validation_error(e)}") from None

    @field_validator("workload", "strategy", mode="before")
    @classmethod
    def _name_shorthand(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("storage")
    @classmethod
    def _absolute_storage(cls, v: str) -> str:
        # resolved on the driver: workers write checkpoints here from their own cwd
        return check_protocol(v) if "://" in v else os.path.abspath(os.path.expanduser(v))

    @field_validator("resume")
    @classmethod
    def _resume_protocol(cls, v: str | None) -> str | None:
        return check_protocol(v) if v and "://" in v else v

    @field_validator("run_id")
    @classmethod
    def _safe_run_id(cls, v: str | None) -> str | None:
        # one folder under storage: never a path, never '.' or '..' (the storage folder or its parent),
        # nothing a shell or another filesystem reads differently
        if v is not None and not RUN_ID_RE.fullmatch(v):
            raise ValueError("not a folder name (allowed: 1-128 of A-Z a-z 0-9 . _ -, starting with a letter or digit)")
        return v

    @field_validator("scenario", mode="before")
    @classmethod
    def _known_scenario(cls, v: Any) -> Any:
        return parse_scenario(v) if isinstance(v, str) else v  # ValueError names the problem

    @field_validator("inject", mode="before")
    @classmethod
    def _parse_injections(cls, v: Any) -> Any:
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list):
            return v
        # parsed once, here; ValueError names the string
        return [i if isinstance(i, Injection) else parse_injection(str(i)) for i in items]

    @field_serializer("scenario")
    def _scenario_text(self, v: Scenario | None) -> str:
        return self.scenario_name

    @field_serializer("inject")
    def _injection_texts(self, v: list[Injection]) -> list[str]:
        return [str(i) for i in v]  # the canonical form, which parses back to the same Injection

    @model_validator(mode="after")
    def _resolve(self) -> "JobSpec":
        # Runs only once every field is valid: from here on the registries (and torch) are imported.
        from workloads.plugins import canonical_ref

        for component in (self.workload, self.strategy):
            component.name = canonical_ref(component.name)  # a relative file path works from any cwd
        self.optim = self._optim_config()
        if self.run_id is None:
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            self.run_id = (f"{short_name(self.workload.name)}-{short_name(self.strategy.name)}-{stamp}-"
                           f"{uuid.uuid4().hex[:4]}")
        workload = self.build_workload()
        strategy_cls = self.strategy_cls()
        options = self.strategy_options()
        replicas = strategy_cls.replicas(workers=self.workers, options=options)
        per_step = replicas * self.grad_accum
        if self.eval_every is None:  # resolved here, so spec.yaml records what ran
            self.eval_every = max(1, self.steps // 4)
        if self.batch_size is None:  # resolved here, so spec.yaml records it and workers need no registry
            self.batch_size = workload.micro_batch * per_step
        sc = self.scenario
        # ranks per node: the scenario's; embedded Ray puts every worker on this machine; a
        # cluster's placement is known only to the workers, which check it at set-up
        per_node = sc.per_node if sc is not None else None if self.cluster.address else self.workers
        nodes = {"per_node": per_node} \
            if "per_node" in inspect.signature(strategy_cls.check_job).parameters else {}  # a plugin's may not take it
        strategy_cls.check_job(workers=self.workers, workload=workload, options=options, batch_size=self.batch_size,
                               **nodes)
        if self.batch_size % per_step:
            what = f"workers({self.workers})" if replicas == self.workers else \
                f"the {replicas} data-parallel replicas of workers({self.workers})"
            raise ValueError(
                f"batch_size={self.batch_size}: must be divisible by {what} x "
                f"grad_accum({self.grad_accum}) = {per_step}"
            )
        if self.storage.startswith("memory://") and (self.checkpoint_every or self.resume):
            raise ValueError(f"storage={self.storage!r}: checkpoints are written by the workers, which cannot see "
                             f"this process's memory:// filesystem; use a path or a shared URL (s3://, ...)")
        if self.scenario is not None:
            self.scenario.check(self.workers)
        for inj in self.inject:
            if inj.rank is not None and inj.rank >= self.workers:
                raise ValueError(f"inject={str(inj)!r}: rank={inj.rank} is outside the world (workers={self.workers}: "
                                 f"ranks 0..{self.workers - 1})")
            if inj.step is not None and inj.step > self.steps:
                raise ValueError(f"inject={str(inj)!r}: step={inj.step} is after the last step (steps={self.steps})")
        if self.failure.min_workers > self.workers:
            raise ValueError(f"failure.min_workers={self.failure.min_workers}: more than workers={self.workers}")
        needs_uneven = self.straggler.mitigation in ("rebalance", "backup", "evict") or self.failure.elastic
        if needs_uneven and not strategy_cls.uneven_batches:
            what = f"straggler.mitigation={self.straggler.mitigation!r}" if self.straggler.mitigation != "none" \
                else "failure.elastic=true"
            raise ValueError(f"{what}: strategy {self.strategy.name!r} cannot train uneven per-rank batches "
                             f"(strategies that can: those with uneven_batches, e.g. ddp, fsdp)")
        return self

    def dataset_too_small(self, n_samples: int) -> str:
        """The one-line error for one step's batch needing more samples than the
        dataset holds, naming what the user set (a workload option, or batch_size)."""
        # a batch of micro_batch x replicas x grad_accum is what the workload's options make it
        # (given or not: spec.yaml records it resolved, and a spec read back must equal its original)
        from_workload = self.batch_size == self.micro_batch * self.replicas * self.grad_accum
        why = f"batch_size={self.batch_size}"
        if from_workload:
            why += (f" = workload.micro_batch({self.micro_batch}) x {self.replicas} replicas x "
                    f"grad_accum({self.grad_accum})")
        data = ", ".join(f"workload.{k}={v!r}" for k, v in self.workload.options.items())
        if data and from_workload:  # the workload options set made the batch or the dataset
            return f"{data}: one step's {why} needs more than the dataset's {n_samples} training samples"
        return f"{why}: larger than the dataset ({n_samples} training samples{' with ' + data if data else ''})"

    def _optim_config(self):
        from strategies import OptimConfig

        if not isinstance(self.optim, (dict, OptimConfig)):
            raise ValueError(f"optim={self.optim!r}: expected a section of optim.* options (e.g. optim.lr=3e-3)")
        try:
            return OptimConfig.model_validate(self.optim)
        except ValidationError as e:
            raise ValueError(format_validation_error(e, "optim.")) from None

    # -- resolved views (cheap; rebuilt where needed, so the spec pickles as plain data) --
    @property
    def scenario_name(self) -> str:
        """The scenario as the user writes it (``local``: none)."""
        return "local" if self.scenario is None else str(self.scenario)

    def build_workload(self) -> Workload:
        from workloads import WORKLOADS

        cls = WORKLOADS.get(self.workload.name)
        try:
            return _finite(cls(**self.workload.options), "workload.")
        except ValidationError as e:
            raise ValueError(format_validation_error(e, "workload.")) from None

    def strategy_cls(self) -> type[Strategy]:
        from strategies import STRATEGIES

        return STRATEGIES.get(self.strategy.name)

    def strategy_options(self) -> BaseModel:
        try:
            return _finite(self.strategy_cls().Options(**self.strategy.options), "strategy.")
        except ValidationError as e:
            raise ValueError(format_validation_error(e, "strategy.")) from None

    @property
    def snapshots_needed(self) -> bool:
        """In-memory snapshots are only worth their cost when something may restore them."""
        f = self.failure
        return f.snapshots and (f.max_failures > 0 or f.nan == "rollback" or self.straggler.mitigation == "evict")

    @property
    def global_batch(self) -> int:
        return self.batch_size

    @property
    def replicas(self) -> int:
        return self.strategy_cls().replicas(workers=self.workers, options=self.strategy_options())

    @property
    def micro_batch(self) -> int:
        """Samples per replica per accumulation step."""
        return self.global_batch // (self.replicas * self.grad_accum)

    def worker_sources(self) -> list[str]:
        """Local files or packages the workers need to import this job's plugins."""
        if not any(":" in c.name for c in (self.workload, self.strategy)):
            return []  # built-in names (is_ref): no import of the registries, which import torch
        from workloads.plugins import is_ref, local_sources

        refs = [c.name for c in (self.workload, self.strategy) if is_ref(c.name)]
        return sorted({p for ref in refs for p in local_sources(ref)})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. strategy.bucket_mb=10")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set a.b=value`` items to ``data`` in place (and return it); a name
    shorthand (``workload: gpt-tiny``) becomes ``{name: gpt-tiny}`` when an option is set."""
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for p in path[:-1]:
            cur = node.get(p)
            if isinstance(cur, str) and p in ("workload", "strategy"):
                cur = {"name": cur}
            if cur is None:
                cur = {}
            if not isinstance(cur, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is not a section (it holds {cur!r})")
            node[p] = cur
            node = cur
        node[path[-1]] = value
    return data


def load_spec(
    *, config: str | None = None, overrides: list[str] = (), **fields: Any
) -> JobSpec:
    """Merge a YAML/TOML file, then ``fields`` (CLI flags; None means unset), then ``--set`` overrides."""
    data: dict[str, Any] = {}
    if config:
        data = read_config_file(config)
    for k, v in fields.items():
        if v is None:
            continue
        if k in ("workload", "strategy") and isinstance(data.get(k), dict):
            data[k] = {**data[k], "name": v}
        else:
            data[k] = v
    apply_overrides(data, overrides)
    for key in ("workload", "strategy"):
        if key not in data:
            raise ConfigError(f"invalid job spec: {key}: required (give --{key} NAME or set it in --config)")
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise ConfigError(f"invalid job spec: {unknown[0]}: unknown key (allowed: {', '.join(_TOP_KEYS)})")
    return JobSpec(**data)


def read_config_file(path: str) -> dict[str, Any]:
    import fsspec

    try:
        with fsspec.open(path, "rb") as f:
            raw = f.read()
    except (FileNotFoundError, OSError) as e:
        raise ConfigError(f"--config {path!r}: cannot read ({e.strerror or e})") from None
    try:
        if path.endswith(".toml"):
            import tomllib

            data = tomllib.loads(raw.decode())
        else:
            data = yaml.safe_load(raw)
    except Exception as e:  # yaml.YAMLError, tomllib.TOMLDecodeError
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"--config {path!r}: malformed ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path!r}: expected a mapping at the top level, got {type(data).__name__}")
    return data


@dataclass(frozen=True, kw_only=True)
class ProjectOn:
    """The cluster a report projects its runs on (``--project-on``, ``--project-speed``); here,
    not in the report, so that the command line checks it without importing pandas."""

    scenario: str | None = None  # None: the report's first scenario; "none": no projection
    speed: float | None = None
    workers: tuple[int, ...] = (8, 64, 1024)
