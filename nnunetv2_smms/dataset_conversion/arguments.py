"""The converters' command line: the output and split options that convert-brats and convert-ct-mr share, and
the ``nnunetv2_smms install-split`` subcommand."""
from typing import Callable

from nnunetv2_smms.dataset_conversion.layout import MANIFEST_NAME, SPLITS_NAME
from nnunetv2_smms.dataset_conversion.splits import DEFAULT_LABELED, DEFAULT_SEED, DEFAULT_TEST, DEFAULT_VAL
from nnunetv2_smms.dataset_conversion.writing import install_dataset_split
from nnunetv2_smms.errors import cli_command


def add_output_arguments(parser) -> None:
    parser.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id (1-999)")
    parser.add_argument("-n", "--dataset-name", required=True,
                        help="dataset name; the folder is DatasetXXX_NAME")
    parser.add_argument("--output-root", default=None,
                        help="folder to write DatasetXXX_NAME into (default: $nnUNet_raw). The split is copied "
                             "into $nnUNet_preprocessed only when writing into $nnUNet_raw")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing DatasetXXX_NAME (and a different installed splits_final.json)")


def add_split_arguments(parser) -> None:
    default = lambda amount: str(amount).replace("%", "%%")  # noqa: E731 (argparse formats help with %)
    parser.add_argument("--labeled", default=None,
                        help=f"labeled training cases: a count (12), a fraction (0.05) or a percentage (5%%) of "
                             f"the training cases left after test and validation (default "
                             f"{default(DEFAULT_LABELED)})")
    parser.add_argument("--val", default=None,
                        help=f"validation cases: count, fraction or percentage of all cases (default "
                             f"{default(DEFAULT_VAL)})")
    parser.add_argument("--test", default=None,
                        help=f"test cases: count, fraction or percentage of all cases (default "
                             f"{default(DEFAULT_TEST)})")
    parser.add_argument("--seed", type=int, default=None, help=f"split seed (default {DEFAULT_SEED})")
    parser.add_argument("--manifest", default=None,
                        help=f"reproduce the split recorded in this {MANIFEST_NAME} (instead of --labeled/--val/"
                             f"--test/--seed)")
    parser.add_argument("--exclude", default="", type=lambda s: [c.strip() for c in s.split(",") if c.strip()],
                        help="comma-separated cases (folder names) to leave out")


def split_kwargs(args) -> dict:
    return dict(labeled=args.labeled, val=args.val, test=args.test, seed=args.seed, manifest=args.manifest,
                exclude=args.exclude, output_root=args.output_root, overwrite=args.overwrite)


def run_cli(action: Callable[[], object]) -> int:
    """Run a converter subcommand and print what it returns (errors: errors.cli_command around the caller)."""
    result = action()
    if result is not None:
        print(result)
    return 0


def _install_split_command(args) -> int:
    return run_cli(lambda: install_dataset_split(args.dataset, args.overwrite))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "install-split",
        help="copy a converted dataset's splits_final.json into $nnUNet_preprocessed/DatasetXXX_Name/",
        description=f"Copy $nnUNet_raw/DatasetXXX_Name/{SPLITS_NAME} (written by convert-brats / convert-ct-mr) "
                    f"to $nnUNet_preprocessed/DatasetXXX_Name/, where nnUNetv2_train reads it. nnU-Net's planner "
                    f"also copies it there when that file is missing; use this command when the preprocessed "
                    f"folder already holds another split.")
    p.add_argument("-d", "--dataset", required=True, help="dataset id or DatasetXXX_Name")
    p.add_argument("--overwrite", action="store_true", help="replace a different splits_final.json")
    p.set_defaults(func=cli_command(_install_split_command))
