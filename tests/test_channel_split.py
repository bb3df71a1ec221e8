"""Which input channels go to which branch, and the errors when that is unclear or wrong."""
import pytest

from nnunetv2_smms.architectures.config import ChannelSplitError, resolve_channel_split

BRATS4 = {"channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}}


def test_two_channels_default():
    assert resolve_channel_split({"channel_names": {"0": "CT", "1": "T2"}}, None) == ([0], [1])


def test_dataset_json_and_override_by_index_or_name():
    ds = dict(BRATS4, smms={"branch_a": [1], "branch_b": ["T2"]})
    assert resolve_channel_split(ds, None) == ([1], [2])
    assert resolve_channel_split(BRATS4, "T1,T1ce|T2,FLAIR") == ([0, 1], [2, 3])
    assert resolve_channel_split(ds, "0|3") == ([0], [3])  # the override wins


def test_env_override(monkeypatch):
    from nnunetv2_smms import settings
    monkeypatch.setenv("nnUNet_smms_channel_split", "t1ce|flair")
    assert resolve_channel_split(BRATS4, settings.channel_split()) == ([1], [3])
    # the network code never reads the environment: without the override the dataset's own rule applies
    with pytest.raises(ChannelSplitError, match="which go to branch a"):
        resolve_channel_split(BRATS4)


@pytest.mark.parametrize("dataset_json,override,message", [
    ({"channel_names": {"0": "T1"}}, None, "at least two input channels"),
    (BRATS4, None, "which go to branch a"),
    (BRATS4, "T1|T1", "in both branches"),
    (BRATS4, "T1,T1ce", "two branches separated by"),
    (BRATS4, "T1|PD", "unknown channel 'PD'"),
    (BRATS4, "0|7", "out of range"),
    (BRATS4, "|T2", "at least one channel"),
    (dict(BRATS4, smms={"branch_a": [0]}), None, "needs both"),
])
def test_bad_splits_are_clear_errors(dataset_json, override, message, monkeypatch):
    monkeypatch.delenv("nnUNet_smms_channel_split", raising=False)
    with pytest.raises(ChannelSplitError, match=message) as e:
        resolve_channel_split(dataset_json, override)
    if "branch" in message or "unknown" in message:
        assert "nnUNet_smms_channel_split" in str(e.value) or "channels are" in str(e.value)
