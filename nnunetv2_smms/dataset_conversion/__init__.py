"""Converters from data as distributed (BraTS, CT+MR pairs) to nnU-Net v2 raw datasets with the SMMS split.

Modules: ``brats`` and ``ct_mr`` (the converters), ``layout`` (the dataset folder's layout), ``splits`` (the
case split), ``checks`` (reading and checking the source), ``writing`` (writing the dataset, installing the
split), ``arguments`` (shared options, ``install-split``), ``synthetic`` (the demo dataset).
See docs/dataset_conversion.md.
"""
