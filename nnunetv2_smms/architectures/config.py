"""The SMMS network settings and the channel split between the two branches.

The settings travel with a trained model: the trainer writes them into the model folder's plans.json
(``plans['configurations'][<configuration>]['smms']``) and ``build_network_architecture`` reads them back,
because nnU-Net's predictor builds the network from the plans alone (it passes no dataset.json).
The preprocessed plans file itself is never modified.
"""
from dataclasses import asdict, dataclass, field
from typing import List, Sequence, Tuple

from nnunetv2_smms.errors import SMMSUserError

MMF_MODES = ("residual_gate", "gate", "add", "replace")
MAE_POSITIONS = ("bottleneck", "all_skips")
OUTPUT_BRANCHES = ("fused", "a", "b")

CHANNEL_SPLIT_ENV = "nnUNet_smms_channel_split"  # named in messages; read by nnunetv2_smms.settings


class ChannelSplitError(SMMSUserError, ValueError):
    pass


@dataclass
class SMMSNetworkConfig:
    channels_a: List[int] = field(default_factory=lambda: [0])
    channels_b: List[int] = field(default_factory=lambda: [1])
    # MMF (eq. 2) after each of the first `mmf_stages` encoder stages (at most n_stages - 1: f_ab must have a
    # next stage to enter). How f_ab enters the next stage is not stated in the paper; see fusion.py.
    mmf: bool = True
    mmf_stages: int = 4
    mmf_mode: str = "residual_gate"
    # kernel of MMF's two convolutions: 3 = the stage's planned kernel (3x3x3 as in the paper; (1, 3, 3) in an
    # anisotropic stage); 1 (pointwise) is the light variant, about a tenth of the paper's MMF compute
    mmf_kernel_size: int = 3
    # MAE (eq. 3), one module per branch. Position not stated in the paper; see enhancement.py.
    mae: bool = True
    mae_position: str = "bottleneck"
    # paper: dropout 0.5, applied here to the bottleneck features each decoder receives (train mode only)
    dropout_p: float = 0.5
    # what eval mode returns: the fused prediction (mean of both branches' logits) or one branch
    output_branch: str = "fused"

    def __post_init__(self):
        if self.mmf_mode not in MMF_MODES:
            raise ValueError(f"mmf_mode must be one of {MMF_MODES}, got {self.mmf_mode!r}")
        if self.mae_position not in MAE_POSITIONS:
            raise ValueError(f"mae_position must be one of {MAE_POSITIONS}, got {self.mae_position!r}")
        if self.output_branch not in OUTPUT_BRANCHES:
            raise ValueError(f"output_branch must be one of {OUTPUT_BRANCHES}, got {self.output_branch!r}")
        if self.mmf_kernel_size not in (1, 3):
            raise ValueError(f"mmf_kernel_size must be 1 or 3, got {self.mmf_kernel_size}")
        if not 0 <= self.dropout_p < 1:
            raise ValueError(f"dropout_p must be in [0, 1), got {self.dropout_p}")
        self.channels_a = [int(c) for c in self.channels_a]
        self.channels_b = [int(c) for c in self.channels_b]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SMMSNetworkConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Unknown SMMS settings {sorted(unknown)} (known: {sorted(known)}). Was this model "
                             f"trained with a newer nnunetv2_smms?")
        return cls(**d)


def _parse_side(side, channel_names: dict, where: str) -> List[int]:
    """One branch's channels: a list of int indices or channel names, or 'T1ce,T2' / '0,1' strings."""
    if isinstance(side, str):
        side = [s.strip() for s in side.split(",") if s.strip()]
    if not isinstance(side, (list, tuple)) or len(side) == 0:
        raise ChannelSplitError(f"{where}: each branch needs at least one channel, got {side!r}")
    by_name = {str(v).lower(): int(k) for k, v in channel_names.items()}
    out = []
    for s in side:
        if isinstance(s, int) or (isinstance(s, str) and s.isdigit()):
            idx = int(s)
        elif isinstance(s, str) and s.lower() in by_name:
            idx = by_name[s.lower()]
        else:
            raise ChannelSplitError(f"{where}: unknown channel {s!r}; the dataset's channels are {channel_names}")
        if not 0 <= idx < len(channel_names):
            raise ChannelSplitError(f"{where}: channel index {idx} out of range; the dataset has "
                                    f"{len(channel_names)} channels {channel_names}")
        out.append(idx)
    return out


def resolve_channel_split(dataset_json: dict, override: str = None) -> Tuple[List[int], List[int]]:
    """Which input channels go to branch a and which to branch b.

    Precedence: ``override`` (the trainer passes nnUNet_smms_channel_split, e.g. "T1ce|T2" or "0,1|2,3"), then
    dataset.json's ``"smms": {"branch_a": [...], "branch_b": [...]}``, then the default for exactly two
    channels (a = channel 0, b = channel 1). Anything else is an error that says how to fix it.
    """
    channel_names = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not channel_names:
        raise ChannelSplitError("dataset.json has no 'channel_names'; SMMS needs a multi-modal dataset.")
    n = len(channel_names)
    how_to = (f"Name the split with the environment variable {CHANNEL_SPLIT_ENV}=\"A|B\" (e.g. \"0|1\", "
              f"\"T1,T1ce|T2,FLAIR\") or in dataset.json as \"smms\": {{\"branch_a\": [0], \"branch_b\": [1]}} "
              f"(the dataset.json in nnUNet_preprocessed/<dataset>/ is the one training reads).")
    if n < 2:
        raise ChannelSplitError(f"SMMS needs at least two input channels (one per branch), but the dataset has "
                                f"{n}: {channel_names}. Convert the data with one channel per modality.")
    if override is not None:
        where = f"{CHANNEL_SPLIT_ENV}={override!r}"
        parts = override.split("|")
        if len(parts) != 2:
            raise ChannelSplitError(f"{where}: expected two branches separated by '|'. {how_to}")
        a, b = (_parse_side(p, channel_names, where) for p in parts)
    elif "smms" in dataset_json and ("branch_a" in dataset_json["smms"] or "branch_b" in dataset_json["smms"]):
        spec = dataset_json["smms"]
        where = "dataset.json 'smms'"
        if "branch_a" not in spec or "branch_b" not in spec:
            raise ChannelSplitError(f"{where}: needs both 'branch_a' and 'branch_b'. {how_to}")
        a = _parse_side(spec["branch_a"], channel_names, where + " branch_a")
        b = _parse_side(spec["branch_b"], channel_names, where + " branch_b")
    elif n == 2:
        return [0], [1]
    else:
        raise ChannelSplitError(f"The dataset has {n} channels {channel_names}; SMMS needs to know which go to "
                                f"branch a and which to branch b. {how_to}")
    for side, name in ((a, "a"), (b, "b")):
        if len(set(side)) != len(side):
            raise ChannelSplitError(f"{where}: branch {name} lists a channel twice: {side}")
    both = set(a) & set(b)
    if both:
        raise ChannelSplitError(f"{where}: channels {sorted(both)} are in both branches; each modality belongs to "
                                f"one branch. {how_to}")
    return a, b


def branch_channel_names(dataset_json: dict, channels: Sequence[int]) -> str:
    names = dataset_json.get("channel_names", {})
    return "+".join(str(names.get(str(c), c)) for c in channels)


class RecordedConfig:
    """to_dict / from_dict for a network-settings dataclass recorded in the plans; ``settings_name`` names it in
    the error for keys this version does not know."""
    settings_name = "network"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"Unknown {cls.settings_name} settings {sorted(unknown)}. Was this model trained with a "
                             f"newer nnunetv2_smms?")
        return cls(**d)
