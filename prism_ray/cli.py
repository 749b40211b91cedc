"""`prism-ray`: run the pipeline or one stage of it, plan a run, and read a run's status and report.

Exit codes: 0 done, 1 some units failed (the message names them and how to resume), 2 a problem to fix
before anything can run (config, data, storage, teachers), 128 + N stopped by signal N (130 Ctrl-C,
143 SIGTERM from `ray job stop`): committed units are kept and a rerun finishes the rest.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from prism_ray.config import STAGES, ConfigError
from prism_ray.config_loader import load_config

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _expected_errors() -> tuple[type[BaseException], ...]:
    from prism_ray.algo.teachers import TeacherError
    from prism_ray.data import DataError
    from prism_ray.stages.base import StageError
    from prism_ray.storage import StorageError
    return ConfigError, DataError, StorageError, TeacherError, StageError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (none: PRISM's reference settings on Fashion-MNIST on a local Ray; "
                        "jobs/configs/fmnist-demo.yaml is the quick demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config field (repeatable), e.g. --set recover.lr=0.1")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--fresh", action="store_true",
                   help="start the stage(s) over, and every stage that reads their outputs (those are reset too)")
    p.add_argument("--take-over", action="store_true",
                   help="take the run's lease now even if another driver seems to hold it (you know it is gone); "
                        "without it a lease not renewed for run.lease_seconds is taken over automatically")
    p.add_argument("--local", action="store_true", help="run units in this process, without Ray")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--json", action="store_true", help="print the stage reports as JSON at the end")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the configured stages in order (run.stages)")
    _add_run_args(p)
    p.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)}")
    for stage in STAGES:
        _add_run_args(sub.add_parser(stage, help=f"run the {stage} stage only"))
    p = sub.add_parser("plan", help="print what a run would do and its GPU-hours, without running anything")
    _add_config_args(p)
    p.add_argument("--gpu", default="H200", help="GPU the bill is for: H100, H200, A100, A10G, L4, RTX 4090")
    p.add_argument("--gpus", type=int, help="also estimate the wall time on this many GPUs")
    p.add_argument("--efficiency", type=float, help="fraction of the GPU's bf16 peak to assume for every stage")
    p.add_argument("--bench", action="append", metavar="JSON",
                   help="bench JSON measured on that GPU (default: bench/results/*.json here, if any)")
    p = sub.add_parser("validate", help="check a config and print it resolved")
    _add_config_args(p)
    p = sub.add_parser("index", help="list the data set once into index files that runs can share (data.index)")
    _add_config_args(p)
    p.add_argument("--out", metavar="URI", help="folder for train-index.parquet and val-index.parquet "
                                                "(default: data.index, else RUN_OUTPUT/data)")
    for name, text in (("status", "what is committed, missing and failed, per stage (reads storage only)"),
                       ("report", "print the results table of a run")):
        p = sub.add_parser(name, help=text)
        p.add_argument("run_uri", help="the run's output URI (run.output)")
        p.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
        p.add_argument("--json", action="store_true")
        if name == "status":
            p.add_argument("--verify", action="store_true",
                           help="also read every committed output and check it against its manifest's sha256, and "
                                "every stage's lineage (exit 1 on any problem)")
            p.add_argument("--watch", action="store_true",
                           help="refresh from storage until the run completes (exit 0), or stops with failed units "
                                "(exit 1)")
            p.add_argument("--interval", type=float, default=5.0, help="--watch: seconds between refreshes (5)")
    p = sub.add_parser("export", help="write one set of a run as an ImageFolder tree or Hugging Face Parquet, with "
                                      "a dataset card")
    p.add_argument("run_uri", help="the run's output URI (run.output)")
    p.add_argument("--set", dest="set_name", required=True, metavar="NAME", help="the set (e.g. prism, random_real)")
    p.add_argument("--to", required=True, metavar="DIR_OR_URI", help="an empty folder or prefix (local, s3://...)")
    p.add_argument("--format", required=True, choices=["imagefolder", "parquet"])
    p.add_argument("--soft-labels", action="store_true", help="also copy the set's stored soft labels")
    p.add_argument("--endpoint-url", help="S3 endpoint for both URIs (default: AWS_ENDPOINT_URL)")
    sub.add_parser("teachers", help="list the architectures teachers and students can use")
    p = sub.add_parser("config-reference", help="print every config field (type, default, allowed values, meaning) "
                                                "as Markdown: docs/config.md")
    p.add_argument("--out", metavar="PATH", help="write it to PATH instead of printing it")
    p = sub.add_parser("release", help="withdraw every run's request to the cluster's autoscaler (nodes it kept "
                                       "up for runs that are gone can then scale down)")
    p.add_argument("--address", default="auto",
                   help="the cluster (default: RAY_ADDRESS, else the Ray started on this machine)")
    p = sub.add_parser("sweep", help="run one config at many points (each a run; shared teachers) into one table")
    _add_config_args(p)
    p.add_argument("--grid", required=True, metavar="SWEEP.yaml",
                   help="the sweep file: base, output, set, vary, grid, points (see docs/sweep.md)")
    p.add_argument("--only", help="comma-separated point names to run (the table keeps every finished point)")
    p.add_argument("--local", action="store_true", help="run units in this process, without Ray")
    p.add_argument("--quiet", action="store_true", help="no per-stage progress lines")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from prism_ray.orchestration.stopping import Interrupted

    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except _expected_errors() as e:
        from prism_ray.redaction import redact_uri
        print(f"prism-ray: error: {redact_uri(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as e:
        print(f"prism-ray: {e.summary()}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("prism-ray: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - an unexpected failure: its traceback, with any credentials redacted
        import traceback

        from prism_ray.redaction import redact_uri
        print(redact_uri(traceback.format_exc()), file=sys.stderr, end="")
        return EXIT_FAILED


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "release":
        from prism_ray.config import RayConfig
        from prism_ray.orchestration import autoscaler
        from prism_ray.orchestration.cluster import ray_session
        with ray_session(RayConfig(address=args.address)):
            n = autoscaler.release()
        print(f"withdrew the autoscaler requests of {n} run(s); idle nodes scale down after the idle timeout")
        return EXIT_OK
    if args.command == "teachers":
        from prism_ray.algo.teachers import ARCHITECTURES
        print("\n".join(sorted(ARCHITECTURES)))
        return EXIT_OK
    if args.command == "config-reference":
        from prism_ray.config_reference import reference_markdown
        text = reference_markdown()
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                f.write(text)
        else:
            print(text, end="")
        return EXIT_OK
    if args.command in ("status", "report"):
        from prism_ray import status
        from prism_ray.config import StorageConfig
        from prism_ray.storage import Storage
        storage = Storage(args.run_uri, StorageConfig(endpoint_url=args.endpoint_url))
        if args.command == "status":
            if args.watch:
                if args.interval <= 0:
                    raise ConfigError("--interval", f"got {args.interval:g}; allowed: > 0")
                return status.watch(storage, interval=args.interval, as_json=args.json)
            code = status.print_status(storage, as_json=args.json)
            if args.verify:
                problems = status.verify_run(storage)
                for problem in problems:
                    print(f"verify: {problem}", file=sys.stderr)
                summary = f"{len(problems)} problem(s)" if problems else "every committed output matches its manifest"
                print(f"verify: {summary}", file=sys.stderr)
                return EXIT_FAILED if problems else code
            return code
        from prism_ray import report
        return report.print_report(storage, as_json=args.json)

    if args.command == "export":
        from prism_ray.config import StorageConfig
        from prism_ray.export import export_set
        from prism_ray.storage import Storage
        storage_cfg = StorageConfig(endpoint_url=args.endpoint_url)
        export_set(Storage(args.run_uri, storage_cfg), args.set_name, Storage(args.to, storage_cfg), args.format,
                   soft_labels=args.soft_labels, say=lambda line: print(line, file=sys.stderr))
        return EXIT_OK
    if args.command == "sweep":
        from prism_ray.sweep import load_sweep, run_sweep
        sweep = load_sweep(args.grid, args.config, args.overrides)
        only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
        return run_sweep(sweep, local=args.local, quiet=args.quiet, only=only)
    cfg = load_config(args.config, args.overrides)
    if args.command == "validate":
        import yaml
        print(yaml.safe_dump(cfg.to_dict(redact=True), sort_keys=False), end="")
        return EXIT_OK
    if args.command == "index":
        from prism_ray.data.index import index_name
        from prism_ray.runs import index_data
        out, indexes = index_data(cfg, args.out)
        for split, idx in indexes.items():
            checked = ", every image decoded" if idx.verified else ""
            print(f"{split}: {len(idx):,} images, {len(idx.class_names):,} classes{checked} -> {out}/{index_name(split)}")
        return EXIT_OK
    if args.command == "plan":
        from prism_ray import estimate, plan
        n = plan.num_classes_for(cfg)
        print(plan.describe(cfg, n))
        print("\n".join(estimate.bill_lines(estimate.bill(cfg, n, args.gpu, args.efficiency, args.bench),
                                             args.gpus)))
        return EXIT_OK
    if args.command == "run":
        stages = args.stages.split(",") if args.stages else list(cfg.run.stages)
        for s in stages:
            if s not in STAGES:
                raise ConfigError("--stages", f"unknown stage {s!r}; allowed: {', '.join(STAGES)}")
    else:
        stages = [args.command]
    return run_command(cfg, stages, fresh=args.fresh, local=args.local, quiet=args.quiet, as_json=args.json,
                       take_over=args.take_over)


def run_command(cfg, stage_names: list[str], fresh: bool = False, local: bool = False, quiet: bool = False,
                as_json: bool = False, take_over: bool = False) -> int:
    """Run `stage_names` of `cfg` and summarise: the body of `prism-ray run` and the per-stage commands."""
    from prism_ray.pipeline import execute

    reports = execute(cfg, stage_names, fresh=fresh, local=local, quiet=quiet, take_over=take_over)
    if as_json:
        print(json.dumps([r.to_json() for r in reports], indent=2))
    failed = [r for r in reports if not r.complete]
    for r in reports:
        if not quiet:
            cluster = r.cluster_line()
            print(f"{r.stage}: {r.ran} run, {r.skipped} already committed, {len(r.failed)} failed "
                  f"({r.seconds:.1f} s)" + (f"; {cluster}" if cluster else ""), file=sys.stderr)
    if failed:
        r = failed[0]
        names = ", ".join(sorted(r.failed)) or "(none recorded)"
        print(f"prism-ray: {r.stage}: {len(r.failed)} unit(s) failed: {names}.\n"
              + "\n".join(f"  {uid}: {err}" for uid, err in sorted(r.failed.items())[:10])
              + f"\nFix the cause and rerun the same command: committed units are kept, only the rest run. "
                f"`prism-ray status {cfg.run.output}` shows the state.", file=sys.stderr)
        return EXIT_FAILED
    if not quiet and "evaluate" in stage_names:
        _print_headline(cfg)
    return EXIT_OK


def _print_headline(cfg) -> None:
    """The report's path and its headline numbers, last on the terminal (the report itself is printed above)."""
    from prism_ray.report import REPORT, headline
    from prism_ray.storage import Storage

    storage = Storage(cfg.run.output, cfg.storage)
    try:
        figures = storage.read_json(f"{REPORT}/report.json")
    except FileNotFoundError:
        return
    print(f"report: {storage.uri(f'{REPORT}/report.md')}", file=sys.stderr)
    for line in headline(figures):
        print(f"  {line}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
