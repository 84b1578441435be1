"""Every `polytrain` command the README shows runs and exits 0 (on the session's Ray,
with small step counts and a temporary storage), so a command in the README cannot
crash unnoticed. Commands with placeholders (`...`, HEAD, JOB_ID) are left to the
submit tests; the job file is the README's own YAML block."""
from __future__ import annotations

import math
import os
import pathlib
import re
import shlex

import pytest

from orchestrator.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
PLACEHOLDERS = ("...", "HEAD", "JOB_ID")
SCALE = 50  # README step counts / SCALE, rounded up: 100 -> 2, 200 -> 4, a kill at step 30 -> step 1
SMALL = {"workload.d_model": "32", "workload.n_layers": "2"}  # unless the command sets them


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def readme_commands() -> list[list[str]]:
    commands = []
    for block in _blocks("bash"):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = re.sub(r"\s#.*$", "", line)
            for part in re.split(r"&&|;", line):
                words = shlex.split(part)
                if words[:1] == ["polytrain"] and not any(p in w for w in words for p in PLACEHOLDERS):
                    commands.append(words[1:])
    return commands


def _scaled(n: str) -> str:
    return str(max(1, math.ceil(int(n) / SCALE)))


def small(words: list[str], tmp: pathlib.Path) -> list[str]:
    """The command at a small size, writing only under ``tmp``, on the session's Ray."""
    out, it = [], iter(words)
    for w in it:
        if w in ("--steps", "--checkpoint-every"):
            out += [w, _scaled(next(it))]
        elif w == "--inject":
            out += [w, re.sub(r"step=(\d+)", lambda m: f"step={_scaled(m.group(1))}", next(it))]
        elif w in ("--out", "--config") or w.endswith("/") or (ROOT / w.split(":")[0]).is_file():
            if w in ("--out", "--config"):
                out.append(w)
                w = next(it)
            base = w.split(":")[0]
            out.append(str(ROOT / w) if (ROOT / base).is_file() else str(tmp / w))
        else:
            out.append(w)
    if out[0] in ("run", "compare"):
        gpt = "--config" in out or ("--workload", "gpt-tiny") in zip(out, out[1:])  # the README's job file is gpt-tiny
        set_keys = {out[i + 1].split("=")[0] for i, w in enumerate(out) if w == "--set"}
        for key, value in SMALL.items():
            if gpt and key not in set_keys:
                out += ["--set", f"{key}={value}"]
        out += ["--quiet", "--address", os.environ["POLYTRAIN_TEST_RAY"]]
        if "--steps" not in out:
            out += ["--steps", "2"]
    if out[0] == "run":
        out += ["--storage", str(tmp / "runs")]
    return out


COMMANDS = readme_commands()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, ray_address):
    tmp = tmp_path_factory.mktemp("readme")
    (tmp / "job.yaml").write_text(_blocks("yaml")[0])
    os.environ["POLYTRAIN_TEST_RAY"] = ray_address
    yield tmp
    os.environ.pop("POLYTRAIN_TEST_RAY")


def test_the_readme_shows_the_commands_this_test_expects():
    subcommands = {c[0] for c in COMMANDS}
    assert {"run", "workloads", "strategies", "scenarios", "compare", "report", "pipeline"} <= subcommands
    assert len(COMMANDS) >= 12


@pytest.mark.slow
@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_readme_command_runs(words, workdir, monkeypatch):
    monkeypatch.chdir(workdir)  # a command that writes into the current folder unasked shows up below
    before = set(os.listdir(workdir))
    args = small(words, workdir)
    assert main(args) == 0, f"polytrain {' '.join(args)}"
    created = set(os.listdir(workdir)) - before - {"runs", "cmp"}
    assert not created, f"polytrain {' '.join(words)} wrote {sorted(created)} into the current folder"
