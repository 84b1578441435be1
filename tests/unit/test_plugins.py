"""Workloads from files, modules and entry points; and what a bad one gets told."""
import sys
import textwrap

import pytest

from orchestrator.cli import main
from orchestrator.config import JobSpec
from tests import plugin_sources as src
from workloads import WORKLOADS


def _write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_load_by_file_reference(tmp_path, monkeypatch):
    path = _write(tmp_path, "my_model.py", src.GOOD.format(name="file-reg"))
    monkeypatch.chdir(tmp_path)
    spec = JobSpec(workload="my_model.py:TinyReg", strategy="single", steps=1)
    assert spec.workload.name == f"{path}:TinyReg"  # absolute: workers find it from any cwd
    assert spec.build_workload().width == 16
    assert WORKLOADS.get("file-reg").__name__ == "TinyReg"  # its decorator registered it too
    assert spec.worker_sources() == [path]


def test_load_by_module_reference(tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(src.GOOD.format(name="module-reg"))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = JobSpec(workload={"name": "mypkg.models:TinyReg", "width": 8}, strategy="single", steps=1)
    assert spec.build_workload().width == 8
    assert spec.worker_sources() == [str(pkg)]  # not installed: the package travels to the workers


def test_entry_point_workload(tmp_path, monkeypatch):
    (tmp_path / "ep_plugin.py").write_text(src.GOOD.format(name="ep-internal"))
    dist = tmp_path / "ep_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[polytrain.workloads]\nep-reg = ep_plugin:TinyReg\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = JobSpec(workload="ep-reg", strategy="single", steps=1)
    assert type(spec.build_workload()).__name__ == "TinyReg"
    assert "ep-reg" in WORKLOADS.names()


@pytest.mark.parametrize("text, attr, expected", [
    (src.BROKEN, "X", "cannot import {path} (SyntaxError: "),
    (src.NOT_A_WORKLOAD, "Thing", "Thing is not a Workload subclass"),
    (src.MISSING_METHODS, "Half", "Half does not implement loss(), source()"),
    (src.GOOD.format(name="fine"), "Nope", "has no attribute 'Nope'"),
    (src.DUPLICATE, "Impostor", "workload 'gpt-tiny' is already registered by workloads.gpt.GptTiny"),
])
def test_bad_plugin_is_one_line_exit_2(tmp_path, capsys, text, attr, expected):
    path = _write(tmp_path, f"bad_{abs(hash(text))}.py", text)
    rc = main(["run", "--workload", f"{path}:{attr}", "--strategy", "single", "--storage", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert expected.format(path=path) in err, err
    assert len(err.splitlines()) == 1


def test_missing_file_and_module(capsys):
    assert main(["run", "--workload", "/nonexistent/model.py:X", "--strategy", "single"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["run", "--workload", "no_such_pkg.models:X", "--strategy", "single"]) == 2
    assert "cannot import no_such_pkg.models (ModuleNotFoundError: " in capsys.readouterr().err


def test_option_of_the_wrong_type(tmp_path, capsys):
    path = _write(tmp_path, "typed.py", src.GOOD.format(name="typed-reg"))
    rc = main(["run", "--workload", f"{path}:TinyReg", "--strategy", "single", "--set", "workload.width=wide"])
    assert rc == 2
    assert "workload.width='wide': Input should be a valid integer" in capsys.readouterr().err


def test_unsupported_pair_is_rejected_before_start():
    from strategies import Strategy, StrategyContext  # noqa: F401

    class NeedsAttention(Strategy):
        requires = {"attention": "needs an attention hook (Workload.attention_layers)"}
        name = "needs-attention"

        def setup(self, workload, ctx): ...
        def train_step(self, micro_batches): ...
        def state_dict(self): ...
        def load_state_dict(self, state): ...

    from workloads import WORKLOADS as W

    assert NeedsAttention.unsupported(W.get("gpt-tiny")) is None
    assert "attention hook" in NeedsAttention.unsupported(W.get("mlp-wide"))
    with pytest.raises(ValueError, match=r"strategy='needs-attention' cannot train workload='mlp-wide'"):
        NeedsAttention.check_job(workers=2, workload=W.get("mlp-wide")())
