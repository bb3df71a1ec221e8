"""Loading unlabeled cases through nnU-Net's own dataset class, cropping and augmentation.

``UnlabeledDataLoader`` is nnU-Net's ``nnUNetDataLoader`` with one change: patches are always cropped at
random (unlabeled cases have no class locations to oversample from) and the batch carries no target. The
only per-case array read besides the image is nnU-Net's nonzero mask from preprocessing (-1 outside the
image's nonzero region), which the augmentation pipeline uses exactly as for labeled cases; there are no
labels for these cases anywhere.
"""
from typing import List

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from threadpoolctl import threadpool_limits


class UnlabeledDataLoader(nnUNetDataLoader):
    def __init__(self, data, batch_size, patch_size, final_patch_size, label_manager, transforms=None):
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=0.0, transforms=transforms)
        self.has_ignore = False  # random crops only, never class locations

    def generate_train_batch(self):
        keys = self.get_indices()
        data_all = None
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for j, key in enumerate(keys):
                data, mask, _, _ = self._data.load_case(key)
                bbox_lbs, bbox_ubs = self.get_bbox(data.shape[1:], False, None)
                bbox = [[lo, hi] for lo, hi in zip(bbox_lbs, bbox_ubs)]
                image = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
                mask = torch.from_numpy(crop_and_pad_nd(mask, bbox, -1, cast_cropped_to=np.int16)).to(torch.int16)
                if self.patch_size_was_2d:
                    image, mask = image[:, 0], mask[:, 0]
                if self.transforms is not None:
                    image = self.transforms(image=image, segmentation=mask)["image"]
                if data_all is None:
                    data_all = torch.empty((self.batch_size, *image.shape), dtype=torch.float32)
                data_all[j] = image
        return {"data": data_all, "keys": keys}


def batch_share(global_batch_size: int, world_size: int, rank: int) -> int:
    """This rank's part of a global batch, split as nnU-Net splits the labeled batch under DDP."""
    if global_batch_size < world_size:
        raise ValueError(f"unlabeled batch size {global_batch_size} is smaller than the number of GPUs "
                         f"({world_size}); every rank needs at least one unlabeled case")
    shares: List[int] = [global_batch_size // world_size + (1 if i < global_batch_size % world_size else 0)
                         for i in range(world_size)]
    return shares[rank]
