"""Per-case rows -> summary statistics, the paper-style table, and the CSV/JSON files (written atomically).

A row is one (method, output, case, region): ``method`` is a model or a named set of predictions, ``output``
one of its outputs (an SMMS model: branch a, branch b and the fused output, named after their modalities;
a plain nnU-Net model: "fused"), ``region`` the nnU-Net key of a label or region ("1", "(1, 2, 4)").
"""
import csv
import json
import math
import os
import tempfile
from contextlib import contextmanager
from typing import Dict, Iterator, List, Sequence

import numpy as np

from nnunetv2_smms.evaluation.metrics import EMPTY_BOTH, EMPTY_PREDICTION, EMPTY_REFERENCE, METRIC_NAMES

ID_COLUMNS = ("method", "output", "case", "region")
CSV_COLUMNS = ID_COLUMNS + METRIC_NAMES + ("empty", "prediction_file", "reference_file")
DISTANCE_TITLES = {"asd": "ASD (mm)", "assd": "ASSD (mm)", "hd95": "HD95 (mm)"}

DEFINITIONS = {
    "dice": "2|P&R| / (|P|+|R|), 1 if both are empty",
    "asd": "medpy 0.5.2 asd(prediction, reference): mean distance (mm) from the prediction surface to the "
           "reference surface, one-directional (the published tables' convention)",
    "assd": "medpy 0.5.2 assd: mean of the pooled surface distances (mm) of both directions",
    "hd95": "medpy 0.5.2 hd95: 95th percentile of the pooled surface distances (mm) of both directions",
    "volume_pred_ml, volume_ref_ml": "voxel count x voxel volume from the image header, in ml",
    "empty": "both empty: Dice 1, distances 0; exactly one empty: Dice 0, distances NaN, left out of the "
             "distance statistics and counted in n_nan",
    "std": "sample standard deviation (ddof=1) over cases; NaN for a single case",
}


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path next to ``path`` that replaces ``path`` (os.replace) when the block succeeds."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it the permissions open() would
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_csv(rows: Sequence[dict], path: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _stats(values: Sequence[float]) -> dict:
    values = np.asarray(values, dtype=float)
    finite = values[~np.isnan(values)]
    n = len(finite)
    return {"mean": float(finite.mean()) if n else math.nan,
            "std": float(finite.std(ddof=1)) if n > 1 else math.nan,
            "median": float(np.median(finite)) if n else math.nan,
            "n": n, "n_nan": int(len(values) - n)}


def summarize(rows: Sequence[dict]) -> Dict[str, Dict[str, Dict[str, dict]]]:
    """{method: {output: {region: {metric: {mean, std, median, n, n_nan}, "n_cases", "empty": counts}}}}, in
    the order the rows name them."""
    groups: Dict[tuple, List[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["output"], row["region"]), []).append(row)
    summary: Dict[str, Dict[str, Dict[str, dict]]] = {}
    for (method, output, region), group in groups.items():
        entry = {m: _stats([r[m] for r in group]) for m in METRIC_NAMES}
        entry["n_cases"] = len(group)
        entry["empty"] = {e: sum(r["empty"] == e for r in group)
                          for e in (EMPTY_BOTH, EMPTY_PREDICTION, EMPTY_REFERENCE)}
        summary.setdefault(method, {}).setdefault(output, {})[region] = entry
    return summary


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_summary_json(summary: dict, path: str, region_names: Dict[str, str], cases: Sequence[str],
                       settings: dict) -> None:
    """The summary plus what it needs to be read alone: metric definitions, region names, cases, settings.
    NaN is written as null."""
    document = {"definitions": DEFINITIONS, "regions": region_names, "cases": list(cases),
                "settings": settings, "results": summary}
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(_json_safe(document), f, indent=2, allow_nan=False)
        f.write("\n")


def _mean_std(stats: dict, scale: float) -> str:
    return f"{stats['mean'] * scale:.2f} ± {stats['std'] * scale:.2f}"


def format_table(summary: dict, region: str, region_name: str, distance: str = "asd") -> str:
    """Markdown table shaped like the paper's Tables 1/2 for one region: one row per method, DSC (%) and the
    chosen distance (mm) as mean ± std per output; "-" where a method lacks an output. Notes below it count
    the cases left out of the distance statistics."""
    outputs: List[str] = []
    for per_output in summary.values():
        outputs += [o for o in per_output if o not in outputs and region in per_output[o]]
    header = ["Method"] + [f"DSC (%) {o}" for o in outputs] + [f"{DISTANCE_TITLES[distance]} {o}" for o in outputs]
    body, notes, n_cases = [], [], 0
    for method, per_output in summary.items():
        entries = [per_output.get(o, {}).get(region) for o in outputs]
        body.append([method] + [_mean_std(e["dice"], 100) if e else "-" for e in entries]
                    + [_mean_std(e[distance], 1) if e else "-" for e in entries])
        for o, e in [(o, e) for o, e in zip(outputs, entries) if e]:
            n_cases = max(n_cases, e["n_cases"])
            if e[distance]["n_nan"]:
                notes.append(f"{method} / {o}: {e[distance]['n_nan']} of {e['n_cases']} cases have exactly one "
                             f"empty mask (Dice 0, left out of {distance.upper()})")
            if e["empty"][EMPTY_BOTH]:
                notes.append(f"{method} / {o}: {e['empty'][EMPTY_BOTH]} of {e['n_cases']} cases have both masks "
                             f"empty (Dice 100 %, {distance.upper()} 0)")
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    lines = [f"Region {region_name}: mean ± std over {n_cases} cases", "", line(header),
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(b) for b in body]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_text(text: str, path: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
