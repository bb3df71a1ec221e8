"""The layout of a converted dataset: its folders per case role, its file names, and dataset.json's "smms" entry.

A converted dataset (nnU-Net v2 raw format plus three files of ours):

    DatasetXXX_Name/
        imagesTr/, labelsTr/   labeled training cases and validation cases (what nnU-Net plans and trains on)
        imagesUnlabeled/       unlabeled training cases, CASE_XXXX.nii.gz like imagesTr (nnU-Net ignores it)
        imagesTs/, labelsTs/   test cases
        dataset.json           with "smms": {"branch_a": [...], "branch_b": [...]} when there are 2+ channels
        splits_final.json      fold 0: train = labeled cases, val = validation cases
        smms_manifest.json     options, seed, source files and the role of every case
"""
from typing import Dict, List, Optional, Sequence

from nnunetv2_smms.dataset_conversion.checks import ConversionError

FILE_ENDING = ".nii.gz"
SPLITS_NAME = "splits_final.json"
MANIFEST_NAME = "smms_manifest.json"
MANIFEST_FORMAT = 1
# role -> (images folder, labels folder or None)
ROLE_FOLDERS = {
    "labeled": ("imagesTr", "labelsTr"),
    "val": ("imagesTr", "labelsTr"),
    "unlabeled": ("imagesUnlabeled", None),
    "test": ("imagesTs", "labelsTs"),
}
# for dataset.json's "description"
LAYOUT = ("imagesTr/labelsTr: labeled training and validation cases (splits_final.json fold 0); imagesUnlabeled: "
          "unlabeled training cases; imagesTs/labelsTs: test cases")


def smms_branches(channels: Sequence[str], spec: Optional[str]) -> Optional[Dict[str, List[int]]]:
    """dataset.json's "smms" entry: the channel indices of the two SMMS branches.

    ``spec`` is 'a,b|c,d' in channel keys (e.g. 't1,t1ce|t2,flair'); without it the first half of the channels
    (rounded up) goes to branch a. One channel: None (SMMS needs two branches)."""
    if spec is None:
        if len(channels) < 2:
            return None
        half = (len(channels) + 1) // 2
        return {"branch_a": list(range(half)), "branch_b": list(range(half, len(channels)))}
    sides = [[s.strip() for s in side.split(",") if s.strip()] for side in spec.split("|")]
    named = [c for side in sides for c in side]
    if len(sides) != 2 or not all(sides) or sorted(named) != sorted(channels):
        raise ConversionError(f"--branches {spec!r}: give every channel of {list(channels)} exactly once, in two "
                              f"non-empty groups separated by '|', e.g. {','.join(channels[:1])}|"
                              f"{','.join(channels[1:])}")
    return {f"branch_{b}": sorted(channels.index(c) for c in side) for b, side in zip("ab", sides)}
