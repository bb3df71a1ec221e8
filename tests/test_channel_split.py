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


def test_legacy_modality_key_and_error_locations(monkeypatch):
    from nnunetv2_smms.architectures.config import branch_channel_names
    assert resolve_channel_split({"modality": {"0": "CT", "1": "MR"}}) == ([0], [1])
    with pytest.raises(ChannelSplitError, match=r"nnUNet_smms_channel_split='T1\|T1'"):
        resolve_channel_split(BRATS4, "T1|T1")
    with pytest.raises(ChannelSplitError, match=r"dataset.json 'smms' branch_a: unknown channel 'PD'"):
        resolve_channel_split(dict(BRATS4, smms={"branch_a": ["PD"], "branch_b": [2]}))
    with pytest.raises(ChannelSplitError, match="dataset.json 'smms': needs both"):
        resolve_channel_split(dict(BRATS4, smms={"branch_b": [2]}))
    with pytest.raises(ChannelSplitError, match=r"branch a lists a channel twice: \[0, 0\]"):
        resolve_channel_split(BRATS4, "0,0|1")
    with pytest.raises(ChannelSplitError, match=r"branch b lists a channel twice"):
        resolve_channel_split(BRATS4, "0|1,1")
    with pytest.raises(ChannelSplitError, match="index 4 out of range"):
        resolve_channel_split(BRATS4, "0|4")
    assert resolve_channel_split(BRATS4, "0|3") == ([0], [3])
    assert branch_channel_names(BRATS4, [0, 1]) == "T1+T1ce" and branch_channel_names(BRATS4, [7]) == "7"


def test_build_from_configuration_reads_the_recorded_settings():
    from types import SimpleNamespace

    from nnunetv2_smms.architectures import SMMSNetworkConfig, build_from_configuration
    from test_network import PLAIN, REQ_IMPORT, arch_kwargs
    cfg = SMMSNetworkConfig(channels_a=[1], channels_b=[0], mmf_mode="add", mmf_kernel_size=1, dropout_p=0.25)

    def manager(settings):
        return SimpleNamespace(configuration={"smms": settings} if settings else {},
                               network_arch_class_name=PLAIN, network_arch_init_kwargs=arch_kwargs(3, 3),
                               network_arch_init_kwargs_req_import=REQ_IMPORT)
    net = build_from_configuration(manager(cfg.to_dict()), 2, 3, deep_supervision=False)
    assert net.channels_a == [1] and net.channels_b == [0] and net.mmf_mode == "add"
    assert net.mmf[0].conv1.kernel_size == (1, 1, 1) and net.dropout.p == 0.25 and net.output_branch == "fused"
    assert net.branch_a.decoder.deep_supervision is False
    assert build_from_configuration(manager(cfg.to_dict()), 2, 3, output_branch="b").output_branch == "b"
    with pytest.raises(RuntimeError, match="carry no SMMS settings"):
        build_from_configuration(manager(None), 2, 3)
    with pytest.raises(ValueError, match="needs channel 1"):
        build_from_configuration(manager(cfg.to_dict()), 1, 3)
