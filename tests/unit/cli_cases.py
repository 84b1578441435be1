"""Run many `polytrain` command lines fast: import the CLI and everything its
commands import once, then fork one fresh process per command line, which
calls the console script's ``main`` exactly as ``polytrain ARGS`` would.

stdin: JSON list of {"argv": [...], "dir": path}; each child runs with
``RAY_TMPDIR=dir`` and cwd ``dir``. stdout: JSON list of {"rc", "out", "err",
"wall_s", "cpu_s"} in the same order. Not a test module (no test_ prefix)."""
import json
import os
import signal
import sys
import time

CASE_TIMEOUT_S = 60
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import orchestrator.cli as cli  # noqa: E402
import orchestrator.compare  # noqa: E402,F401  (what the commands import lazily, so children start warm)
import orchestrator.driver  # noqa: E402,F401
import orchestrator.trainer  # noqa: E402,F401  (what the driver's data check imports)
import orchestrator.submit  # noqa: E402,F401


def run_one(argv: list[str], folder: str) -> dict:
    out_path, err_path = os.path.join(folder, ".stdout"), os.path.join(folder, ".stderr")
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: a fresh polytrain process from here on
        code = 70
        signal.alarm(CASE_TIMEOUT_S)  # a command that does not fail fast dies here (and the test says so)
        try:
            os.environ["RAY_TMPDIR"] = folder
            os.environ.pop("RAY_ADDRESS", None)
            os.chdir(folder)
            for fd, path in ((1, out_path), (2, err_path)):
                f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(f, fd)
                os.close(f)
            sys.stdout, sys.stderr = os.fdopen(1, "w"), os.fdopen(2, "w")
            code = cli.main(argv)
        except SystemExit as e:  # argparse exits
            code = e.code if isinstance(e.code, int) else 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status, usage = os.wait4(pid, 0)
    wall = time.monotonic() - t0
    read = lambda p: open(p).read() if os.path.exists(p) else ""  # noqa: E731
    result = dict(rc=os.waitstatus_to_exitcode(status), out=read(out_path), err=read(err_path), wall_s=wall,
                  cpu_s=usage.ru_utime + usage.ru_stime)
    for p in (out_path, err_path):
        if os.path.exists(p):
            os.unlink(p)
    return result


if __name__ == "__main__":
    cases = json.load(sys.stdin)
    json.dump([run_one(c["argv"], c["dir"]) for c in cases], sys.stdout)
