"""Write a folder in one piece: build it in a hidden sibling, then rename it into place.

Used for converted datasets, the synthetic demo dataset and preprocessed unlabeled cases: the target is either
complete (old or new) or absent, never half-written. The staging name starts with '.', so nnU-Net's dataset
lookup (folders named DatasetXXX_*) never sees it.
"""
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(target):
    """Yields a fresh folder next to `target` that replaces `target` on success and disappears on any error."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        yield staging
        if target.exists():
            old = target.parent / f".{target.name}.old-{secrets.token_hex(4)}"
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
