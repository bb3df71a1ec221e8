"""Settings recorded in a model folder's plans.json against what a call asks for."""
import json

import pytest

from nnunetv2_smms.trainers.recorded_settings import SettingsMismatchError, check_against_model_folder, differences


def test_differences_name_each_changed_key_with_both_values():
    rec = {"smms": {"channels_a": [0], "mmf_mode": "residual_gate", "dropout_p": 0.5}, "x": 1}
    cur = {"smms": {"channels_a": [1], "mmf_mode": "residual_gate", "dropout_p": 0.5}, "x": 1}
    assert differences(rec, cur) == {"smms.channels_a": ([0], [1])}
    assert differences(rec, rec) == {}
    assert differences({"a": (1, 2)}, {"a": [1, 2]}) == {}  # JSON turns tuples into lists
    assert differences({"a": 1}, {"a": 1, "b": 2}) == {"b": (None, 2)}


def test_model_folder_check(tmp_path):
    check_against_model_folder(str(tmp_path), "3d_fullres", {"smms": {"mmf_mode": "add"}})  # nothing trained yet
    (tmp_path / "plans.json").write_text(json.dumps({"configurations": {"3d_fullres": {
        "smms": {"mmf_mode": "residual_gate", "mmf_kernel_size": 3}}}}))
    check_against_model_folder(str(tmp_path), "3d_fullres", {"smms": {"mmf_mode": "residual_gate",
                                                                      "mmf_kernel_size": 3}})
    check_against_model_folder(str(tmp_path), "3d_fullres", {"semi_supervised": {"unsup_weight": 2.0}})  # older
    with pytest.raises(SettingsMismatchError, match=r"smms.mmf_kernel_size: trained with 3, this call asks for 1"):
        check_against_model_folder(str(tmp_path), "3d_fullres", {"smms": {"mmf_mode": "residual_gate",
                                                                          "mmf_kernel_size": 1}})
