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


def small(words: list[str], out: pathlib.Path) -> list[str]:
    """The command at a small size, on the session's Ray, every path it names
    (``--out``, ``--config``, ``cmp/``) and its run folders under ``out``."""
    args, it = [], iter(words)
    for w in it:
        if w in ("--steps", "--checkpoint-every"):
            args += [w, _scaled(next(it))]
        elif w == "--workers" and words[0] == "compare":  # a matrix of runs: each at the smallest world
            args += [w, str(min(2, int(next(it))))]
        elif w == "--inject":
            args += [w, re.sub(r"step=(\d+)", lambda m: f"step={_scaled(m.group(1))}", next(it))]
        elif w in ("--out", "--config"):
            args += [w, str(out / next(it))]
        elif (ROOT / w.split(":")[0]).is_file():  # a file the README names in this repository
            args.append(str(ROOT / w))
        elif w.endswith("/"):  # a folder the README writes (compare's, then report's input)
            args.append(str(out / w))
        else:
            args.append(w)
    if args[0] in ("run", "compare"):
        gpt = "--config" in args or ("--workload", "gpt-tiny") in zip(args, args[1:])  # the README's job file is gpt-tiny
        set_keys = {args[i + 1].split("=")[0] for i, w in enumerate(args) if w == "--set"}
        for key, value in SMALL.items():
            if gpt and key not in set_keys:
                args += ["--set", f"{key}={value}"]
        args += ["--quiet", "--address", os.environ["POLYTRAIN_TEST_RAY"]]
        if "--steps" not in args:
            args += ["--steps", "2"]
    if args[0] == "run":
        args += ["--storage", str(out / "runs")]
    return args


COMMANDS = readme_commands()


@pytest.fixture(scope="module")
def out(tmp_path_factory, ray_address):
    """Where the commands write; the README's job file is there."""
    out = tmp_path_factory.mktemp("readme-out")
    (out / "job.yaml").write_text(_blocks("yaml")[0])
    os.environ["POLYTRAIN_TEST_RAY"] = ray_address
    yield out
    os.environ.pop("POLYTRAIN_TEST_RAY")


def test_the_readme_shows_the_commands_this_test_expects():
    subcommands = {c[0] for c in COMMANDS}
    assert {"run", "workloads", "strategies", "scenarios", "compare", "report", "pipeline"} <= subcommands
    assert len(COMMANDS) >= 12


@pytest.mark.slow
@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_readme_command_runs(words, out, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a command that writes into the current folder unasked shows up below
    args = small(words, out)
    assert main(args) == 0, f"polytrain {' '.join(args)}"
    assert not os.listdir(tmp_path), f"polytrain {' '.join(words)} wrote {os.listdir(tmp_path)} into the current folder"
