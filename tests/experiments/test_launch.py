"""`python -m experiments.launch`: the gcloud commands, their quoting, --stop, and sweep emit.

The remote scripts are executed here with `sh` in a sandbox directory that
stands in for a worker's home, with a fake `.venv/bin/python`, so quoting and
the pid/log handling are checked by running them, not by reading them.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from experiments import launch
from experiments.launch import Source, Target

URL = "https://example.com/lab/moejax.git"
TRICKY = ["--config", "configs/pod v5e64.py:moe", "--config.name=it's a \"quoted\" name",
          "--set", "train.lr=3e-4", "--workdir=$HOME/`touch INJECTED`", "$(touch INJECTED)",
          "a;touch INJECTED", "", "--config.data.path=/data/a  b\tc"]

RECORD_ARGV = "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\0' \"$a\"; done > argv.bin\n"
SLEEPER = ("#!/bin/sh\ntrap 'echo terminated > stopped.txt; exit 0' TERM\n"
           "echo started > started.txt\nwhile :; do sleep 0.05; done\n")


def _worker(tmp_path, python: str) -> str:
  """A fake worker home: moejax/.venv/bin/python is the given shell script."""
  home = tmp_path / "home"
  (home / "moejax" / ".venv" / "bin").mkdir(parents=True)
  exe = home / "moejax" / ".venv" / "bin" / "python"
  exe.write_text(python)
  exe.chmod(0o755)
  return str(home)


def _remote(argv: list[str]) -> str:
  """The shell command a `gcloud ... ssh` argv runs on the workers."""
  assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in argv
  (cmd,) = [a for a in argv if a.startswith("--command=")]
  return cmd[len("--command="):]


def _sh(script: str, home: str) -> subprocess.CompletedProcess:
  return subprocess.run(["sh", "-c", script], cwd=home, capture_output=True, text=True,
                        timeout=60)


def _wait_for(path: str) -> None:
  deadline = time.monotonic() + 30
  while not os.path.exists(path) and time.monotonic() < deadline:
    time.sleep(0.02)
  assert os.path.exists(path), path


def _dry_run(capsys, *argv: str) -> list[list[str]]:
  assert launch.main(list(argv)) == 0
  return [shlex.split(line) for line in capsys.readouterr().out.splitlines()]


def test_dry_run_prints_the_builders_commands(capsys):
  printed = _dry_run(capsys, "--tpu", "pod", "--zone", "us-west4-a", "--project", "lab",
                     "--repo", URL, "--ref", "v1", "--dry-run", "--", *TRICKY)
  target = Target("pod", "us-west4-a", "lab")
  assert printed == launch.launch_commands(target, TRICKY, Source(repo=URL, ref="v1"))
  install, run = printed
  for argv in printed:
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
    assert "--zone=us-west4-a" in argv and "--project=lab" in argv and "--worker=all" in argv
  assert f"git clone --quiet {URL} moejax" in _remote(install)
  assert "fetch --quiet origin v1" in _remote(install)
  assert ".venv/bin/pip install --quiet -e '.[tpu]'" in _remote(install)
  assert "nohup .venv/bin/python -m experiments" in _remote(run)
  assert "export MOEJAX_COORDINATOR=${MOEJAX_COORDINATOR:-auto}" in _remote(run)
  assert "logs/run.log" in _remote(run) and "logs/run.pid" in _remote(run)
  # No coordinator flags: JAX auto-detects the pod's processes.
  assert not any("--coordinator" in a or "--process_id" in a for argv in printed for a in argv)
  # Without --project, none is passed; --skip-install leaves only the run.
  (run2,) = _dry_run(capsys, "--tpu", "pod", "--zone", "z", "--skip-install", "--dry-run")
  assert not any(a.startswith("--project") for a in run2)


def test_tricky_args_reach_the_trainer_unchanged(tmp_path, capsys):
  # The printed line is split as a shell would, and its --command run by sh:
  # both quoting layers must hand the trainer exactly TRICKY.
  (run,) = _dry_run(capsys, "--tpu", "pod", "--zone", "z", "--skip-install", "--follow",
                    "--dry-run", "--", *TRICKY)
  home = _worker(tmp_path, RECORD_ARGV)
  r = _sh(_remote(run), home)
  assert r.returncode == 0, r.stderr
  assert "started run on" in r.stdout
  with open(os.path.join(home, "moejax", "argv.bin")) as f:
    assert f.read().split("\0")[:-1] == ["-m", "experiments", *TRICKY]
  assert not any("INJECTED" in name for _, _, files in os.walk(tmp_path) for name in files)


def test_follow_exits_with_the_runs_status(tmp_path):
  home = _worker(tmp_path, "#!/bin/sh\necho boom\nexit 3\n")
  r = _sh(launch.run_script([], tag="t1", follow=True), home)
  assert r.returncode == 3
  assert "boom" in r.stderr and "t1 failed" in r.stderr


def test_detached_run_refuses_a_second_start_and_stops_on_sigterm(tmp_path):
  home = _worker(tmp_path, SLEEPER)
  target = Target("pod", "z")
  start = _remote(launch.launch_commands(target, ["--workdir", "runs/x"], tag="exp1")[-1])
  r = _sh(start, home)
  assert r.returncode == 0, r.stderr  # returns at once: the run is detached
  pid_file = os.path.join(home, "moejax", "logs", "exp1.pid")
  _wait_for(os.path.join(home, "moejax", "started.txt"))
  with open(pid_file) as f:
    pid = int(f.read())
  try:
    again = _sh(start, home)
    assert again.returncode == 1 and "exp1 is already running" in again.stderr
    (stop,) = launch.stop_commands(target, tag="exp1")
    r = _sh(_remote(stop), home)
    assert r.returncode == 0 and "sent SIGTERM to exp1" in r.stdout
    _wait_for(os.path.join(home, "moejax", "stopped.txt"))  # the run got SIGTERM
  finally:
    try:
      os.kill(pid, 9)
    except ProcessLookupError:
      pass
  deadline = time.monotonic() + 30
  while _sh(f"kill -0 {pid}", home).returncode == 0 and time.monotonic() < deadline:
    time.sleep(0.02)
  r = _sh(_remote(launch.stop_commands(target, tag="exp1")[0]), home)
  assert r.returncode == 0 and "exp1 is not running" in r.stdout


def test_stop_cli(capsys):
  (stop,) = _dry_run(capsys, "--tpu", "pod", "--zone", "z", "--stop", "--name", "exp1",
                     "--dry-run")
  assert [stop] == launch.stop_commands(Target("pod", "z"), tag="exp1")
  assert "kill -TERM" in _remote(stop) and "moejax/logs/exp1.pid" in _remote(stop)
  assert launch.main(["--tpu", "pod", "--zone", "z", "--stop", "--dry-run", "--", "x"]) == 2
  assert "--stop takes no run arguments" in capsys.readouterr().err


def _fake_gcloud(tmp_path, status: int = 0) -> str:
  """A directory holding a `gcloud` that appends its argv (JSON) to calls.jsonl."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  exe = bin_dir / "gcloud"
  log = str(tmp_path / "calls.jsonl")
  exe.write_text(f"#!{sys.executable}\nimport json, sys\n"
                 f"open({log!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
                 f"sys.exit({status})\n")
  exe.chmod(0o755)
  return str(bin_dir)


