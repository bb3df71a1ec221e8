"""Converters from data as distributed (BraTS, CT+MR pairs) to nnU-Net v2 raw datasets with the SMMS split.

See docs/dataset_conversion.md.
"""
