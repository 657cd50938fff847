"""EM pipeline: blockwise affinities -> fragments -> region graph -> segmentation (daisy)."""