def _calls(tmp_path) -> list[list[str]]:
  with open(tmp_path / "calls.jsonl") as f:
    return [["gcloud"] + json.loads(line) for line in f]


def test_runs_the_commands_with_gcloud(tmp_path, monkeypatch):
  monkeypatch.setenv("PATH", _fake_gcloud(tmp_path) + os.pathsep + os.environ["PATH"])
  argv = ["--tpu", "pod", "--zone", "z", "--repo", URL, "--ref", "main", "--", *TRICKY]
  assert launch.main(argv) == 0
  assert _calls(tmp_path) == launch.launch_commands(Target("pod", "z"), TRICKY,
                                                    Source(repo=URL, ref="main"))


def test_a_failing_command_stops_the_launch(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("PATH", _fake_gcloud(tmp_path, status=5) + os.pathsep + os.environ["PATH"])
  assert launch.main(["--tpu", "pod", "--zone", "z", "--repo", URL, "--ref", "main"]) == 5
  assert len(_calls(tmp_path)) == 1  # the install failed: the run is not started
  assert "exit status 5" in capsys.readouterr().err


def test_no_gcloud_is_a_clear_error(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("PATH", str(tmp_path))
  assert launch.main(["--tpu", "pod", "--zone", "z", "--skip-install"]) == 2
  err = capsys.readouterr().err
  assert "gcloud is not on PATH" in err and "--dry-run" in err


@pytest.mark.parametrize("argv, message", [
    (["--tpu", "", "--zone", "z"], "--tpu='' is invalid"),
    (["--tpu", "my pod", "--zone", "z"], "--tpu='my pod' is invalid"),
    (["--tpu", "pod", "--zone=-z"], "--zone='-z' is invalid"),
    (["--tpu", "pod", "--zone", "z", "--skip-install", "--name", "a b"], "--name='a b' is invalid"),
    (["--tpu", "pod", "--zone", "z", "--repo", URL, "--copy"], "exclude each other"),
    (["--tpu", "pod", "--zone", "z", "--copy", "--ref", "main"], "--ref='main' needs --repo"),
    (["--tpu", "pod", "--zone", "z", "--skip-install", "--repo", URL], "--skip-install"),
    (["--tpu", "pod", "--zone", "z", "--repo", URL, "--ref", "m", "--remote-dir", ""],
     "--remote-dir=''"),
])
def test_bad_input(argv, message, capsys):
  assert launch.main(argv + ["--dry-run"]) == 2
  assert message in capsys.readouterr().err


def test_without_a_git_remote_asks_for_repo(tmp_path):
  with pytest.raises(ValueError, match="no git remote.*pass --repo URL"):
    launch.resolve_source(None, None, False, root=str(tmp_path))


def test_copy_sends_the_working_tree_without_ignored_files(tmp_path, monkeypatch):
  repo = tmp_path / "repo"
  (repo / "runs" / "old").mkdir(parents=True)
  (repo / "pkg").mkdir()
  (repo / ".gitignore").write_text("runs/\n")
  (repo / "pkg" / "tracked.py").write_text("x = 1\n")
  (repo / "new file.py").write_text("y = 2\n")
  (repo / "runs" / "old" / "big.bin").write_text("0" * 100)
  subprocess.run(["git", "init", "-q", str(repo)], check=True)
  subprocess.run(["git", "-C", str(repo), "add", "pkg/tracked.py"], check=True)
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  source = launch.resolve_source(None, None, True, root=str(repo))
  target = Target("pod", "z")
  pack, scp, install = launch.install_commands(target, source)
  archive = launch.local_archive(target)
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive,
                 f"pod:{launch.REMOTE_ARCHIVE}", "--zone=z", "--worker=all"]
  assert f"tar -xzf {launch.REMOTE_ARCHIVE} -C moejax" in _remote(install)
  subprocess.run(pack, check=True, timeout=60)
  names = subprocess.run(["tar", "-tzf", archive], capture_output=True, text=True,
                         check=True).stdout.split("\n")
  assert sorted(n for n in names if n) == [".gitignore", "new file.py", "pkg/tracked.py"]


def test_sweep_emit_uses_the_launch_builder(tmp_path, monkeypatch):
  from experiments.sweep.__main__ import emit_tpu, load_sweep  # noqa: PLC0415
  from experiments.sweep.runner import SweepRunner  # noqa: PLC0415
  sweep_file = tmp_path / "sweep.py"
  sweep_file.write_text(textwrap.dedent('''
      from experiments.sweep.grid import Sweep, axis
      from tests.conftest import tiny_config

      def get_sweep():
        return Sweep("t", tiny_config(), axis("seed", [0, 1]))
  '''))
  runner = SweepRunner(load_sweep(str(sweep_file)), str(tmp_path / "out"))
  target, source = Target("pod", "z", "lab"), Source(repo=URL, ref="main")
  paths = emit_tpu(runner, target, source)
  assert [os.path.basename(p) for p in paths] == ["seed=0.sh", "seed=1.sh"]
  wd = str(tmp_path / "out" / "seed=1")
  with open(os.path.join(wd, "config.json")) as f:
    config_json = f.read()
  expected = launch.launch_commands(target, ["--workdir", wd], source, tag="seed=1",
                                    follow=True, files={f"{wd}/config.json": config_json})
  with open(paths[1]) as f:
    text = f.read()
  assert "--stop --name seed=1" in text
  # The script is exactly the builder's commands: run it with a fake gcloud.
  monkeypatch.setenv("PATH", _fake_gcloud(tmp_path) + os.pathsep + os.environ["PATH"])
  subprocess.run(["bash", paths[1]], check=True, timeout=60)
  calls = _calls(tmp_path)
  assert calls == expected
  # On a worker, the run command recreates the point's config.json and runs the point.
  os.remove(os.path.join(wd, "config.json"))
  home = _worker(tmp_path, RECORD_ARGV)
  r = _sh(_remote(calls[-1]), home)
  assert r.returncode == 0, r.stderr
  with open(os.path.join(wd, "config.json")) as f:
    assert f.read() == config_json
  with open(os.path.join(home, "moejax", "argv.bin")) as f:
    assert f.read().split("\0")[:-1] == ["-m", "experiments", "--workdir", wd]


def test_remote_path():
  assert launch.remote_path(os.path.join(launch.REPO, "runs", "a")) == os.path.join("runs", "a")
  assert launch.remote_path("/elsewhere/runs") == "/elsewhere/runs"


@pytest.mark.parametrize("variant", ["moe", "smoke"])
def test_pod_v5e64_config_fits_64_chips(variant):
  from configs.pod_v5e64 import get_config  # noqa: PLC0415
  from moejax.validation import validate  # noqa: PLC0415
  from moejax.model.counting import param_counts  # noqa: PLC0415
  from moejax.parallel.mesh import resolve_axes  # noqa: PLC0415
  cfg = get_config(variant)
  validate(cfg)
  axes = resolve_axes(dict(cfg.parallel), 64, num_experts=cfg.moe.num_experts,
                      batch_size=cfg.train.batch_size)
  assert axes == {"data": 4, "fsdp": 1, "expert": 16}
  counts = param_counts(cfg)  # the docstring's 3.3B total, 170M active
  assert round(counts["params_total"] / 1e8) == 33 and round(counts["params_active"] / 1e7) == 17
  with pytest.raises(ValueError, match="allowed: moe, smoke"):
    get_config("big")
