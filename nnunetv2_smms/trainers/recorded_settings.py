"""Settings a model was trained with travel with it (the model folder's plans.json) and are checked on resume.

A trainer records its settings in ``plans['configurations'][<configuration>][<key>]`` before the network is
built; nnU-Net copies those plans into the model folder when training starts, and its predictor rebuilds the
network from that file alone. ``nnUNetv2_train ... --c`` and ``--val`` (and anything else that loads a checkpoint
into a trainer) compare what the current call asks for with what the model folder says and stop, naming both
values, before anything in the model folder is written.
"""
import json
import os
from typing import Dict

from nnunetv2_smms.errors import SMMSUserError


def recorded_method_settings(configuration: dict, key: str):
    """A method's settings as a trainer recorded them in a configuration of the plans (None if absent). Methods
    record theirs inside the base trainer's ``semi_supervised`` entry: the unlabeled folder's preprocessing stamp
    (unlabeled/preprocess.py NOT_PREPROCESSING_KEYS) ignores only the base's and SMMS's keys, so a key of its own
    would mark the preprocessed unlabeled cases stale."""
    return configuration.get("semi_supervised", {}).get(key)


def with_method_settings(recorded: dict, key: str, settings: dict) -> dict:
    """``recorded`` (a recorded_settings() result) with ``settings`` added under semi_supervised[key]."""
    return recorded | {"semi_supervised": recorded["semi_supervised"] | {key: settings}}


class SettingsMismatchError(SMMSUserError, RuntimeError):
    pass


def differences(recorded: dict, current: dict, prefix: str = "") -> Dict[str, tuple]:
    """{dotted key: (recorded, current)} for every key whose values differ (missing keys count as None)."""
    out = {}
    for key in sorted(set(recorded) | set(current), key=str):
        a, b = recorded.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(differences(a, b, name + "."))
        elif a != b and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
            out[name] = (a, b)
    return out


def check_against_model_folder(model_folder: str, configuration: str, current: Dict[str, dict]) -> None:
    """Raise SettingsMismatchError if the model folder's plans.json records other values for any of the
    ``current`` entries. A folder without plans.json (nothing trained there yet) or plans without an entry
    (a model of an older version) is not checked."""
    plans_file = os.path.join(model_folder, "plans.json")
    if not os.path.isfile(plans_file):
        return
    with open(plans_file, encoding="utf-8") as f:
        recorded_config = json.load(f).get("configurations", {}).get(configuration, {})
    diffs = {}
    for key, settings in current.items():
        if key in recorded_config:
            diffs.update(differences(recorded_config[key], json.loads(json.dumps(settings)), key + "."))
    if diffs:
        lines = "; ".join(f"{k}: trained with {a!r}, this call asks for {b!r}" for k, (a, b) in diffs.items())
        raise SettingsMismatchError(
            f"The model in {model_folder} was trained with other settings than this call uses: {lines}. Resume "
            f"(--c) and re-validate (--val) with the settings it was trained with (environment variables "
            f"nnUNet_smms_*, the trainer's class attributes), or train into a new model folder. Nothing in the "
            f"model folder was changed.")
