"""radio-launch: recipe + cluster config -> plan (printed by --dry-run) -> local ranks or a SLURM job."""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

from radio_scale.config import ConfigError, config_to_yaml, load_config, recipe_path
from radio_scale.launchers.cluster import CLUSTER_ENV, ClusterConfig, cluster_source, load_cluster


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr and exit code 2 (no usage block)."""

    def error(self, message: str):
        message = re.sub(r"^argument (\S+?)(/\S+)?: ", r"\1 ", " ".join(message.split()))
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="radio-launch",
        description="Launch an AM-RADIO distillation: locally (default) or on SLURM through submitit.",
        epilog="Overrides are dotted keys: radio-launch --recipe smoke optim.lr=5e-4 stages.0.steps=20",
    )
    p.add_argument("--recipe", default="smoke", help="shipped recipe name (smoke, two_stage, ...) or a YAML path")
    p.add_argument("--nodes", type=positive_int, default=1, help="nodes; ranks = nodes x the cluster's tasks_per_node")
    p.add_argument("--cluster", default=None,
                   help=f"cluster YAML (default: ${CLUSTER_ENV} if set, else this machine, see cluster_configs/local.yaml)")
    p.add_argument("--name", default=None, help="run name (the run directory is <run_root>/<name>)")
    p.add_argument("--run-dir", default=None, help="explicit run directory (re-using one resumes that run)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the exact submission; start nothing")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--wait", action="store_true", help="SLURM: wait for the job to end")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p


def hardware_overrides(cluster: ClusterConfig) -> list[str]:
    """The cluster's device figures as config overrides (the user's own overrides come after them and win)."""
    tflops = "null" if cluster.gpu_tflops is None else repr(float(cluster.gpu_tflops))
    out = [f"hardware.gpu_memory_gb={float(cluster.gpu_memory_gb)!r}", f"hardware.gpu_tflops={tflops}",
           f"hardware.ranks_per_node={int(cluster.tasks_per_node)}"]
    if cluster.interconnect_gbps is not None:
        out.append(f"hardware.interconnect_gbps={float(cluster.interconnect_gbps)!r}")
    return out


def plan_all(cfg, world: int) -> list:
    """The plan of every stage at this world size: the same function, on the same config, as the ranks."""
    from radio_scale.distributed.plan import plan_for_run

    return [plan_for_run(cfg, world, i) for i in range(len(cfg.stages))]


def plan_record(cfg, world: int, cluster: ClusterConfig, plans: list) -> dict:
    """What plan.json holds (the ranks check their own plan against it before they start)."""
    return {"world_size": world, "cluster": cluster.name, "stages": [
        {"name": s.name, "steps": s.steps, **p.to_dict()} for s, p in zip(cfg.stages, plans)]}


def main(argv=None) -> int:
    """Entry point of `radio-launch`; returns the process exit code."""
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.name:
        overrides.append(f"name={args.name}")
    try:
        cluster_path, source = cluster_source(args.cluster)
        try:
            cluster = load_cluster(cluster_path)
        except ConfigError as e:
            if source == f"${CLUSTER_ENV}":
                raise ConfigError(f"{e} (set by ${CLUSTER_ENV})") from None
            raise
        if args.nodes < 1:
            raise ConfigError(f"--nodes must be >= 1, got {args.nodes}")
        if args.nodes > 1 and cluster.kind == "local":
            where = (f"{cluster_path}, from {source}" if cluster_path
                     else f"the default: neither --cluster nor ${CLUSTER_ENV} is set")
            raise ConfigError(
                f"--nodes {args.nodes}: cluster '{cluster.name}' ({where}) is this one machine; pick a multi-node "
                f"cluster with --cluster <cluster.yaml>, or set {CLUSTER_ENV}=<cluster.yaml> once for the site "
                f"(examples in cluster_configs/)")
        check_files = not (args.dry_run or args.print_config)
        # the cluster's device figures become part of the run's config, so every rank plans against them too
        cfg = load_config(args.recipe, [*hardware_overrides(cluster), *overrides], check_files=check_files)
        if cluster.mlflow_uri and cfg.tracking.uri is None:
            cfg = replace(cfg, tracking=replace(cfg.tracking, uri=cluster.mlflow_uri))
        world = args.nodes * cluster.tasks_per_node
        run_dir = Path(args.run_dir) if args.run_dir else Path(cfg.run_dir or Path(cluster.run_root) / cfg.name)
        cfg = replace(cfg, run_dir=str(run_dir.resolve()))
        if args.print_config:
            print(config_to_yaml(cfg), end="")
            return 0
        try:
            plans = plan_all(cfg, world)
        except ValueError as e:  # e.g. a group asking for more ranks than the world has: name the recipe file
            raise ConfigError(f"{recipe_path(args.recipe)}: {e}") from None
    except (ConfigError, ValueError) as e:
        print(f"radio-launch: {' '.join(str(e).split())}", file=sys.stderr)  # always one line
        return 2

    if args.dry_run:
        print_dry_run(cfg, cluster, args.nodes, world, plans, run_dir, cluster_from=_cluster_from(cluster_path, source))
        return 0

    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    config_path.write_text(config_to_yaml(cfg))
    (run_dir / "plan.json").write_text(json.dumps(plan_record(cfg, world, cluster, plans), indent=1, default=str))
    (run_dir / "launch.json").write_text(json.dumps({
        "cluster": cluster.name, "cluster_file": _cluster_from(cluster_path, source), "kind": cluster.kind,
        "nodes": args.nodes, "world_size": world,
        "git_revision": git_revision(), "argv": sys.argv[1:] if argv is None else list(argv)}, indent=1))
    mlflow_at = cfg.tracking.uri or f"sqlite:///{run_dir / 'mlflow.db'}"
    if cluster.kind == "slurm":
        from radio_scale.launchers.slurm import submit

        job = submit(cluster, args.nodes, config_path, run_dir, cfg.name)
        print(f"submitted SLURM job {job.job_id}: {world} ranks on {args.nodes} node(s)")
        _print_where(run_dir, mlflow_at)
        if args.wait:
            job.wait()
            state = job.state
            print(f"job {job.job_id} ended: {state}")
            return 0 if state == "COMPLETED" else 1
        return 0

    from radio_scale.launchers.local import launch

    print(f"launching {world} local rank(s) for recipe '{cfg.name}'")
    _print_where(run_dir, mlflow_at)
    code = launch(cluster, world, config_path, run_dir)
    if code == 0:
        print(f"finished: export in {run_dir / 'export'}")
    else:
        print(f"ranks exited with code {code}; run the same command again to resume from the newest checkpoint",
              file=sys.stderr)
    return code


def git_revision() -> str:
    """The source revision being launched (commit, '+dirty' if modified), or 'unknown' outside a checkout."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cluster_from(path, source: str) -> str:
    return f"{Path(path).resolve()} (from {source})" if path else "none (this machine)"


