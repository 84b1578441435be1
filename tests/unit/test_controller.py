"""The controller and its policies, driven one poll at a time by a fake worker group (no Ray)."""
import io

import pytest

from cluster.faults import parse_injection
from orchestrator.config import JobSpec
from orchestrator.controller import (
    Controller, ControllerOptions, GroupStatus, RunFailed, laggard, presumed_fired, renumber, root_cause,
)
from orchestrator.messages import Attempt, Begin, Broken, Drop, Live, Row, Shares, SnapshotPart
from orchestrator.metrics import MetricsLog
from orchestrator.policies import (
    Failure, FailurePolicy, StragglerPolicy, StragglerState, hang_deadline_s, per_replica,
)
from orchestrator.progress import Progress
from orchestrator.storage import RunFolder

W = {"name": "gpt-tiny", "n_layers": 1, "d_model": 32, "seq_len": 32}


class FakeGroup:
    """Each poll is one step: every rank reports it (0.1 s of compute per sample,
    times the factor of a slow injection), a snapshot every ``snap`` steps,
    until ``script`` says otherwise.
    ``script(attempt, step) -> None | ('error', rank, msg) | ('hang', rank) | ('nan',)``."""

    def __init__(self, world_log: list, steps: int, script=lambda a, s: None, snap: int = 2):
        self.world_log, self.steps, self.script, self.snap = world_log, steps, script, snap
        self.controls: list[dict] = []

    def start(self, attempt: Attempt) -> None:
        self.a = attempt
        self.world_log.append(attempt)
        self.step = (attempt.snapshot_step if hasattr(attempt, "snapshot_step") else None) or _restored(attempt)
        self.shares = attempt.shares or [8 // attempt.world] * attempt.world
        self.hung = False
        # slow workers are the attempt's slow injections, as on real workers
        self.speed = {i.rank: 0.1 * i.factor for i in attempt.injections if i.kind == "slow"}

    def poll(self) -> GroupStatus:
        if self.step >= self.steps:
            return GroupStatus(finished=set(range(self.a.world)))
        if self.hung:
            return GroupStatus()
        nxt = self.step + 1
        for c in self.controls:
            if isinstance(c, Shares) and c.step == nxt:
                self.shares = list(c.shares)
        what = self.script(self.a, nxt)
        if what and what[0] == "error":
            return GroupStatus(errors={what[1]: what[2], **({0: "rank 0 failed: gloo: Connection closed by peer"}
                                                            if what[1] != 0 else {})})
        if what and what[0] == "every":  # every rank raises the same error
            return GroupStatus(errors={r: f"rank {r} failed: {what[1]}" for r in range(self.a.world)})
        if what and what[0] == "hang":
            self.hung = True
            return GroupStatus(rows=[Begin(step=nxt, rank=r) for r in range(self.a.world) if r != what[1]])
        if what and what[0] in ("hang_in", "timeout"):  # every rank began; rank what[1] entered fewer calls
            hung, ops = what[1], what[2]
            rows = [Begin(step=nxt, rank=r) for r in range(self.a.world)]
            rows += [Live(progress={"step": nxt, "ops": ops if r == hung else 3, "op": "all_reduce", "in_flight": 1},
                          rank=r) for r in range(self.a.world)]
            if what[0] == "hang_in":
                self.hung = True
                return GroupStatus(rows=rows)
            gloo = "RuntimeError: [../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 30000ms"
            return GroupStatus(rows=rows, errors={r: f"rank {r} failed: {gloo}" for r in range(self.a.world) if r != hung})
        rows = []
        for r in range(self.a.world):
            n = self.shares[r * len(self.shares) // self.a.world]  # shares are per replica of consecutive ranks
            loss = float("nan") if what and what[0] == "nan" else 2.0
            rows.append(Row(values={"step": nxt, "rank": r, "loss": loss, "samples": n, "tokens": 0,
                                    "step_time_s": 1.0, "compute_s": self.speed.get(r, 0.1) * n,
                                    "wall_time": float(nxt)}))
            if nxt % self.snap == 0:
                rows.append(SnapshotPart(rank=r, step=nxt, seconds=0.1, handle=f"a{self.a.number}-s{nxt}-r{r}"))
        self.step = nxt
        return GroupStatus(rows=rows)

    def control(self, msg: dict) -> None:
        self.controls.append(msg)

    def shutdown(self) -> None:
        pass


def _restored(attempt: Attempt) -> int:
    if attempt.snapshot:
        return int(attempt.snapshot[0].split("-s")[1].split("-")[0])
    return 0


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 1.0  # every look at the clock is a second later
        return self.t


def make(tmp_path, *, steps=8, world=2, script=lambda a, s: None, checkpoint=None, strategy="ddp", batch_size=8,
         **spec_kw):
    spec = JobSpec(workload=W, strategy=strategy, workers=world, steps=steps, batch_size=batch_size,
                   storage=str(tmp_path), run_id="r", **spec_kw)
    attempts: list[Attempt] = []
    group = FakeGroup(attempts, steps, script)
    log = MetricsLog(RunFolder(spec.storage, spec.run_id), run_id="r", workload="w", strategy="ddp", scenario="local")
    log.folder.create(spec.to_yaml())
    newest = lambda before=None: checkpoint if checkpoint is None or before is None or checkpoint[0] < before \
        else None  # noqa: E731
    ctl = Controller(spec, lambda: group, log, Progress(steps, enabled=False, stream=io.StringIO()),
                     first=Attempt(world=world, injections=list(spec.inject)),
                     options=ControllerOptions(clock=Clock(), sleep=lambda s: None, grace_s=0.5, newest_checkpoint=newest))
    return ctl, attempts, group, log


def kinds(log):
    return [e["kind"] for e in log.events]


def test_a_clean_run_finishes(tmp_path):
    ctl, attempts, _, log = make(tmp_path)
    loss, _ = ctl.run()
    assert ctl.state == "finished" and loss == 2.0 and len(attempts) == 1
    assert {r["step"] for r in log.rows} == set(range(1, 9))


def test_the_controller_steps_one_tick_at_a_time(tmp_path):
    ctl, attempts, _, log = make(tmp_path, steps=2)
    assert ctl.state == "starting" and attempts == []
    assert ctl.tick() == "running" and len(attempts) == 1  # the first tick starts the group
    assert ctl.tick() == "running" and ctl.completed == 1  # one poll: every rank's row of step 1
    assert ctl.tick() == "running" and ctl.completed == 2
    assert ctl.tick() == "finished" and ctl.group is None  # every rank returned: the group is shut down
    assert [(r["step"], r["rank"]) for r in log.rows] == [(1, 0), (1, 1), (2, 0), (2, 1)]


def test_a_failure_restarts_on_the_next_tick(tmp_path):
    script = lambda a, s: ("error", 1, "rank 1 failed: RuntimeError: boom") if a.number == 0 and s == 2 else None
    ctl, attempts, _, log = make(tmp_path, steps=3, script=script, failure={"max_failures": 1, "backoff_s": 0})
    assert [ctl.tick() for _ in range(3)] == ["running", "running", "restarting"]  # both ranks' errors: at once
    assert len(attempts) == 1 and ctl.group is None and "decision:restart" in kinds(log)
    assert ctl.tick() == "running" and [a.number for a in attempts] == [0, 1]
    while ctl.tick() != "finished":
        pass
    assert ctl.completed == 3


def test_messages_are_told_apart_by_their_type_not_their_keys(tmp_path):
    ctl, _, group, _ = make(tmp_path, steps=2)
    ctl.tick()
    group.poll = lambda: GroupStatus(rows=[{"begin": 1, "rank": 0}])
    with pytest.raises(TypeError, match="a rank sent dict"):
        ctl.tick()


def test_the_controller_imports_neither_torch_nor_a_strategy():
    import subprocess
    import sys

    code = "import sys, orchestrator.controller; print(sorted(m for m in ('torch', 'strategies', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_dead_worker_restarts_from_the_newest_whole_snapshot(tmp_path):
    script = lambda a, s: ("error", 1, "rank 1 failed: its worker process died (ActorDiedError)") \
        if a.number == 0 and s == 6 else None
    ctl, attempts, _, log = make(tmp_path, script=script, failure={"max_failures": 1},
                                 inject=["kill:rank=1,step=6"])
    # the kill's report died with the worker: the controller still knows it fired
    ctl.run()
    assert ctl.state == "finished" and len(attempts) == 2
    second = attempts[1]
    assert second.number == 1 and second.world == 2
    assert second.snapshot == ["a0-s4-r0", "a0-s4-r1"]  # step 5 completed, but the newest snapshot is step 4
    assert second.injections == []  # a fault fires once per run
    assert kinds(log).count("failure:died") == 1 and "decision:restart" in kinds(log) and "recovered" in kinds(log)
    # step 5 was run twice; both kept, tagged with their attempt
    assert sorted(r["attempt"] for r in log.rows if r["step"] == 5 and r["rank"] == 0) == [0.0, 1.0]


def test_an_injected_kill_is_named_as_such(tmp_path):
    script = lambda a, s: ("error", 1, "rank 1 failed: its worker process died (killed from outside by a signal)") \
        if a.number == 0 and s == 6 else None
    ctl, _, _, log = make(tmp_path, script=script, failure={"max_failures": 1}, inject=["kill:rank=1,step=6"])
    ctl.run()
    died = next(e for e in log.events if e["kind"] == "failure:died")
    assert died["detail"] == "rank 1 failed: its worker process died (injected kill:rank=1,step=6)"


def test_ray_exit_details_become_a_few_words():
    from orchestrator.driver import death_cause

    sigkill = "Worker unexpectedly exits with a connection error code 2. End of file. Some common causes include: " \
        "(1) the process was killed by the OOM killer due to high memory usage, (2) ray stop --force was called"
    assert death_cause(sigkill) == "killed from outside by a signal (SIGKILL, the OOM killer) or exited abruptly"
    assert death_cause("Worker exits unexpectedly. Worker exits with an exit code 1. The process receives a SIGTERM.") \
        == "killed from outside: SIGTERM"
    assert death_cause("Worker exits unexpectedly. Worker exits with an exit code 3.") == "exited with code 3"


def test_an_error_is_one_line_with_what_its_first_line_announces():
    from orchestrator.driver import one_line

    assert one_line("ValueError: bad\n  at frame\n") == "ValueError: bad"
    text = "Error(s) in loading state_dict for GPT:\n\tMissing key(s): \"head.weight\".\n"
    assert one_line(text) == 'Error(s) in loading state_dict for GPT: Missing key(s): "head.weight".'
    assert len(one_line("x:\n" + "y" * 1000)) == 300 and one_line("") == ""


def test_the_raylets_worker_death_advice_is_not_printed(monkeypatch, capsys):
    from ray._private import worker

    from cluster.runtime import quiet_worker_deaths

    monkeypatch.setattr(worker, "print_to_stdstream", worker.print_to_stdstream)  # restored after the test
    quiet_worker_deaths()
    quiet_worker_deaths()  # once only
    died = "A worker died or was killed while executing a task by an unexpected system error. ... (1) the process " \
        "was killed by the OOM killer due to high memory usage, (2) ray stop --force was called"
    worker.print_to_stdstream({"lines": [died], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    worker.print_to_stdstream({"lines": ["a placement group is pending"], "pid": "raylet", "is_err": False},
                              ignore_prefix=False)
    out = capsys.readouterr().out
    assert "OOM killer" not in out and "a placement group is pending" in out


def test_faults_whose_report_was_lost_are_presumed_fired():
    inj = [parse_injection(t) for t in ("kill:rank=1,step=6", "hang:rank=0,step=9", "kill:rank=0,step=4,at=checkpoint",
                                        "nan:step=3", "slow:rank=1,factor=2")]
    presumed = lambda *a, **kw: {str(i) for i in presumed_fired(*a, **kw)}  # noqa: E731
    died = Failure(kind="died", rank=1, step=5, message="")
    assert presumed(inj, died, 5) == {"kill:rank=1,step=6", "kill:rank=0,step=4,at=checkpoint", "nan:step=3"}
    hung = Failure(kind="hang", rank=0, step=8, message="")
    assert presumed(inj, hung, 8) == {"kill:rank=1,step=6", "hang:rank=0,step=9",
                                            "kill:rank=0,step=4,at=checkpoint", "nan:step=3"}
    in_ckpt = Failure(kind="died", rank=0, step=4, message="")
    assert presumed(inj, in_ckpt, 4) == {"kill:rank=0,step=4,at=checkpoint", "nan:step=3"}
    other = Failure(kind="died", rank=1, step=4, message="")  # rank 0 may not have reached its checkpoint kill
    assert presumed(inj, other, 4) == {"nan:step=3"}
    # the dying rank's report of step 5 was lost with it, but its peer began step 6
    assert presumed(inj, died, 4, began=6) == {"kill:rank=1,step=6", "nan:step=3"}
    assert presumed(inj, died, 4, began=4) == {"nan:step=3"}  # it cannot have reached step 6


def test_the_root_cause_is_named_not_the_echo(tmp_path):
    script = lambda a, s: ("error", 1, "rank 1 failed: RuntimeError: boom") if s == 3 else None
    ctl, _, _, log = make(tmp_path, script=script)  # max_failures=0 by default
    with pytest.raises(RunFailed, match="rank 1 failed: RuntimeError: boom"):
        ctl.run()
    assert ctl.state == "errored"
    assert [r["step"] for r in log.rows if r["rank"] == 0] == [1, 2]  # what was written is kept
    assert root_cause({0: "rank 0 failed: gloo: connection reset", 2: "rank 2 failed: ValueError: x"})[0] == 2


def test_exhausting_max_failures_raises_with_the_cause(tmp_path):
    script = lambda a, s: ("error", 1, "rank 1 failed: RuntimeError: always") if s == 3 else None
    ctl, attempts, _, _ = make(tmp_path, script=script, failure={"max_failures": 2, "backoff_s": 1})
    with pytest.raises(RunFailed, match=r"always .*3 failures, more than failure.max_failures=2"):
        ctl.run()
    assert len(attempts) == 3


def test_a_hang_is_detected_and_names_the_rank_that_never_started(tmp_path):
    script = lambda a, s: ("hang", 0) if a.number == 0 and s == 5 else None
    ctl, attempts, _, log = make(tmp_path, script=script, failure={"max_failures": 1, "hang_floor_s": 5})
    ctl.run()
    hang = next(e for e in log.events if e["kind"] == "failure:hang")
    assert hang["rank"] == 0 and "rank 0 never started step 5" in hang["detail"]
    assert attempts[1].snapshot == ["a0-s4-r0", "a0-s4-r1"]


def test_a_rank_hung_inside_a_step_is_named_and_elastic_drops_only_it(tmp_path):
    # every rank began step 5; rank 2 entered 1 communication call, its peers 3 (they wait for it)
    script = lambda a, s: ("hang_in", 2, 1) if a.number == 0 and s == 5 else None
    ctl, attempts, _, log = make(tmp_path, world=4, script=script, inject=["slow:rank=3,factor=1.5"],
                                 failure={"max_failures": 1, "hang_floor_s": 5, "elastic": True})
    ctl.run()
    hang = next(e for e in log.events if e["kind"] == "failure:hang")
    assert hang["rank"] == 2 and "rank 2 stopped after 1 communication calls of step 5" in hang["detail"]
    assert "peers wait in all_reduce" in hang["detail"]
    assert attempts[1].world == 3 and attempts[1].injections == [parse_injection("slow:rank=2,factor=1.5")]  # rank 3 moved down


def test_peers_timing_out_blame_the_rank_they_waited_for_not_the_lowest(tmp_path):
    script = lambda a, s: ("timeout", 2, 1) if a.number == 0 and s == 5 else None
    ctl, attempts, _, log = make(tmp_path, world=4, script=script, failure={"max_failures": 1, "elastic": True})
    ctl.run()
    failure = next(e for e in log.events if e["kind"].startswith("failure:"))
    assert failure["kind"] == "failure:hang" and failure["rank"] == 2 and attempts[1].world == 3
    # one line per rank, saying whom it waited on, without gloo's source path
    errors = {e["rank"]: e["detail"] for e in log.events if e["kind"] == "worker_error"}
    assert errors == {r: "peer lost: waiting on rank 2 in all_reduce (RuntimeError: Timed out waiting 30000ms)" for r in (0, 1, 3)}


def test_when_no_rank_is_proven_bad_elastic_restarts_at_the_same_size(tmp_path):
    script = lambda a, s: ("timeout", 2, 3) if a.number == 0 and s == 5 else None  # rank 2 is where the others are
    ctl, attempts, _, log = make(tmp_path, world=4, script=script, failure={"max_failures": 1, "elastic": True})
    ctl.run()
    failure = next(e for e in log.events if e["kind"].startswith("failure:"))
    assert failure["rank"] == -1 and "none shown to be the cause" in failure["detail"]
    assert [a.world for a in attempts] == [4, 4]


def test_an_error_every_rank_raises_alike_blames_none_and_elastic_keeps_them_all(tmp_path):
    corrupt = "CheckpointError: /r/checkpoints/step_4/state/__0_0.distcp: does not match the manifest"
    script = lambda a, s: ("every", corrupt) if a.number == 0 and s == 5 else None
    ctl, attempts, _, log = make(tmp_path, world=4, script=script, failure={"max_failures": 1, "elastic": True})
    ctl.run()
    failure = next(e for e in log.events if e["kind"].startswith("failure:"))
    assert failure["rank"] == -1 and failure["detail"].startswith("every rank failed alike: CheckpointError")
    assert [a.world for a in attempts] == [4, 4]  # no healthy rank dropped


def test_laggard_is_named_only_when_proven():
    live = lambda *ops: {r: {"step": 5, "ops": n, "op": "all_gather"} for r, n in enumerate(ops)}
    assert laggard({0: 5, 1: 4, 2: 5}, {}, 3, 4) == (1, "never started step 5")
    assert laggard({}, {}, 3, 4) is None  # all at the completed step: a tie
    assert laggard({0: 5, 1: 5, 2: 5}, live(4, 2, 4), 3, 4)[0] == 1
    assert laggard({0: 5, 1: 5, 2: 5}, live(4, 2, 2), 3, 4) is None  # a tie for last
    assert laggard({0: 5, 1: 5, 2: 5}, {0: {"step": 5, "ops": 4}, 1: {"step": 5, "ops": 2}}, 3, 4) is None  # 2 silent
    assert laggard({0: 5, 1: 5}, {0: {"step": 5, "ops": 4}, 1: {"step": 4, "ops": 0}}, 2, 4) is None  # stale


def test_the_hang_deadline_fires_before_the_collective_timeout():
    f = JobSpec(workload=W, strategy="ddp", failure={"hang_floor_s": 60, "hang_factor": 10}).failure
    assert hang_deadline_s(f, [1.0], startup_s=300, collective_timeout_s=300) == 60  # the floor
    assert hang_deadline_s(f, [20.0], startup_s=300, collective_timeout_s=300) == 200  # 10 x the median step
    assert hang_deadline_s(f, [40.0], startup_s=300, collective_timeout_s=300) == 240  # capped: 0.8 x 300
    assert hang_deadline_s(f, [], startup_s=300, collective_timeout_s=300) == 240  # the first step too
    assert hang_deadline_s(f, [1.0], startup_s=50, collective_timeout_s=50) == 40  # below the floor if it must


@pytest.mark.parametrize("policy", ["skip", "rollback", "fail"])
def test_nan_policies(tmp_path, policy):
    script = lambda a, s: ("nan",) if a.number == 0 and s == 5 else None
    ctl, attempts, _, log = make(tmp_path, script=script, failure={"nan": policy, "max_failures": 1})
    if policy == "fail":
        with pytest.raises(RunFailed, match="non-finite loss at step 5"):
            ctl.run()
        return
    ctl.run()
    assert "nan_loss" in kinds(log)
    assert len(attempts) == (2 if policy == "rollback" else 1)
    if policy == "rollback":
        assert attempts[1].snapshot == ["a0-s4-r0", "a0-s4-r1"]


def test_nan_skip_fails_after_max_nan_steps_in_a_row(tmp_path):
    script = lambda a, s: ("nan",) if 3 <= s <= 5 or 7 <= s <= 12 else None  # 3 in a row, then 6
    ctl, attempts, _, log = make(tmp_path, steps=20, script=script, failure={"max_nan_steps": 4, "max_failures": 3})
    with pytest.raises(RunFailed, match=r"non-finite loss at step 10 \(rank 0\), 4 steps in a row since step 7 "
                                        r"\(failure.nan='skip' allows failure.max_nan_steps=4 in a row\)"):
        ctl.run()
    assert len(attempts) == 1 and ctl.state == "errored"
    assert kinds(log).count("nan_loss") == 7 and "failure:nan" in kinds(log)


def test_nan_skip_below_max_nan_steps_finishes(tmp_path):
    script = lambda a, s: ("nan",) if 3 <= s <= 6 else None
    ctl, _, _, log = make(tmp_path, script=script)  # the default allows 5 in a row
    ctl.run()
    assert ctl.state == "finished" and kinds(log).count("nan_loss") == 4


def test_max_nan_steps_is_at_least_one():
    from orchestrator.config import ConfigError

    with pytest.raises(ConfigError, match=r"failure.max_nan_steps=0"):
        JobSpec(workload=W, strategy="ddp", workers=2, failure={"max_nan_steps": 0})


@pytest.mark.parametrize("checkpoint", [None, (6, "file:///ck/step_6")])
def test_nan_rollback_restores_state_older_than_the_nan_step(tmp_path, checkpoint):
    # the snapshot (and checkpoint) of step 6 hold the non-finite step 6: step 4's is the newest usable one
    script = lambda a, s: ("nan",) if a.number == 0 and s == 6 else None
    ctl, attempts, _, log = make(tmp_path, script=script, checkpoint=checkpoint,
                                 failure={"nan": "rollback", "max_failures": 1})
    ctl.run()
    assert attempts[1].snapshot == ["a0-s4-r0", "a0-s4-r1"] and attempts[1].resume_url is None
    assert next(e for e in log.events if e["kind"] == "restart")["step"] == 4


@pytest.mark.parametrize("checkpoint", [(3, "file:///ck/step_3"), None])
def test_a_snapshot_that_cannot_be_fetched_falls_back_to_the_newest_checkpoint(tmp_path, checkpoint):
    def script(a, s):
        if a.number == 0 and s == 5:
            return "error", 1, "rank 1 failed: its worker process died (ActorDiedError)"
        if a.snapshot:  # its Keeper was lost: every rank fails to fetch it
            return "error", 0, "rank 0 failed: SnapshotLost: the in-memory snapshot cannot be fetched (KeyError)"
    ctl, attempts, _, log = make(tmp_path, script=script, checkpoint=checkpoint, failure={"max_failures": 1},
                                 inject=["kill:rank=0,step=5"])
    ctl.run()  # the lost snapshot is not a failure of the job's: max_failures=1 still suffices
    assert ctl.state == "finished" and attempts[1].snapshot == ["a0-s4-r0", "a0-s4-r1"]
    assert attempts[2].injections == [parse_injection("kill:rank=0,step=5")]  # rank 0 never reached step 5: it fires later
    assert attempts[2].snapshot is None and attempts[2].resume_url == (checkpoint[1] if checkpoint else None)
    lost = next(e for e in log.events if e["kind"] == "snapshot_lost")
    assert lost["step"] == 4 and "SnapshotLost" in lost["detail"]
    restart = [e for e in log.events if e["kind"] == "restart"][-1]
    assert restart["step"] == (3 if checkpoint else 0)


def test_a_newer_checkpoint_wins_over_an_older_snapshot(tmp_path):
    script = lambda a, s: ("error", 1, "rank 1 failed: its worker process died") if a.number == 0 and s == 6 else None
    ctl, attempts, _, _ = make(tmp_path, script=script, failure={"max_failures": 1}, checkpoint=(5, "file:///ck/step_5"))
    ctl.run()
    assert attempts[1].resume_url == "file:///ck/step_5" and attempts[1].snapshot is None


def test_elastic_shrinks_and_faults_follow_their_workers(tmp_path):
    script = lambda a, s: ("error", 1, "rank 1 failed: its worker process died") if a.number == 0 and s == 3 else None
    ctl, attempts, _, _ = make(tmp_path, world=4, script=script, inject=["slow:rank=3,factor=2"],
                               failure={"max_failures": 1, "elastic": True})
    ctl.run()
    assert attempts[1].world == 3 and attempts[1].injections == [parse_injection("slow:rank=2,factor=2")]
    assert [str(i) for i in renumber([parse_injection(t) for t in ("kill:rank=1,step=3", "nan:step=4",
                                                                   "slow:rank=0,factor=2")], 1)] == \
        ["nan:step=4", "slow:rank=0,factor=2"]


def test_rebalance_gives_the_slow_rank_a_smaller_share(tmp_path):
    ctl, attempts, group, log = make(tmp_path, steps=30, inject=["slow:rank=1,factor=3"],
                                     straggler={"mitigation": "rebalance", "patience": 3, "window": 4})
    ctl.run()
    msg = next(c for c in group.controls if isinstance(c, Shares))
    assert msg.shares == (6, 2) and msg.step > 4  # 3x slower -> a quarter of the batch
    assert "straggler" in kinds(log) and "decision:rebalance" in kinds(log)


def test_backup_drops_the_late_gradient(tmp_path):
    ctl, _, group, _ = make(tmp_path, world=4, steps=30, inject=["slow:rank=2,factor=4"],
                            straggler={"mitigation": "backup", "patience": 3, "window": 4})
    ctl.run()
    assert next(c for c in group.controls if isinstance(c, Drop)).ranks == (2,)


def test_evict_restarts_without_the_straggler(tmp_path):
    ctl, attempts, _, log = make(tmp_path, world=4, steps=30, inject=["slow:rank=2,factor=4"],
                                 straggler={"mitigation": "evict", "patience": 3, "window": 4})
    ctl.run()
    assert [a.world for a in attempts] == [4, 3] and attempts[1].injections == []
    assert attempts[1].shares == [3, 3, 2]  # the global batch of 8 does not divide by 3
    assert "evict" in kinds(log)


@pytest.mark.parametrize("strategy, batch_size, replicas", [
    ({"name": "sequence", "ulysses": 2}, 1, 1),  # the README's tour: ulysses x ring = 4 ranks, one replica
    ({"name": "sequence", "ulysses": 2, "ring": 1}, 2, 2),
    ({"name": "pipeline", "stages": 2, "microbatches": 2}, 4, 2),  # pipeline x dp
])
def test_batch_shares_are_per_replica_not_per_rank(tmp_path, strategy, batch_size, replicas):
    ctl, attempts, _, log = make(tmp_path, world=4, steps=3, strategy=strategy, batch_size=batch_size)
    ctl.run()
    assert ctl.state == "finished" and len(attempts) == 1
    assert ctl._straggle.shares == (batch_size // replicas,) * replicas
    assert ctl._straggle.ranks_per_replica == 4 // replicas


def test_evict_never_shrinks_below_min_workers(tmp_path):
    ctl, attempts, _, log = make(tmp_path, world=4, steps=30, inject=["slow:rank=2,factor=4"],
                                 straggler={"mitigation": "evict", "patience": 3, "window": 4},
                                 failure={"min_workers": 4})
    ctl.run()
    assert ctl.state == "finished" and [a.world for a in attempts] == [4] and "evict" not in kinds(log)
    keep = [e for e in log.events if e["kind"] == "decision:keep"]
    assert len(keep) == 1 and "rank 2 stays" in keep[0]["detail"] and "failure.min_workers=4" in keep[0]["detail"]


# -- policies alone -------------------------------------------------------------------------------


def test_rebalance_is_over_replicas_a_replica_as_slow_as_its_slowest_rank():
    spec = JobSpec(workload=W, strategy="ddp", workers=4, steps=5,
                   straggler={"mitigation": "rebalance", "patience": 3, "window": 3})
    pol = StragglerPolicy(spec.straggler, global_batch=16)
    slow3 = {0: 1.0, 1: 1.0, 2: 1.0, 3: 3.0}  # rank 3 is in replica 1 (ranks 2, 3)
    d = pol.make_decision(StragglerState(shares=(8, 8), ranks_per_replica=2, history=[slow3] * 3), step=10)
    assert d.action == "rebalance" and d.stragglers == (3,) and d.shares == (12, 4)
    assert per_replica([slow3, {0: 2.0, 2: 1.0}], 2) == [{0: 1.0, 1: 3.0}, {0: 2.0, 1: 1.0}]



def test_failure_policy_decisions():
    spec = JobSpec(workload=W, strategy="ddp", workers=4, steps=5, failure={"max_failures": 2, "backoff_s": 1,
                                                                          "elastic": True, "min_workers": 3})
    p = FailurePolicy(spec.failure)
    died = Failure(kind="died", rank=2, step=3, message="x")
    d1 = p.make_decision(died, failures=1, world=4)
    assert (d1.action, d1.world, d1.backoff_s) == ("restart", 3, 1.0)
    d2 = p.make_decision(died, failures=2, world=3)  # would go below min_workers: replace instead
    assert (d2.action, d2.world, d2.backoff_s) == ("restart", 3, 2.0)
    assert p.make_decision(died, failures=3, world=3).action == "raise"


def test_stragglers_need_patience_and_rebalance_is_proportional_to_speed():
    spec = JobSpec(workload=W, strategy="ddp", workers=4, steps=5, straggler={"patience": 3, "window": 3})
    pol = StragglerPolicy(spec.straggler, global_batch=32)
    fast, slow = {0: 1.0, 1: 1.0, 2: 1.0, 3: 3.0}, {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}
    assert pol.stragglers([fast, fast, slow]) == []  # not 3 in a row
    assert pol.stragglers([fast, fast, fast]) == [3]
    assert pol.rebalanced([fast] * 3, 4) == (10, 10, 9, 3) and sum(pol.rebalanced([fast] * 3, 4)) == 32
    state = StragglerState(shares=(8, 8, 8, 8), history=[fast] * 3)
    assert pol.make_decision(state, step=10).action == "none"  # mitigation none: detection only


def test_bad_failure_and_straggler_input_is_one_line():
    from orchestrator.config import ConfigError

    with pytest.raises(ConfigError, match=r"failure.snapshot_every=0"):
        JobSpec(workload=W, strategy="ddp", workers=2, failure={"snapshot_every": 0})
    with pytest.raises(ConfigError, match=r"rank=2 is outside the world \(workers=2"):
        JobSpec(workload=W, strategy="ddp", workers=2, inject=["kill:rank=2,step=3"])
    with pytest.raises(ConfigError, match=r"'kill:rank=1': kill needs step"):
        JobSpec(workload=W, strategy="ddp", workers=2, inject=["kill:rank=1"])
    with pytest.raises(ConfigError, match=r"unknown kind 'explode'"):
        JobSpec(workload=W, strategy="ddp", workers=2, inject=["explode:rank=1"])
    with pytest.raises(ConfigError, match=r"'slow:rank=1,factor=x': factor='x' is not a number"):
        JobSpec(workload=W, strategy="ddp", workers=2, inject=["slow:rank=1,factor=x"])


# -- healing in place -----------------------------------------------------------------------------


class HealingGroup(FakeGroup):
    """A FakeGroup that heals in place: the same group goes on with the next attempt
    from the step it is at (the survivors' state), as a heal from a peer does; after
    the heal, its first poll still carries the survivor's echo of the loss it heals."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.heals: list[tuple[Attempt, int]] = []
        self.stale: list = []

    def heal(self, attempt: Attempt, lost: int) -> dict[str, float]:
        self.heals.append((attempt, lost))
        self.a = attempt
        self.stale = [Broken(rank=1 - lost, step=self.step, error="RuntimeError: Connection closed by peer",
                             attempt=attempt.number - 1)]
        return {"replace_s": 0.5}

    def poll(self) -> GroupStatus:
        status = super().poll()
        status.rows, self.stale = self.stale + status.rows, []
        return status


def _healing(tmp_path, script, grace_s=1000.0, strategy="ddp", **spec_kw):
    spec = JobSpec(workload=W, strategy=strategy, workers=2, steps=8, batch_size=8, storage=str(tmp_path), run_id="r",
                   **spec_kw)
    attempts: list[Attempt] = []
    group = HealingGroup(attempts, 8, script)
    log = MetricsLog(RunFolder(spec.storage, spec.run_id), run_id="r", workload="w", strategy=strategy, scenario="local")
    log.folder.create(spec.to_yaml())
    slept: list[float] = []
    ctl = Controller(spec, lambda: group, log, Progress(8, enabled=False, stream=io.StringIO()),
                     first=Attempt(world=2), options=ControllerOptions(clock=Clock(), sleep=slept.append, grace_s=grace_s))
    return ctl, attempts, group, log, slept


def _died_at(step: int, rank: int = 1):
    # Ray reported rank's worker dead; its peer has not reported anything yet
    return lambda a, s: ("died", rank) if a.number == 0 and s == step else None


def _poll_with_deaths(group):
    """Script word ('died', rank): only that rank's death, as Ray reports it."""
    base = group.poll

    def poll():
        nxt = group.step + 1
        what = group.script(group.a, nxt)
        if what and what[0] == "died":
            return GroupStatus(errors={what[1]: f"rank {what[1]} failed: its worker process died (ActorDiedError)"})
        return base()
    group.poll = poll


def test_a_dead_worker_is_known_when_ray_reports_it_not_after_a_grace(tmp_path):
    ctl, _, group, log, _ = _healing(tmp_path, _died_at(3), failure={"max_failures": 1, "heal": False})
    _poll_with_deaths(group)
    states = [ctl.tick() for _ in range(4)]  # start, steps 1 and 2, the death
    assert states == ["running", "running", "running", "restarting"]  # decided on the poll that saw it
    assert "failure:died" in kinds(log)


def test_ddp_heals_in_place_without_backoff_and_counts_the_failure(tmp_path):
    ctl, attempts, group, log, slept = _healing(tmp_path, _died_at(3), failure={"max_failures": 1, "backoff_s": 5})
    _poll_with_deaths(group)
    ctl.run()
    assert ctl.state == "finished" and len(attempts) == 1  # one group start: the heal is in place
    (attempt, lost), = group.heals
    assert lost == 1 and attempt.number == 1 and attempt.heal and attempt.world == 2 and attempt.snapshot is None
    assert slept == [] and ctl.failures == 1  # no backoff_s, but a failure counted against max_failures
    k = kinds(log)
    assert k.index("decision:heal") < k.index("heal") < k.index("heal:first_step")
    assert {"heal:detect", "heal:replace", "recovered"} <= set(k) and "restart" not in k
    heal = next(e for e in log.events if e["kind"] == "heal")
    assert heal["step"] == 2 and "rank 1 replaced" in heal["detail"]  # from the survivors' state: step 2
    assert {r["attempt"] for r in log.rows if r["step"] > 3} == {1.0}  # the stale echo did not fail attempt 1


def test_fsdp_heals_in_place_from_the_newest_snapshot(tmp_path):
    ctl, _, group, _, _ = _healing(tmp_path, _died_at(5), strategy="fsdp", failure={"max_failures": 1})
    _poll_with_deaths(group)
    ctl.run()
    (attempt, _), = group.heals
    assert attempt.heal and attempt.snapshot == ["a0-s4-r0", "a0-s4-r1"]


def test_a_heal_still_counts_against_max_failures(tmp_path):
    ctl, _, group, _, _ = _healing(tmp_path, _died_at(3), failure={"max_failures": 0})
    _poll_with_deaths(group)
    with pytest.raises(RunFailed, match="failure.max_failures=0"):
        ctl.run()
    assert group.heals == []


def test_a_strategy_that_cannot_heal_restarts_and_says_so(tmp_path):
    ctl, attempts, group, log, _ = _healing(tmp_path, _died_at(3), strategy="zero2", failure={"max_failures": 1})
    _poll_with_deaths(group)
    ctl.run()
    assert group.heals == [] and len(attempts) == 2 and "restart" in kinds(log)
    no = next(e for e in log.events if e["kind"] == "no_heal")
    assert no["detail"] == "strategy 'zero2' cannot heal in place (Strategy.heal='restart'): every worker restarts"


def test_heal_decisions():
    spec = JobSpec(workload=W, strategy="ddp", workers=4, steps=5, failure={"max_failures": 2, "backoff_s": 1})
    died = Failure(kind="died", rank=2, step=3, message="x")
    d = FailurePolicy(spec.failure).make_decision(died, failures=1, world=4, heal="peer")
    assert (d.action, d.world, d.backoff_s) == ("heal", 4, 0.0) and "replace rank 2" in d.reason
    elastic = JobSpec(workload=W, strategy="ddp", workers=4, failure={"max_failures": 2, "elastic": True}).failure
    d = FailurePolicy(elastic).make_decision(died, failures=1, world=4, heal="restore")
    assert (d.action, d.world) == ("heal", 3) and "without rank 2" in d.reason
    nobody = Failure(kind="error", rank=-1, step=3, message="x")  # no one rank to replace: every worker restarts
    assert FailurePolicy(spec.failure).make_decision(nobody, failures=1, world=4, heal="peer").action == "restart"


def test_a_heal_that_makes_no_step_falls_back_to_the_full_restart_without_counting_again(tmp_path):
    ctl, attempts, group, log, _ = _healing(tmp_path, _died_at(3), failure={"max_failures": 1})
    _poll_with_deaths(group)
    heal = group.heal

    def stuck(attempt, lost):  # a survivor never joins the re-formed group
        out = heal(attempt, lost)
        group.hung = True
        return out
    group.heal = stuck
    ctl.run()
    assert ctl.state == "finished" and len(group.heals) == 1 and len(attempts) == 2  # one heal, then one start
    assert ctl.failures == 1 and "heal_stalled" in kinds(log) and attempts[1].number == 2 and not attempts[1].heal


def test_the_settle_counts_survivors_that_broke_before_the_heal_began():
    """A survivor next to the lost rank reports Broken before Ray reports the death:
    the controller's poll reads it first, and the heal's settle must not then wait
    HEAL_SETTLE_S for it (nor replace it as stuck)."""
    import time

    from orchestrator import driver

    class Polled:  # the WorkerGroup's poll: what the ranks reported since the last one
        n = 4

        def __init__(self, batches):
            self.batches = batches

        def poll(self, timeout_s: float = 10):
            return self.batches.pop(0) if self.batches else []

    group = object.__new__(driver.RayGroup)
    group.pending, group.finished, group.spares, group._held, group._broke = {}, set(), False, [], set()
    group.wg = Polled([[Broken(rank=r, step=3, error="gloo", attempt=0) for r in (0, 2)],  # the controller's poll
                       [Broken(rank=3, step=3, error="gloo", attempt=0)]])  # during the settle
    assert {m.rank for m in group.poll().rows} == {0, 2}
    t = time.perf_counter()
    assert group._settle(lost=1, attempt=0) == []
    assert time.perf_counter() - t < driver.HEAL_SETTLE_S / 2
