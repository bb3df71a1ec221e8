"""Prediction helpers on top of nnU-Net's predictor (a case without one modality's file: missing_modality.py)."""
