"""Unlabeled cases: preprocessing with the labeled dataset's own plans, and loading them for training."""
