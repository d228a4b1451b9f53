"""The `memray` command line: trial, run, resume, status, report, bench.

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
    from memray.config import load_trial

    config = load_trial(args.file, args.overrides, cell=args.cell)
    if args.output_dir:
        config.output_dir = args.output_dir
    from memray import methods, models, trial  # heavy imports only after the config is valid

    models.check_model(config.model, args.file)
    methods.check_method(models.model_config(config.model), config.method, args.file)
    trial_dir = Path(args.trial_dir) if args.trial_dir else trial.default_trial_dir(config)
    print(f"[memray] trial folder: {trial_dir}", file=sys.stderr)
    final = trial.run_trial(config, trial_dir=trial_dir, resume=not args.fresh, progress=not args.quiet)
    print(trial.summary_table(trial_dir))
    return 0 if final else 1


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
    p.set_defaults(handler=_trial)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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


if __name__ == "__main__":
    sys.exit(main())
