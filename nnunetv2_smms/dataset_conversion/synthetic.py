"""A small synthetic two-modality dataset in which the target is only fully visible when both are combined.

Each case holds one roughly ellipsoidal "lesion" with a core and a surrounding rim:
- modality A ("CoreMod") shows the core bright and the rim barely at all, plus a bright distractor blob that is
  not part of the target;
- modality B ("RimMod") shows the rim bright and the core dark, plus its own distractor.
The label is the whole lesion (core + rim, one class), so a model that sees one modality alone misses part of it
or is fooled by that modality's distractor. ``core_label=True`` labels the rim 1 and the core 2 instead (two
foreground labels; the images are the same). Used by ``nnunetv2_smms demo`` and by the tests.
"""
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from nnunetv2_smms.staging import staged_folder

CHANNEL_NAMES = {"0": "CoreMod", "1": "RimMod"}


def _ellipsoid(shape, center, radii):
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def make_case(rng: np.random.Generator, shape: Sequence[int], core_label: bool = False):
    shape = tuple(int(s) for s in shape)
    s = np.array(shape, dtype=float)
    radii = rng.uniform(0.16, 0.26, 3) * s
    center = rng.uniform(radii + 2, s - radii - 2)
    lesion = _ellipsoid(shape, center, radii)
    core = _ellipsoid(shape, center + rng.uniform(-0.15, 0.15, 3) * radii, radii * rng.uniform(0.45, 0.6))
    core &= lesion
    rim = lesion & ~core

    def distractor():
        r = rng.uniform(0.08, 0.13, 3) * s
        for _ in range(50):
            c = rng.uniform(r + 1, s - r - 1)
            blob = _ellipsoid(shape, c, r)
            if not (blob & lesion).any():
                return blob
        return np.zeros(shape, bool)

    body = _ellipsoid(shape, s / 2, s * 0.47)  # a "head" outside of which the image is 0, like skull-stripped MRI
    img_a = rng.normal(1.0, 0.25, shape)
    img_a[core] += 1.6
    img_a[rim] += 0.15
    img_a[distractor()] += 1.6
    img_b = rng.normal(1.0, 0.25, shape)
    img_b[rim] += 1.6
    img_b[core] -= 0.5
    img_b[distractor()] += 1.6
    imgs = [np.where(body, np.clip(i, 0.01, None), 0).astype(np.float32) for i in (img_a, img_b)]
    label = (lesion & body).astype(np.uint8)
    if core_label:
        label[core & body] = 2
    return imgs, label


def _write(arr: np.ndarray, path: Path, spacing):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(x) for x in spacing))
    sitk.WriteImage(img, str(path), useCompression=True)


def make_synthetic_dataset(raw_root, dataset_id: int = 501, name: str = "SMMSDemo", n_labeled: int = 6,
                           n_unlabeled: int = 10, n_test: int = 4, shape=(40, 40, 40), spacing=(1.0, 1.0, 1.0),
                           seed: int = 0, overwrite: bool = False, core_label: bool = False) -> Path:
    """Write DatasetXXX_Name under raw_root (imagesTr/labelsTr, imagesUnlabeled, imagesTs/labelsTs, dataset.json).
    ``core_label``: two foreground labels, rim 1 and core 2 (default: one, the whole lesion).

    The folder is staged and renamed into place (nnunetv2_smms.staging), so it is either complete or absent."""
    target = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True (demo: --overwrite) to replace it")
    rng = np.random.default_rng(seed)
    with staged_folder(target) as tmp:
        for sub in ("imagesTr", "labelsTr", "imagesUnlabeled", "imagesTs", "labelsTs"):
            (tmp / sub).mkdir()
        groups = (("imagesTr", "labelsTr", "case", n_labeled), ("imagesUnlabeled", None, "unl", n_unlabeled),
                  ("imagesTs", "labelsTs", "test", n_test))
        for img_dir, lab_dir, prefix, n in groups:
            for i in range(n):
                imgs, lab = make_case(rng, shape, core_label)
                cid = f"{prefix}_{i:03d}"
                for c, im in enumerate(imgs):
                    _write(im, tmp / img_dir / f"{cid}_{c:04d}.nii.gz", spacing)
                if lab_dir is not None:
                    _write(lab, tmp / lab_dir / f"{cid}.nii.gz", spacing)
        labels = {"background": 0, "rim": 1, "core": 2} if core_label else {"background": 0, "lesion": 1}
        dataset_json = {"channel_names": CHANNEL_NAMES, "labels": labels,
                        "numTraining": n_labeled, "file_ending": ".nii.gz", "name": name,
                        "description": "nnunetv2_smms synthetic demo: core visible in channel 0, rim in channel 1; "
                                       + ("labels: rim 1, core 2" if core_label else "label = core + rim"),
                        "smms": {"branch_a": [0], "branch_b": [1]}}
        (tmp / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return target
