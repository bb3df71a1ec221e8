"""Evaluation of SMMS and plain nnU-Net models: per-branch Dice, surface distances in mm, volumes, the
paper-style table, CSV/JSON and figures (``nnunetv2_smms evaluate``, see docs/evaluation.md).

Modules: ``metrics`` (per-case numbers), ``report`` (summaries, table, files), ``figures`` (PNGs),
``evaluate`` (folders and models, the command).
"""
