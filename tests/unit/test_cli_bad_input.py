"""Bad input through the real `polytrain` command: exit 2, one line on stderr
naming the value, under 15 s, and Ray never started (so no Ray process is left).
Data that cannot hold the job is found while Ray starts (the driver checks it in
a thread meanwhile): exit 2 too, once Ray has stopped, with no Ray process left.

Each case runs the CLI's ``main`` in a fresh process forked from one that
imported polytrain once (tests/unit/cli_cases.py), so the table costs one
interpreter start, not one per case; one more test runs the whole
``python -m orchestrator.cli`` to bound the imports too. Every process has its
own RAY_TMPDIR: Ray creates ``$RAY_TMPDIR/ray`` when it starts, so its absence
proves Ray never ran (and no Ray process can be left).
"""
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN = ["run", "--workload", "gpt-tiny", "--strategy", "ddp", "--steps", "2"]
CMP = ["compare", "--workload", "gpt-tiny", "--steps", "2"]
MESH = ["run", "--workload", "gpt-tiny", "--strategy", "mesh", "--steps", "2", "--workers", "4"]
HAS_S3FS = importlib.util.find_spec("s3fs") is not None

# (id, argv, text the one line must contain); {tmp} is a fresh folder per case
CASES = [
    ("mesh-degrees-not-the-world", [*MESH, "--storage", "{tmp}", "--set", "strategy.pp=3"],
     "pp(3) = 3 must divide workers=4"),
    ("mesh-more-stages-than-blocks", [*MESH, "--storage", "{tmp}", "--set", "strategy.pp=4",
                                      "--set", "workload.n_layers=1"], "strategy.pp=4"),
    ("mesh-ulysses-not-dividing-heads", [*MESH, "--storage", "{tmp}", "--set", "strategy.sp=4", "--set",
                                         "strategy.ulysses=4", "--set", "workload.n_heads=2", "--set",
                                         "workload.d_model=32"], "strategy.ulysses=4: must divide workload.n_heads=2"),
    ("mesh-outer-on-one-node", [*MESH, "--storage", "{tmp}", "--set", "strategy.fsdp=2", "--set",
                                "strategy.outer=demo"], "strategy.outer='demo': needs at least 2 nodes"),
    ("mesh-outer-axes-across-nodes", [*MESH, "--storage", "{tmp}", "--set", "strategy.fsdp=4", "--set",
                                      "strategy.dp=1", "--set", "strategy.outer=powersgd"],
     "strategy.outer='powersgd': needs strategy.dp >= 2"),
    ("compare-unknown-strategy", [*CMP, "--strategies", "ddp,nosuch", "--out", "{tmp}/c"], "strategy='nosuch'"),
    ("compare-unknown-scenario", [*CMP, "--strategies", "ddp", "--scenarios", "local,mars", "--out", "{tmp}/c"],
     "scenario='mars'"),
    ("compare-set-into-a-value", [*CMP, "--strategies", "ddp", "--workers", "2", "--set", "workers.x=1",
                                  "--out", "{tmp}/c"], "--set 'workers.x=1': 'workers' is not a section"),
    ("compare-set-an-option-of-a-number", [*CMP, "--strategies", "ddp", "--set", "workers.x=1", "--out", "{tmp}/c"],
     "workers={{'x': 1}}: Input should be a valid integer"),
    ("run-set-into-a-value", [*RUN, "--storage", "{tmp}", "--workers", "2", "--set", "workers.x=1"],
     "--set 'workers.x=1': 'workers' is not a section"),
    ("run-set-an-option-of-a-number", [*RUN, "--storage", "{tmp}", "--set", "workers.x=1"],
     "workers={{'x': 1}}: Input should be a valid integer"),
    ("compare-bad-option-of-one-strategy", [*CMP, "--strategies", "ddp,powersgd:rank=0", "--out", "{tmp}/c"],
     "strategy.rank=0"),
    ("compare-bad-out-protocol", [*CMP, "--strategies", "ddp", "--out", "nosuchproto://c"], "nosuchproto://c"),
    ("compare-too-many-workers", [*CMP, "--strategies", "ddp", "--workers", "999", "--out", "{tmp}/c"],
     "workers=999"),
    ("compare-target-loss-nan", [*CMP, "--strategies", "ddp", "--target-loss", "nan", "--out", "{tmp}/c"],
     "--target-loss nan"),
    ("compare-repeat-zero", [*CMP, "--strategies", "ddp", "--repeat", "0", "--out", "{tmp}/c"],
     "--repeat 0: must be an integer >= 1"),
    ("compare-tune-unknown-key", [*CMP, "--strategies", "ddp", "--tune", "colour=red,blue", "--out", "{tmp}/c"],
     "colour: unknown key"),
    ("compare-tune-empty-grid", [*CMP, "--strategies", "ddp", "--tune", "optim.lr=", "--out", "{tmp}/c"],
     "--tune 'optim.lr=': empty grid"),
    ("unknown-storage-protocol", [*RUN, "--storage", "nosuchproto://x"], "storage='nosuchproto://x'"),
    pytest.param("s3-without-s3fs", [*RUN, "--storage", "s3://bucket/x"], "storage='s3://bucket/x'",
                 marks=pytest.mark.skipif(HAS_S3FS, reason="s3fs is installed")),
    ("unknown-resume-protocol", [*RUN, "--storage", "{tmp}", "--resume", "nosuch://ck"], "resume='nosuch://ck'"),
    ("too-many-workers-embedded", [*RUN, "--storage", "{tmp}", "--workers", "999"], "workers=999"),
    pytest.param("gpus-on-a-machine-without", [*RUN, "--storage", "{tmp}", "--set", "cluster.gpus_per_worker=1"],
                 "cluster.gpus_per_worker=1", marks=pytest.mark.skipif(
                     shutil.which("nvidia-smi") is not None, reason="this machine may have a GPU")),
    ("negative-seed", [*RUN, "--storage", "{tmp}", "--set", "seed=-1"], "seed=-1"),
    ("seed-past-numpy", [*RUN, "--storage", "{tmp}", "--set", f"seed={2**32}"], f"seed={2**32}"),
    ("seq-len-too-long-for-the-data", [*RUN, "--storage", "{tmp}", "--workers", "2",
                                       "--set", "workload.seq_len=100000"], "workload.seq_len=100000"),
    ("batch-larger-than-the-data", [*RUN, "--storage", "{tmp}", "--workers", "2",
                                    "--set", "batch_size=1000000"], "batch_size=1000000"),
    ("run-id-dotdot", [*RUN, "--storage", "{tmp}", "--run-id", ".."], "run_id='..'"),
    ("run-id-path", [*RUN, "--storage", "{tmp}", "--run-id", "a/b"], "run_id='a/b'"),
    ("zero-steps", [*RUN[:-2], "--steps", "0", "--storage", "{tmp}"], "steps=0"),
    ("negative-checkpoint-interval", [*RUN, "--storage", "{tmp}", "--checkpoint-every", "-1"],
     "checkpoint_every=-1"),
    ("zero-keep-checkpoints", [*RUN, "--storage", "{tmp}", "--set", "keep_checkpoints=0"], "keep_checkpoints=0"),
    ("infinite-hang-floor", [*RUN, "--storage", "{tmp}", "--set", "failure.hang_floor_s=.inf"],
     "failure.hang_floor_s=inf"),
    ("infinite-strategy-option", [*RUN, "--storage", "{tmp}", "--set", "strategy.bucket_mb=.inf"],
     "strategy.bucket_mb=inf"),
    ("adamw-beta-out-of-range", [*RUN, "--storage", "{tmp}", "--set", "optim.betas=[0.9,1.5]"], "optim.betas.1=1.5"),
    ("bad-enum", [*RUN, "--storage", "{tmp}", "--set", "failure.nan=maybe"], "failure.nan='maybe'"),
    ("bad-straggler-flag", [*RUN, "--storage", "{tmp}", "--straggler", "sometimes"],
     "straggler.mitigation='sometimes'"),
    ("unknown-key", [*RUN, "--storage", "{tmp}", "--set", "colour=red"], "colour: unknown key"),
    ("wrong-type", [*RUN, "--storage", "{tmp}", "--set", "workers=many"], "workers='many'"),
    ("argparse-type", [*RUN, "--storage", "{tmp}", "--workers", "two"], "'two'"),
    ("bad-injection", [*RUN, "--storage", "{tmp}", "--inject", "explode:rank=0"], "explode"),
    ("injection-outside-the-world", [*RUN, "--storage", "{tmp}", "--inject", "kill:rank=5,step=1"], "rank=5"),
    ("injection-key-twice", [*RUN, "--storage", "{tmp}", "--inject", "kill:rank=0,step=1,step=2"],
     "step given twice"),
    ("injection-infinite-delay", [*RUN, "--storage", "{tmp}", "--inject", "netdelay:rank=0,ms=inf"], "ms='inf'"),
    ("bad-custom-scenario", [*RUN, "--storage", "{tmp}", "--scenario", "nodes=2,inter=fast"], "inter"),
    ("submit-run-id-dotdot", ["submit", "--dashboard", "http://127.0.0.1:1", "--workload", "gpt-tiny", "--strategy",
                              "ddp", "--storage", "{tmp}", "--run-id", ".."], "run_id='..'"),
    ("report-bad-out-protocol", ["report", "{tmp}", "--out", "nosuchproto://r"], "nosuchproto://r"),
    ("compare-out-not-writable", [*CMP, "--strategies", "ddp", "--out", "/proc/polytrain-cannot-write-here"],
     "--out '/proc/polytrain-cannot-write-here': not writable"),
    ("pipeline-chart-not-writable", ["pipeline", "show", "--schedule", "1f1b", "--stages", "2", "--microbatches", "4",
                                     "--out", "/proc/polytrain-cannot-write-here/1f1b.png"], "--out '/proc/polytrain-cannot-write-here/1f1b.png': not writable"),
]


