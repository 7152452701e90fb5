"""`safe sweep --variants a,b,...`: train variants one after another on the same data, then compare them."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from safe.config import check_variant
from safe.report import write_report
from safe.training import cli as train_cli


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variants", default="no_retention,soft_retention",
                        help="comma-separated variants, trained in this order")
    parser.add_argument("--report-dir", type=Path, default=None,
                        help="where the comparison goes (default <output-root>/sweep_<timestamp>)")
    train_cli.configure(parser)


def run(args: argparse.Namespace) -> int:
    from safe.training.trainer import train

    variants = [check_variant(v.strip()) for v in args.variants.split(",") if v.strip()]
    runs = []
    for variant in variants:
        args.variant = variant
        config = train_cli.config_from_args(argparse.Namespace(**{k: v for k, v in vars(args).items()
                                                                  if k not in ("variants", "report_dir")}))
        print(f"== {variant} ==", flush=True)
        if args.dry_run:  # each variant's figures (retention adds VL micro-batches), nothing trained
            from safe.training.dry_run import dry_run

            dry_run(config)
            continue
        result = train(config)
        if result["status"] != "completed":
            print(f"{variant} was interrupted at step {result['step']}; resume it with --resume.")
            return 3
        runs.append(Path(result["run_dir"]))
    if args.dry_run:
        return 0
    output_root = Path(config.train.output_root)
    report_dir = args.report_dir or output_root / f"sweep_{time.strftime('%Y%m%d_%H%M%S')}"
    report = write_report(runs, report_dir)
    print(report["markdown"].read_text(), end="")
    print(f"comparison written to {report_dir}")
    return 0
