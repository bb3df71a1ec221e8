"""Scoring prediction sources against the reference labels: every case's metrics per source and label/region,
as report rows, optionally in a process pool."""
import os
from typing import List, Sequence

from nnunetv2_smms.evaluation.inputs import Labels, Source, check_geometry, check_sources, read_seg


def evaluate_case(case: str, reference_file: str, sources: Sequence[Source], file_ending: str, reader,
                  labels: Labels) -> List[dict]:
    """The rows (one per source and region) of one case."""
    from nnunetv2.evaluation.evaluate_predictions import label_or_region_to_key

    from nnunetv2_smms.evaluation.metrics import case_metrics

    ref, ref_props = read_seg(reader, reference_file, case, labels, "reference")
    rows = []
    for s in sources:
        pred_file = os.path.join(s.folder, case + file_ending)
        pred, pred_props = read_seg(reader, pred_file, case, labels, "prediction")
        check_geometry(case, (ref, ref_props, reference_file), (pred, pred_props, pred_file))
        per_region = case_metrics(pred, ref, ref_props["spacing"], labels.regions, labels.ignore_label,
                                  case=f"case {case} ({s.method} / {s.output})")
        rows += [dict(method=s.method, output=s.output, case=case, region=label_or_region_to_key(r),
                      prediction_file=pred_file, reference_file=reference_file, **m) for r, m in per_region.items()]
    return rows


def _evaluate_case_job(job) -> List[dict]:
    return evaluate_case(*job)


def evaluate_sources(reference_folder: str, sources: Sequence[Source], cases: Sequence[str], file_ending: str,
                     reader, labels: Labels, num_processes: int) -> List[dict]:
    """Rows for all cases, in case order, with a progress bar; ``num_processes`` > 1 uses a process pool."""
    import multiprocessing

    from tqdm import tqdm

    check_sources(sources, cases, file_ending)
    jobs = [(c, os.path.join(reference_folder, c + file_ending), sources, file_ending, reader, labels) for c in cases]
    progress = dict(total=len(jobs), desc="evaluating cases", unit="case")
    if num_processes <= 1:
        per_case = [_evaluate_case_job(j) for j in tqdm(jobs, **progress)]
    else:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            per_case = list(tqdm(pool.imap(_evaluate_case_job, jobs), **progress))
    return [row for rows in per_case for row in rows]
