"""Start (or stop) one run on every worker of a Cloud TPU VM, e.g. a pod slice.

  python -m experiments.launch --tpu NAME --zone ZONE [--project P]
      [--repo URL [--ref REF] | --copy] [--name TAG] [--follow] [--skip-install]
      [--dry-run] -- <python -m experiments arguments>
  python -m experiments.launch --tpu NAME --zone ZONE --stop [--name TAG]

Every worker gets the code (a git clone of --repo at --ref, by default this
checkout's `origin` remote at its HEAD commit; or, with --copy, this working
tree as a tarball over `gcloud compute tpus tpu-vm scp`), a virtualenv with
`pip install -e '.[tpu]'`, and then the same `python -m experiments ...`
started under nohup, so an ssh drop does not kill it. Each worker logs to
<remote-dir>/logs/TAG.log and records the pid in TAG.pid; --stop sends that
pid SIGTERM, so the trainer checkpoints and exits. Multi-host initialisation
is left to JAX's TPU auto-detection; no coordinator flags are passed.
--dry-run prints the commands (one per line, shell-quoted) instead of running
them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG_RE = re.compile(r"[A-Za-z0-9_.=+-]+")
REMOTE_ARCHIVE = "moejax-src.tar.gz"  # in the workers' home directories, removed after unpacking


@dataclasses.dataclass(frozen=True)
class Target:
  """The TPU VM every command addresses (all of its workers)."""

  tpu: str
  zone: str
  project: str | None = None

  def __post_init__(self):
    for flag, value in (("--tpu", self.tpu), ("--zone", self.zone)):
      if not value or value.startswith("-") or any(c.isspace() for c in value):
        raise ValueError(f"{flag}={value!r} is invalid: must be a non-empty name without "
                         "spaces, not starting with '-'")
    if self.project is not None and (not self.project or any(c.isspace() for c in self.project)):
      raise ValueError(f"--project={self.project!r} is invalid: must be a non-empty project id")

  def flags(self) -> list[str]:
    return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])


@dataclasses.dataclass(frozen=True)
class Source:
  """Where the workers get the code: `repo` (a git URL) at `ref`, or a copy of `copy_from`."""

  repo: str | None = None
  ref: str | None = None
  copy_from: str | None = None

  def __post_init__(self):
    if (self.repo is None) == (self.copy_from is None):
      raise ValueError("exactly one of --repo URL and --copy is needed to install the code")
    if self.ref is not None and self.repo is None:
      raise ValueError(f"--ref={self.ref!r} needs --repo (a --copy sends the working tree as is)")


def gcloud_ssh(target: Target, command: str) -> list[str]:
  """`gcloud ... tpu-vm ssh` running the shell `command` on all workers at once."""
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", target.tpu, *target.flags(),
          "--worker=all", f"--command={command}"]


def gcloud_scp(target: Target, local: str, remote: str) -> list[str]:
  """`gcloud ... tpu-vm scp` of one local file to `remote` on all workers."""
  return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{target.tpu}:{remote}",
          *target.flags(), "--worker=all"]


def local_archive(target: Target) -> str:
  return os.path.join(tempfile.gettempdir(), f"moejax-{target.tpu}.tar.gz")


def install_commands(target: Target, source: Source, remote_dir: str = "moejax",
                     python: str = "python3") -> list[list[str]]:
  """Puts the code in `remote_dir` on every worker and installs it into remote_dir/.venv.

  Idempotent: an existing clone is fetched and checked out, an existing
  virtualenv is reused, and pip only installs what changed.
  """
  d = shlex.quote(remote_dir)
  commands = []
  if source.copy_from is not None:
    archive = local_archive(target)
    # git decides what belongs to the tree (tracked + untracked, minus .gitignore'd
    # files such as runs/ and .venv/); COPYFILE_DISABLE keeps macOS metadata out.
    pack = (f"cd {shlex.quote(source.copy_from)} && git ls-files -z -co --exclude-standard "
            f"| COPYFILE_DISABLE=1 tar --null -czf {shlex.quote(archive)} -T -")
    commands += [["sh", "-c", pack], gcloud_scp(target, archive, REMOTE_ARCHIVE)]
    fetch = f"mkdir -p {d} && tar -xzf {REMOTE_ARCHIVE} -C {d} && rm -f {REMOTE_ARCHIVE}"
  else:
    url, ref = shlex.quote(source.repo), shlex.quote(source.ref or "HEAD")
    # Fetching the ref by name works for a commit, a branch (its newest commit) or a tag.
    fetch = (f"{{ [ -d {d}/.git ] || git clone --quiet {url} {d}; }} && git -C {d} fetch "
             f"--quiet origin {ref} && git -C {d} checkout --quiet --detach FETCH_HEAD")
  venv = (f"cd {d} && {{ [ -x .venv/bin/python ] || {shlex.quote(python)} -m venv .venv; }} "
          f"&& {shlex.join(['.venv/bin/pip', 'install', '--quiet', '-e', '.[tpu]'])}")
  commands.append(gcloud_ssh(target, f"set -e; {fetch} && {venv}"))
  return commands


def _check_tag(tag: str) -> None:
  if not TAG_RE.fullmatch(tag):
    raise ValueError(f"--name={tag!r} is invalid: use letters, digits and _ . = + - only")


def run_script(args: Sequence[str], remote_dir: str = "moejax", tag: str = "run",
               files: Mapping[str, str] | None = None, follow: bool = False) -> str:
  """The shell script each worker runs: write `files`, start the run detached, record its pid.

  Refuses to start while a run of the same tag is alive on the worker. With
  `follow`, the script also waits for the run and exits with its status
  (the run itself still survives an ssh drop).
  """
  _check_tag(tag)
  log, pid = f"logs/{tag}.log", f"logs/{tag}.pid"
  lines = ["set -e", f"cd {shlex.quote(remote_dir)}", "mkdir -p logs",
           f'if [ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then '
           f'echo "moejax launch: {tag} is already running on $(hostname) (pid $(cat {pid})); '
           f'stop it with --stop --name {tag}" >&2; exit 1; fi']
  for path, text in (files or {}).items():
    lines.append(f"mkdir -p {shlex.quote(posixpath.dirname(path) or '.')}")
    lines.append(f"printf '%s' {shlex.quote(text)} > {shlex.quote(path)}")
  run = shlex.join([".venv/bin/python", "-m", "experiments", *args])
  # Every worker is one process of the run: JAX detects the pod's hosts itself.
  lines.append("export MOEJAX_COORDINATOR=${MOEJAX_COORDINATOR:-auto}")
  lines.append(f"nohup {run} > {log} 2>&1 < /dev/null & pid=$!")
  lines.append(f"echo $pid > {pid}")
  lines.append(f'echo "moejax launch: started {tag} on $(hostname) (pid $pid), log: "'
               f"{shlex.quote(posixpath.join(remote_dir, log))}")
  if follow:
    lines.append(f'if wait $pid; then tail -n 3 {log}; else s=$?; tail -n 30 {log} >&2; '
                 f'echo "moejax launch: {tag} failed on $(hostname) (exit $s)" >&2; exit $s; fi')
  return "; ".join(lines)


def launch_commands(target: Target, args: Sequence[str], source: Source | None = None, *,
                    remote_dir: str = "moejax", tag: str = "run", python: str = "python3",
                    files: Mapping[str, str] | None = None,
                    follow: bool = False) -> list[list[str]]:
  """Every command (argv) that installs the code (unless `source` is None) and starts the run.

  `args` are `python -m experiments` arguments, passed through unchanged;
  `files` maps paths (relative to `remote_dir`) to text written on every
  worker before the run starts (e.g. a sweep point's config.json).
  """
  if not remote_dir:
    raise ValueError("--remote-dir='' is invalid: must name a directory on the workers")
  install = install_commands(target, source, remote_dir, python) if source else []
  return install + [gcloud_ssh(target, run_script(args, remote_dir, tag, files, follow))]


def stop_commands(target: Target, remote_dir: str = "moejax", tag: str = "run") -> list[list[str]]:
  """SIGTERM to the run `tag` on every worker: the trainer checkpoints and exits."""
  _check_tag(tag)
  pid = shlex.quote(posixpath.join(remote_dir, "logs", f"{tag}.pid"))
  script = (f'if [ -f {pid} ] && kill -TERM "$(cat {pid})" 2>/dev/null; then '
            f'echo "moejax launch: sent SIGTERM to {tag} on $(hostname)"; '
            f'else echo "moejax launch: {tag} is not running on $(hostname)"; fi')
  return [gcloud_ssh(target, script)]


def remote_path(local: str, root: str = REPO) -> str:
  """`local` as the workers see it: relative to the code dir if under `root`, else absolute."""
  full = os.path.abspath(local)
  rel = os.path.relpath(full, root)
  return full if rel == ".." or rel.startswith(".." + os.sep) else rel


def script_text(commands: Sequence[Sequence[str]], comment: str) -> str:
  """A bash script running `commands` in order, stopping at the first failure."""
  head = "".join(f"# {line}\n" for line in comment.splitlines())
  return ("#!/usr/bin/env bash\n" + head + "set -euo pipefail\n"
          + "".join(shlex.join(c) + "\n" for c in commands))


def _git(root: str, *args: str) -> str | None:
  try:
    r = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return None
  return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


def resolve_source(repo: str | None, ref: str | None, copy: bool, root: str = REPO) -> Source:
  """--repo/--ref/--copy -> Source; without either, this checkout's git remote at HEAD."""
  if copy:
    if repo is not None:
      raise ValueError(f"--repo={repo!r} and --copy exclude each other: pick one way to "
                       "send the code")
    if _git(root, "rev-parse", "--is-inside-work-tree") != "true":
      raise ValueError(f"--copy needs {root} to be a git checkout (git lists the files to send)")
    return Source(copy_from=root, ref=ref)
  if repo is None:
    remotes = (_git(root, "remote") or "").split()
    if not remotes:
      raise ValueError(f"--repo not given and {root} has no git remote to clone from: pass "
                       "--repo URL (a git URL every worker can clone) or --copy (send this "
                       "working tree)")
    repo = _git(root, "remote", "get-url", "origin" if "origin" in remotes else remotes[0])
  if ref is None:
    ref = _git(root, "rev-parse", "HEAD")
    if _git(root, "status", "--porcelain", "--untracked-files=no"):
      print(f"note: {root} has uncommitted changes; the workers check out {ref} without them "
            "(use --copy to send the working tree)", file=sys.stderr)
  return Source(repo=repo, ref=ref)


def add_target_args(ap: argparse.ArgumentParser, required: bool = True) -> None:
  """The TPU VM and code-source flags, shared with `python -m experiments.sweep --emit tpu`."""
  ap.add_argument("--tpu", required=required, help="TPU VM name")
  ap.add_argument("--zone", required=required, help="its zone, e.g. us-west4-a")
  ap.add_argument("--project", help="Google Cloud project (default: gcloud's configured one)")
  ap.add_argument("--repo", help="git URL the workers clone (default: this checkout's remote)")
  ap.add_argument("--ref", help="commit/branch/tag to check out (default: this checkout's HEAD)")
  ap.add_argument("--copy", action="store_true",
                  help="send this working tree with tpu-vm scp instead of cloning")


def run_commands(commands: Sequence[Sequence[str]]) -> int:
  """Runs the commands in order; the exit status of the first that fails, else 0."""
  if shutil.which("gcloud") is None:
    print("error: gcloud is not on PATH: install the Google Cloud CLI "
          "(https://cloud.google.com/sdk/docs/install) and log in, or use --dry-run to print "
          "the commands", file=sys.stderr)
    return 2
  for c in commands:
    print("+ " + shlex.join(c), file=sys.stderr, flush=True)
    rc = subprocess.run(list(c)).returncode
    if rc != 0:
      print(f"error: exit status {rc} from: {shlex.join(c)}", file=sys.stderr)
      return rc
  return 0


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  own, run_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
      else (argv, [])
  ap = argparse.ArgumentParser(prog="python -m experiments.launch",
                               description=__doc__.split("\n")[0],
                               usage="%(prog)s --tpu NAME --zone ZONE [options] -- "
                                     "[python -m experiments args]")
  add_target_args(ap)
  ap.add_argument("--name", default="run", help="run tag, names the log and pid files [run]")
  ap.add_argument("--remote-dir", default="moejax",
                  help="code directory on the workers, relative to the home directory")
  ap.add_argument("--python", default="python3", help="interpreter that creates the venv (>=3.11)")
  ap.add_argument("--skip-install", action="store_true", help="only start the run")
  ap.add_argument("--follow", action="store_true",
                  help="wait for the run to end and exit with its status")
  ap.add_argument("--stop", action="store_true", help="SIGTERM the run --name on all workers")
  ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  args = ap.parse_args(own)
  try:
    target = Target(args.tpu, args.zone, args.project)
    if args.stop:
      if run_args:
        raise ValueError(f"--stop takes no run arguments, got {shlex.join(run_args)!r}")
      commands = stop_commands(target, args.remote_dir, args.name)
    else:
      if args.skip_install and (args.repo or args.ref or args.copy):
        raise ValueError("--skip-install installs nothing: drop --repo/--ref/--copy")
      source = None if args.skip_install else resolve_source(args.repo, args.ref, args.copy)
      commands = launch_commands(target, run_args, source, remote_dir=args.remote_dir,
                                 tag=args.name, python=args.python, follow=args.follow)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.dry_run:
    for c in commands:
      print(shlex.join(c))
    return 0
  return run_commands(commands)


if __name__ == "__main__":
  sys.exit(main())