def _print_where(run_dir: Path, mlflow_at: str) -> None:
    print(f"run directory: {run_dir}")
    print(f"mlflow:        {mlflow_at}  (UI: radio-monitor ui {run_dir})")
    print(f"monitor:       radio-monitor status {run_dir} --watch")


def print_dry_run(cfg, cluster: ClusterConfig, nodes: int, world: int, plans: list, run_dir: Path,
                  cluster_from: str = "") -> None:
    """The resolved plan of every stage, then the exact submission."""
    print(f"recipe {cfg.name}: {world} ranks = {nodes} node(s) x {cluster.tasks_per_node} on cluster '{cluster.name}' "
          f"({cluster.kind}); student {cfg.student.arch}; {cfg.total_steps} steps")
    if cluster_from:
        print(f"cluster file: {cluster_from}")
    for stage, plan in zip(cfg.stages, plans):
        print(f"\nstage '{stage.name}': {stage.steps} steps")
        print(plan.table())
    print("\nsubmission:")
    if cluster.kind == "slurm":
        from radio_scale.launchers.slurm import sbatch_preview

        print(sbatch_preview(cluster, nodes, cfg.name, run_dir.resolve() / "slurm"))
    else:
        from radio_scale.launchers.local import local_command

        print(" ".join(local_command(world, run_dir.resolve() / "config.yaml", run_dir.resolve())))


if __name__ == "__main__":
    sys.exit(main())
