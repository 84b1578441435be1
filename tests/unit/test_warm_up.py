"""A worker actor is prepared as it starts (``cluster.worker_group.prepare``): the
modules every rank needs are imported and the trainer's warm-up has run, so a
rank's first set-up (a heal's newcomer, while the survivors wait) pays neither."""
import subprocess
import sys

CHECK = """
import sys
from cluster.worker_group import prepare
prepare(("orchestrator.trainer:warm_up",))
print(sorted(m for m in ("torch._dynamo", "strategies.outer", "strategies.ddp") if m in sys.modules))
"""


def test_prepare_imports_and_warms_what_a_rank_set_up_would_import_lazily():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[-2] == "['strategies.ddp', 'strategies.outer', 'torch._dynamo']"
