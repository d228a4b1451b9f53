"""Ray jobs of memray sweeps: what `launch/submit` and `launch/resume` run.

Owns the job a cluster runs for a sweep: its stable submission id (`memray-<name>`,
`memray-<name>-resume`), its entrypoint (`python -m memray.cli run|resume ... --address
auto`) and its runtime environment (launch/runtime-env.yaml: the checkout as working
directory, secrets by name), and the checks made here before anything reaches the cluster
(the cluster extra is installed, the sweep file is valid).

Where the packages come from:
- a remote cluster's nodes have memray's locked set installed (launch/cluster.yaml's
  set-up, or an image built from launch/Dockerfile): the job runs their `python`;
- with `--pip` the job's runtime env installs the locked set (.ci/requirements.lock, Ray
  left out) on nodes that run a stock Ray image;
- a cluster whose every node is this machine (`ray start` here) shares this environment
  and this checkout: the job runs this interpreter in the checkout, uploads and installs
  nothing.

Secrets: WANDB_API_KEY and HF_TOKEN set here when submitting are handed to the job's
processes (driver and trials) as runtime-env variables; unset, each node's own variable of
that name is used (a Kubernetes Secret, the cluster's set-up). Neither is put on a command
line or in a file by this script.

Usage (from the repository root, with the project's interpreter; the shell scripts do this):
  python launch/jobs.py submit [--pip] SWEEP_FILE STORAGE [key=value ...]
  python launch/jobs.py resume [--pip] SWEEP_DIR
Environment: RAY_ADDRESS (the dashboard, default http://127.0.0.1:8265); RAY_AUTH_MODE=token
with RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token for token authentication.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_ENV = ROOT / "launch" / "runtime-env.yaml"
LOCK = ROOT / ".ci" / "requirements.lock"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
#: Handed to the job from this environment when set here (else from each node's own).
SECRETS = ("WANDB_API_KEY", "HF_TOKEN")
INSTALL_HINT = "install with `bash .ci/setup` (or pip install -c .ci/requirements.lock -e '.[cluster]')"


def missing_cluster_extra() -> list[str]:
    """Requirements of memray's `cluster` extra (ray[default] and what it pulls in, boto3)
    that this environment lacks, e.g. ["aiohttp-cors (from ray[default])"]; [] if none."""
    from packaging.requirements import Requirement

    def absent(requirement: Requirement, extra: str, via: str) -> list[str]:
        if requirement.marker and not requirement.marker.evaluate({"extra": extra}):
            return []
        try:
            metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            return [f"{requirement.name} ({via})" if via else requirement.name]
        missing = []
        for wanted in requirement.extras:
            for dependency in metadata.requires(requirement.name) or []:
                missing += absent(Requirement(dependency), wanted, f"from {requirement.name}[{wanted}]")
        return missing

    missing = []
    for text in metadata.requires("memray-ft") or []:
        missing += absent(Requirement(text), "cluster", "")
    return missing


def _fail(message: str, code: int = 2) -> None:
    print(f"launch: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _check_environment() -> None:
    try:
        metadata.version("memray-ft")
    except metadata.PackageNotFoundError:
        _fail(f"{sys.executable} has no memray installed: {INSTALL_HINT}, or set PYTHON")
    missing = missing_cluster_extra()
    if missing:
        _fail(f"{sys.executable} lacks the cluster extra ({', '.join(missing)}): {INSTALL_HINT}")


def node_pins() -> list[str]:
    """The locked set as pip requirements, Ray left out (nodes run their image's Ray)."""
    pins = [line.strip() for line in LOCK.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return [pin for pin in pins if re.split(r"[=\[]", pin, maxsplit=1)[0].lower() != "ray"]


def runtime_env(pip: bool, environ: dict[str, str] | None = None) -> dict:
    """launch/runtime-env.yaml with the working directory made absolute, each secret's value
    from `environ` where set there, and the locked set as `pip` when asked."""
    import yaml

    environ = os.environ if environ is None else environ
    env = yaml.safe_load(RUNTIME_ENV.read_text())
    env["working_dir"] = str((ROOT / env.get("working_dir", ".")).resolve())
    variables = dict(env.get("env_vars") or {})
    for name in SECRETS:
        if environ.get(name):
            variables[name] = environ[name]
    env["env_vars"] = variables
    if pip:
        env["pip"] = {"packages": node_pins()}
    return env


def _local_addresses() -> set[str]:
    import psutil

    return {address.address for addresses in psutil.net_if_addrs().values() for address in addresses}


def cluster_is_this_machine(dashboard: str) -> bool:
    """Whether every alive node of the cluster (its dashboard's URL) has an address of this
    machine; False when the dashboard does not say."""
    from ray.util.state import list_nodes

    try:
        nodes = list_nodes(address=dashboard, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    except Exception:  # noqa: BLE001 - an older or restricted dashboard: treat the nodes as remote
        return False
    return bool(nodes) and {node.node_ip for node in nodes} <= _local_addresses()


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as err:  # noqa: BLE001 - connection and authentication errors alike
        hint = ("; with token authentication: export RAY_AUTH_MODE=token and the cluster's token "
                "(RAY_AUTH_TOKEN or ~/.ray/auth_token)") if "auth" in str(err).lower() or "401" in str(err) else ""
        _fail(f"cannot reach the Ray cluster at {address} (set RAY_ADDRESS to its dashboard, e.g. "
              f"http://127.0.0.1:8265 through `ray dashboard launch/cluster.yaml`): {err}{hint}", 1)


def job_plan(dashboard: str, pip: bool, arguments: list[str]) -> tuple[str, dict]:
    """(entrypoint, runtime env) of a job running `python -m memray.cli ARGUMENTS`.

    On a cluster of this machine (every node started here, from this environment) the job
    runs this interpreter in this checkout, uploads nothing and installs nothing: the nodes
    share both, and a working directory extracted under the one session folder they also
    share would be deleted by one node while another runs in it. Elsewhere the checkout
    travels as the working directory and the nodes' `python` runs it."""
    command = " ".join(shlex.quote(arg) for arg in ["-m", "memray.cli", *arguments])
    env = runtime_env(pip)
    if not pip and cluster_is_this_machine(dashboard):
        del env["working_dir"], env["excludes"]
        return f"cd {shlex.quote(str(ROOT))} && exec {shlex.quote(sys.executable)} {command}", env
    return f"python {command}", env


def _job_state(client, job_id: str) -> str | None:
    try:
        return str(client.get_job_status(job_id).value)
    except RuntimeError:  # no such job
        return None


def _sweep_name(sweep_file: str, overrides: list[str]) -> str:
    """Validate the sweep file whole (keys, models, methods, resource rules); its name."""
    from memray.config import ConfigError
    from memray.sweep.planning import load_checked

    try:
        sweep, _, _ = load_checked(sweep_file, overrides, published=True)
    except ConfigError as err:
        print(f"memray: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return sweep.name


def _job_path(path: str, cwd: Path) -> str:
    """A local path as the job sees it: relative to the checkout (which travels as the
    working directory) when inside it, else absolute (the nodes must see it: shared storage)."""
    if "://" in path:
        return path
    absolute = (cwd / path).resolve()
    try:
        return str(absolute.relative_to(ROOT))
    except ValueError:
        return str(absolute)


def _submit_job(client, job_id: str, arguments: list[str], pip: bool) -> None:
    entrypoint, env = job_plan(client.get_address(), pip, arguments)
    client.submit_job(entrypoint=entrypoint, submission_id=job_id, runtime_env=env)
    print(f"submitted {job_id}: follow with `ray job logs --follow {job_id}` "
          f"(status: `ray job status {job_id}`)")


def submit(sweep_file: str, storage: str, overrides: list[str], pip: bool, address: str, cwd: Path) -> int:
    """Validate the sweep here, then start it on the cluster as job memray-<name>. Returns 0
    once submitted; 1 if a job of that id exists (one sweep never has two drivers)."""
    name = _sweep_name(str(cwd / sweep_file), overrides)
    job_id = f"memray-{name}"
    client = _client(address)
    state = _job_state(client, job_id)
    if state is not None:
        _fail(f"job {job_id} exists ({state}): one sweep has one driver; finish it with "
              f"`launch/resume {storage.rstrip('/')}/{name}`, or delete the job (`ray job delete {job_id}`) "
              "and the sweep folder to start over", 1)
    storage_path = storage if "://" in storage else str((cwd / storage).resolve())
    arguments = ["run", _job_path(sweep_file, cwd), *overrides, "--address", "auto", "--storage", storage_path]
    _submit_job(client, job_id, arguments, pip)
    print(f"the sweep folder is {storage_path.rstrip('/')}/{name}")
    return 0


def resume(sweep_dir: str, pip: bool, address: str, cwd: Path) -> int:
    """Start job memray-<name>-resume, which finishes the sweep's unfinished trials. Refuses
    (1) while the sweep's run or resume job is pending or running; a finished resume job of
    the same id is deleted first."""
    location = sweep_dir.rstrip("/") if "://" in sweep_dir else str((cwd / sweep_dir).resolve())
    name = location.rstrip("/").rsplit("/", 1)[-1]
    job_id = f"memray-{name}-resume"
    client = _client(address)
    for job in (f"memray-{name}", job_id):
        if _job_state(client, job) in ("PENDING", "RUNNING"):
            _fail(f"job {job} is still running: stop it first (`ray job stop {job}`)", 1)
    if _job_state(client, job_id) is not None:
        client.delete_job(job_id)
    _submit_job(client, job_id, ["resume", location, "--address", "auto"], pip)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch", description="memray sweeps as Ray jobs")
    commands = parser.add_subparsers(dest="command", required=True)
    pip_help = "install the locked set in the job's runtime env (nodes on a stock Ray image)"
    p = commands.add_parser("submit", help="start a sweep as job memray-<name>")
    p.add_argument("--pip", action="store_true", help=pip_help)
    p.add_argument("sweep_file")
    p.add_argument("storage", help="a path every node mounts (/mnt/memray) or an s3:// / gs:// URI")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p = commands.add_parser("resume", help="finish a sweep as job memray-<name>-resume")
    p.add_argument("--pip", action="store_true", help=pip_help)
    p.add_argument("sweep_dir")
    args = parser.parse_args(argv)
    _check_environment()
    sys.path.insert(0, str(ROOT))  # this checkout's memray, whatever the environment installed
    address = os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    cwd = Path(os.environ.get("LAUNCH_CWD") or os.getcwd())
    os.chdir(ROOT)
    if args.command == "submit":
        return submit(args.sweep_file, args.storage, args.overrides, args.pip, address, cwd)
    return resume(args.sweep_dir, args.pip, address, cwd)


if __name__ == "__main__":
    sys.exit(main())
