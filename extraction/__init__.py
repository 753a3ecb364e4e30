"""Feature extraction from raw images: CNN backbones, dense-SIFT BoVW, input collections (used by prepare_data.py)."""
