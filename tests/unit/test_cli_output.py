"""What the listing and chart commands print and write."""
import re

from pydantic import BaseModel, Field

from orchestrator.cli import _options_lines, main


def _blocks(text: str) -> dict[str, list[str]]:
    """Option lines per listed name (lines that start a name are not indented)."""
    blocks, name = {}, None
    for line in text.splitlines():
        if not line.startswith(" "):
            name = line.split()[0]
            blocks[name] = []
        elif not line.strip().startswith(("trains:", "not ", "(no options)")):
            blocks[name].append(line)
    return blocks


def _assert_aligned(lines: list[str]) -> None:
    starts = {line.index(" default ") for line in lines}
    assert len(starts) == 1, "\n".join(lines)  # the default column starts at one offset
    descr = {re.search(r"default \S+(\s+)", line).end() for line in lines
             if not re.search(r"default \S+ \S", line)}  # defaults without spaces in their text
    assert len(descr) <= 1, "\n".join(lines)


def test_strategies_show_defaults_in_aligned_columns(capsys):
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    assert "PydanticUndefined" not in out
    blocks = _blocks(out)
    assert re.search(r"ds_config +dict +default \{\} +DeepSpeed config", "\n".join(blocks["zero1"]))
    for name, lines in blocks.items():
        if lines:
            _assert_aligned(lines)
    long_name = next(line for line in blocks["powersgd"] if "min_compression_rate" in line)
    assert re.search(r"min_compression_rate +float +default 2\.0 ", long_name)


def test_workloads_show_defaults_in_aligned_columns(capsys):
    assert main(["workloads"]) == 0
    out = capsys.readouterr().out
    assert "PydanticUndefined" not in out
    for lines in _blocks(out).values():
        _assert_aligned(lines)


def test_required_options_and_factories_print_as_a_user_writes_them():
    class Opts(BaseModel):
        path: str = Field(description="where")
        tags: list[str] = Field(default_factory=lambda: ["a"], description="labels")
        very_long_option_name: int = Field(3, description="n")

    lines = _options_lines(Opts)
    assert "default required" in lines[0] and "default ['a']" in lines[1] and "default 3" in lines[2]
    _assert_aligned(lines)


def test_pipeline_show_writes_nothing_without_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["pipeline", "show", "--schedule", "1f1b", "--stages", "2", "--microbatches", "4"]) == 0
    out = capsys.readouterr().out
    assert "makespan" in out and "chart:" not in out
    assert list(tmp_path.iterdir()) == []


def test_pipeline_show_run_needs_out_and_a_timeline(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["pipeline", "show", "--run", str(tmp_path)]) == 2
    assert "needs --out" in capsys.readouterr().err
    assert main(["pipeline", "show", "--run", str(tmp_path), "--out", str(tmp_path / "t.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no timeline.parquet" in err
    assert list(tmp_path.iterdir()) == []


def test_gitignore_covers_what_the_readme_commands_write():
    """Every `--out X` of the README's tour and a `--storage runs` stay out of `git status`."""
    import os
    import shutil
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if shutil.which("git") is None or not os.path.exists(os.path.join(root, ".git")):
        import pytest

        pytest.skip("not a git checkout")
    readme = open(os.path.join(root, "README.md")).read()
    outs = set(re.findall(r"--out (\S+)", readme))
    assert {"cmp/", "zb-h1.png"} <= outs
    paths = ["runs/r1/metrics.parquet"] + [o.rstrip("/") + ("/report.html" if o.endswith("/") else "") for o in outs]
    p = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=root, capture_output=True, text=True)
    assert sorted(p.stdout.split()) == sorted(paths), p.stdout + p.stderr