# found by the data check, which runs while Ray starts
DATA_CASES = {"seq-len-too-long-for-the-data", "batch-larger-than-the-data"}


def _running_under(folder: str) -> list[str]:
    """Command lines of the processes that name ``folder`` (Ray's name their session in it)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if folder in args:
            found.append(args[:200])
    return found


def _case_id(case) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]


def _values(case):
    return case.values if hasattr(case, "values") else case


@pytest.fixture(scope="module")
def results():
    """Every case, each in a fresh forked `polytrain` process (tests/unit/cli_cases.py)."""
    cases = [_values(c) for c in CASES]
    dirs = [tempfile.mkdtemp(prefix="pt-bad-", dir="/tmp") for _ in cases]  # short: Ray's socket path limit
    try:
        todo = [{"argv": [a.format(tmp=d) for a in c[1]], "dir": d} for c, d in zip(cases, dirs)]
        p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "unit", "cli_cases.py")],
                           input=json.dumps(todo), env=_env(), capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        out = json.loads(p.stdout)
        for r, d in zip(out, dirs):
            r.update(tmp=d, ray_started=os.path.exists(f"{d}/ray"), left=sorted(set(os.listdir(d)) - {"ray"}),
                     running=_running_under(d))
        yield {c[0]: r for c, r in zip(cases, out)}
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.parametrize("name, argv, expected", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_input_is_one_line_exit_2_before_ray(results, name, argv, expected):
    r = results[name]
    assert r["rc"] == 2, r["err"][-2000:]
    lines = r["err"].splitlines()
    assert len(lines) == 1, r["err"][-2000:]
    assert lines[0].startswith("polytrain: error: ") and expected.format(tmp=r["tmp"]) in lines[0], lines[0]
    assert r["running"] == [], r["running"]
    assert r["left"] == [], r["left"]  # nothing written into the cwd or the storage
    if name in DATA_CASES:  # waits for Ray's start (4-5 s on a quiet 2-core machine), then stops it
        assert r["wall_s"] < 40, f"{r['wall_s']:.1f} s"
        return
    assert r["wall_s"] < 15, f"{r['wall_s']:.1f} s"
    assert not r["ray_started"], "Ray was started for input that is invalid before any worker"


def test_the_console_command_fails_as_fast(tmp_path):
    """The same through a whole new interpreter (imports included), as a user runs it.
    CPU seconds, not wall time: what the command costs, whatever else loads the machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "orchestrator.cli", *RUN, "--storage", str(tmp_path),
                        "--set", "seed=-1"], cwd=tmp_path, env={**_env(), "RAY_TMPDIR": str(tmp_path)},
                       capture_output=True, text=True, timeout=120)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "seed=-1" in p.stderr, p.stderr[-2000:]
    assert cpu < 15, f"{cpu:.1f} CPU s ({wall:.1f} s wall)"
    assert not (tmp_path / "ray").exists() and list(tmp_path.iterdir()) == []


