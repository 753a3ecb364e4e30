"""Feature extraction from raw images for prepare_data.py: the resumable pipeline (its stages, cache, writers and
summary), CNN backbones, dense-SIFT BoVW and the input collections."""
