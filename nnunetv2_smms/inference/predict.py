"""``nnunetv2_smms predict``: nnUNetv2_predict's options and predictor, for folders in which a case may lack one
modality's file (the logic: inference/missing_modality.py). Cases with all their files are predicted as
nnUNetv2_predict predicts them. Not mirrored: -num_parts / -part_id (one call predicts everything)."""
from nnunetv2_smms.errors import SMMSUserError, cli_command


def build_predictor(args):
    """nnUNetv2_predict's predictor for these arguments (nnunetv2/inference/predict_from_raw_data.py,
    predict_entry_point), with the plugin's trainers visible."""
    import multiprocessing
    import os

    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    from nnunetv2_smms.ext_trainer_dir import ext_trainers_visible

    folds = [f if f == "all" else int(f) for f in args.f]
    model_folder = get_output_folder(args.d, args.tr, args.p, args.c)
    if not os.path.isdir(model_folder):
        raise SMMSUserError(f"no trained model {model_folder} (dataset {args.d}, trainer {args.tr}, plans {args.p}, "
                            f"configuration {args.c}; nnUNet_results={os.environ.get('nnUNet_results')})")
    if args.device == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
    elif args.device == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    predictor = nnUNetPredictor(tile_step_size=args.step_size, use_gaussian=True, use_mirroring=not args.disable_tta,
                                perform_everything_on_device=not args.not_on_device, device=torch.device(args.device),
                                verbose=args.verbose, verbose_preprocessing=args.verbose,
                                allow_tqdm=not args.disable_progress_bar)
    with ext_trainers_visible():
        predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint_name=args.chk)
    return predictor


def _run(args) -> int:
    import os

    from nnunetv2.inference.predict_from_raw_data import _getDefaultValue

    from nnunetv2_smms.inference.missing_modality import predict_folder
    if not os.path.isdir(args.i):
        raise SMMSUserError(f"input folder {args.i} not found")
    predictor = build_predictor(args)
    npp = args.npp if args.npp is not None else _getDefaultValue("nnUNet_npp", int, 3)
    nps = args.nps if args.nps is not None else _getDefaultValue("nnUNet_nps", int, 3)
    predict_folder(predictor, args.i, args.o, save_probabilities=args.save_probabilities,
                   overwrite=not args.continue_prediction, num_processes_preprocessing=npp,
                   num_processes_segmentation_export=nps,
                   folder_with_segs_from_prev_stage=args.prev_stage_predictions, log=lambda s: print(s, flush=True))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="nnUNetv2_predict for folders where a case may lack a modality's file (SMMS: the present modality's "
             "branch predicts it)",
        description="Predict a folder like nnUNetv2_predict (same options). A case whose CASE_XXXX file of one "
                    "modality is missing is predicted with that channel zero-filled: by the branch of the modality "
                    "that is present for SMMS models, by the whole network for other models (said in the log). "
                    "Every incomplete case is printed and listed in <output>/missing_modalities.json. Train with "
                    "nnUNetTrainerSMMS_ModalityDropout for models meant to predict with one modality.")
    p.add_argument("-i", required=True, help="input folder (nnU-Net naming CASE_XXXX<file_ending>)")
    p.add_argument("-o", required=True, help="output folder (created if needed)")
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    p.add_argument("-tr", default="nnUNetTrainerSMMS", help="trainer of the model (default: nnUNetTrainerSMMS)")
    p.add_argument("-c", required=True, help="configuration")
    p.add_argument("-f", nargs="+", default=(0, 1, 2, 3, 4), help="folds (default: 0 1 2 3 4)")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step size (default: 0.5)")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--save_probabilities", action="store_true", help="also write the probabilities (.npz, .pkl)")
    p.add_argument("--continue_prediction", action="store_true", help="skip cases whose output exists")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default: checkpoint_final.pth)")
    p.add_argument("-npp", type=int, default=None,
                   help="preprocessing processes (default: nnUNet_npp or 3; -npp 0 -nps 0: sequential)")
    p.add_argument("-nps", type=int, default=None, help="segmentation export processes (default: nnUNet_nps or 3)")
    p.add_argument("-prev_stage_predictions", default=None, help="previous stage's predictions (cascade)")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="device (default: cuda)")
    p.add_argument("--disable_progress_bar", action="store_true")
    p.add_argument("--not_on_device", action="store_true", help="perform_everything_on_device=False")
    p.set_defaults(func=cli_command(_run))
