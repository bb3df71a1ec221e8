"""The `nnunetv2_smms` console command.

Each subcommand lives in the module that owns its idea and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (called with the parsed arguments). Heavy imports happen inside those functions so
that ``--help`` stays fast.
"""
import argparse
import importlib
import sys

SUBCOMMAND_MODULES = (
    "nnunetv2_smms.ext_trainer_dir",
    "nnunetv2_smms.unlabeled.preprocess",
    "nnunetv2_smms.demo",
    "nnunetv2_smms.evaluation.evaluate",
    "nnunetv2_smms.compare",
    "nnunetv2_smms.inference.predict",
    "nnunetv2_smms.dataset_conversion.brats",
    "nnunetv2_smms.dataset_conversion.ct_mr",
    "nnunetv2_smms.dataset_conversion.arguments",
    "nnunetv2_smms.planning",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunetv2_smms",
        description="Semi-supervised multi-modal segmentation (SMMS) for nnU-Net v2. "
                    "Run 'nnunetv2_smms <command> -h' for the options of one command.")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
