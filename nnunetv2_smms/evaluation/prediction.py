"""Predicting the test cases with a trained model folder, in-process with nnU-Net's predictor: one prediction
folder per output (an SMMS model: branch a, branch b and the fused output; a plain nnU-Net model: "fused")."""
import os
from typing import List, Sequence, Tuple

from nnunetv2_smms.evaluation.inputs import Model, Source, case_images

FUSED = "fused"


def branch_names(configuration: dict, dataset_json: dict) -> Tuple[str, str]:
    """Names of branches a and b from the channel names of ``configuration["smms"]["channels_a"/"channels_b"]``
    (e.g. "T1ce", "T2"); "a" and "b" when these are missing or do not give two distinct new names."""
    smms, channel_names = configuration.get("smms", {}), dataset_json.get("channel_names", {})
    names = []
    for branch in ("a", "b"):
        channels = smms.get(f"channels_{branch}") or []
        found = [channel_names.get(str(c)) for c in channels]
        names.append("+".join(found) if found and all(found) else None)
    if None in names or names[0] == names[1] or FUSED in names:
        return "a", "b"
    return names[0], names[1]


def predict_model(model: Model, images_folder: str, cases: Sequence[str], output_root: str,
                  folds: Sequence[str], checkpoint: str, device: str, use_tta: bool,
                  num_processes: int) -> List[Source]:
    """Predict ``cases`` with nnU-Net's predictor once per output of the model; one Source per output,
    folders ``output_root/<model name>/<output>``."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunetv2_smms.architectures import has_branches, set_output_branch, unwrap
    from nnunetv2_smms.ext_trainer_dir import ext_trainers_visible

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    predictor = nnUNetPredictor(use_mirroring=use_tta, perform_everything_on_device=device == "cuda",
                                device=torch.device(device), allow_tqdm=False)
    with ext_trainers_visible():
        predictor.initialize_from_trained_model_folder(model.folder, use_folds=folds, checkpoint_name=checkpoint)
    dataset_json = predictor.dataset_json
    file_ending = dataset_json["file_ending"]
    inputs = [case_images(images_folder, c, file_ending, len(dataset_json["channel_names"])) for c in cases]

    if has_branches(predictor.network):
        configuration = dict(predictor.configuration_manager.configuration)
        network = unwrap(predictor.network)
        if "smms" not in configuration and hasattr(network, "channels_a"):  # a branch network of another method
            configuration["smms"] = {"channels_a": network.channels_a, "channels_b": network.channels_b}
        name_a, name_b = branch_names(configuration, dataset_json)
        outputs = [(name_a, "a"), (name_b, "b"), (FUSED, "fused")]
    else:
        outputs = [(FUSED, None)]
    sources = []
    for output, branch in outputs:
        if branch is not None:
            set_output_branch(predictor.network, branch)
        folder = os.path.join(output_root, model.name, output)
        print(f"predicting {len(cases)} cases: {model.name} / {output}")
        predictor.predict_from_files(inputs, [os.path.join(folder, c) for c in cases], save_probabilities=False,
                                     overwrite=True, num_processes_preprocessing=num_processes,
                                     num_processes_segmentation_export=num_processes)
        sources.append(Source(model.name, output, folder))
    return sources
