"""Where the prepared data live: one folder per granularity under a data root, <folder>/<data_name>/."""

COARSE_FOLDER = "coarse-grained-data"  # the global subnetwork's data: (N, D) features, one row per image
FINE_FOLDER = "fine-grained-data"  # the local subnetwork's data: (N, NUM_BLOCKS, D), one row per block
