"""Evaluation of SMMS and plain nnU-Net models: per-branch Dice, surface distances in mm, volumes, the
paper-style table, CSV/JSON and figures (``nnunetv2_smms evaluate``, see docs/evaluation.md).

Modules: ``inputs`` (sources, labels, model folders, reference cases and their checks), ``prediction`` (model
folders -> prediction folders), ``scoring`` (per-case rows), ``metrics`` (per-case numbers), ``report``
(summaries, table, files), ``figure_writing`` (cases and masks for the figures), ``figures`` (PNGs),
``evaluate`` (the command).
"""
