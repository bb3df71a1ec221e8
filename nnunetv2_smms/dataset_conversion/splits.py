"""The split of the cases into labeled / unlabeled / validation / test: drawn from amounts and a seed, or read
back from a manifest; and nnU-Net's splits_final.json content for it."""
import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from nnunetv2_smms.dataset_conversion.checks import ConversionError
from nnunetv2_smms.dataset_conversion.layout import MANIFEST_NAME, ROLE_FOLDERS

# the paper: 250 / 25 / 60 of 335 BraTS 2019 cases; 7.5 % and 18 % of 335 round to 25 and 60
DEFAULT_LABELED, DEFAULT_VAL, DEFAULT_TEST, DEFAULT_SEED = "10%", "7.5%", "18%", 0

Amount = Union[int, float, str]


def parse_amount(value: Amount, option: str) -> Union[int, float]:
    """A number of cases (int: 12, '12') or a fraction (float: 0.05, '0.05', '5%')."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else int(text) if text.isdigit() else float(text)
        except ValueError:
            raise ConversionError(f"{option} {text!r}: give a number of cases (12), a fraction (0.05) or a "
                                  f"percentage (5%)") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConversionError(f"{option} {value!r}: must be a number of cases or a fraction >= 0")
    if isinstance(value, float) and value > 1:
        raise ConversionError(f"{option} {value!r}: a fraction must be at most 1 (100%); give a number of "
                              f"cases as an integer")
    return value


def _count(amount: Union[int, float], total: int) -> int:
    """Cases for an amount: an int as is; a fraction of total rounded half up, at least 1 if it is > 0."""
    if isinstance(amount, int):
        return amount
    n = int(amount * total + 0.5)
    return max(n, 1) if amount > 0 else 0


def make_split(case_ids: Iterable[str], labeled: Amount, val: Amount, test: Amount, seed: int,
               unlabeled_only: Iterable[str] = ()) -> Dict[str, str]:
    """{case: 'labeled' | 'unlabeled' | 'val' | 'test'}.

    The sorted cases are shuffled once with the seed; the first ones are the test cases, the next ones the
    validation cases, the rest is the training pool whose first cases are labeled. Only the counts depend on
    the amounts, so for one seed a smaller labeled set lies inside a larger one and test and validation stay
    the same. Fractions of test and val are of all cases, the labeled fraction is of the training pool.
    Cases in ``unlabeled_only`` (no label exists) are unlabeled training cases outside the shuffle.
    """
    import numpy as np

    unlabeled_only = sorted(set(unlabeled_only))
    ids = sorted(set(case_ids) - set(unlabeled_only))
    order = [ids[i] for i in np.random.RandomState(seed).permutation(len(ids))]
    n_test = _count(parse_amount(test, "--test"), len(ids))
    n_val = _count(parse_amount(val, "--val"), len(ids))
    n_pool = len(ids) - n_test - n_val
    n_labeled = _count(parse_amount(labeled, "--labeled"), max(n_pool, 0))
    if n_val < 1:
        raise ConversionError("--val 0: nnU-Net's fold 0 needs at least one validation case")
    if n_labeled < 1 or n_labeled > n_pool:
        raise ConversionError(
            f"{len(ids)} cases minus {n_test} test and {n_val} validation cases leave {n_pool} for "
            f"training, so --labeled {labeled} ({n_labeled} cases) is impossible; lower --test/--val or change "
            f"--labeled")
    bounds = (("test", n_test), ("val", n_test + n_val), ("labeled", n_test + n_val + n_labeled))
    roles = {case: next((role for role, end in bounds if i < end), "unlabeled") for i, case in enumerate(order)}
    roles.update({case: "unlabeled" for case in unlabeled_only})
    return dict(sorted(roles.items()))


def resolve_split(case_ids: Sequence[str], labeled: Optional[Amount], val: Optional[Amount],
                  test: Optional[Amount], seed: Optional[int], manifest: Optional[Union[str, Path]],
                  unlabeled_only: Iterable[str] = ()) -> Tuple[Dict[str, str], dict]:
    """The roles of the cases and the manifest's "split" entry: drawn from the options, or read from a manifest."""
    if manifest is None:
        split = {"labeled": DEFAULT_LABELED if labeled is None else labeled,
                 "val": DEFAULT_VAL if val is None else val,
                 "test": DEFAULT_TEST if test is None else test,
                 "seed": DEFAULT_SEED if seed is None else int(seed)}
        return make_split(case_ids, unlabeled_only=unlabeled_only, **split), split
    given = [f"--{name}" for name, v in (("labeled", labeled), ("val", val), ("test", test), ("seed", seed))
             if v is not None]
    if given:
        raise ConversionError(f"--manifest fixes the split; leave out {', '.join(given)}")
    return _split_from_manifest(Path(manifest), case_ids, unlabeled_only)


def _split_from_manifest(path: Path, case_ids: Sequence[str], unlabeled_only: Iterable[str]):
    try:
        old = json.loads(path.read_text())
        roles = {case: entry["role"] for case, entry in old["cases"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConversionError(f"--manifest {path}: not a readable {MANIFEST_NAME} ({e!r})") from None
    unknown_roles = sorted({r for r in roles.values() if r not in ROLE_FOLDERS})
    missing, extra = sorted(set(roles) - set(case_ids)), sorted(set(case_ids) - set(roles))
    if unknown_roles or missing or extra:
        raise ConversionError(
            f"--manifest {path} does not fit the source: "
            + "; ".join(filter(None, [
                unknown_roles and f"unknown roles {unknown_roles}",
                missing and f"cases in the manifest but not in the source: {missing}",
                extra and f"cases in the source but not in the manifest: {extra} (leave them out with --exclude)"])))
    wrong = sorted(c for c in unlabeled_only if roles[c] != "unlabeled")
    if wrong:
        raise ConversionError(f"--manifest {path} gives a label-needing role to {wrong}, which have no label")
    split = {k: v for k, v in old.get("split", {}).items() if k != "from_manifest"}
    return dict(sorted(roles.items())), {"from_manifest": str(path.resolve()), **split}


def splits_final(roles: Dict[str, str]) -> List[dict]:
    """nnU-Net's splits_final.json content: one fold, train = labeled cases, val = validation cases."""
    return [{"train": sorted(c for c, r in roles.items() if r == "labeled"),
             "val": sorted(c for c, r in roles.items() if r == "val")}]