# Bad input found without torch (argparse, --set, the JobSpec's schema): answered in well under a second.
FAST = [
    ("unknown-flag", ["run", "--bogus"], "unrecognized arguments: --bogus"),
    ("wrong-type", [*RUN, "--set", "workers=many"], "workers='many'"),
    ("unknown-key", [*RUN, "--set", "colour=red"], "colour: unknown key"),
    ("no-workload", ["run", "--strategy", "ddp"], "workload: required"),
    ("bad-injection", [*RUN, "--inject", "explode:rank=0"], "unknown kind 'explode'"),
    ("compare-set-an-option-of-a-number", [*CMP, "--strategies", "ddp", "--set", "workers.x=1", "--out", "c"],
     "workers={'x': 1}"),
]
# what a flag or schema error must not wait for (torch alone is 1.5-3.5 s of import on 2 cores)
HEAVY = ("torch", "ray", "strategies", "workloads", "pandas", "pyarrow", "numpy")
_PROBE = f"HEAVY = {HEAVY!r}\n" + """import json, sys
from orchestrator.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
print(json.dumps({"rc": rc, "imported": sorted(m for m in HEAVY if m in sys.modules)}))
"""


@pytest.mark.parametrize("name, argv, expected", FAST, ids=[c[0] for c in FAST])
def test_flag_and_schema_errors_answer_before_torch_is_imported(tmp_path, name, argv, expected):
    """Nothing heavy is imported: the answer comes in the interpreter's start-up time (0.2 CPU s
    on this machine; with torch 3.5 s). What it costs is measured by the modules, not by a clock,
    which a loaded machine would bend."""
    p = subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=tmp_path, env={**_env(), "RAY_TMPDIR": str(tmp_path)},
                       capture_output=True, text=True, timeout=60)
    assert json.loads(p.stdout) == {"rc": 2, "imported": []}, p.stdout + p.stderr[-2000:]
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("polytrain: error: ") and expected in p.stderr, p.stderr
    assert list(tmp_path.iterdir()) == []
