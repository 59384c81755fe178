"""segprune: structured pruning for segmentation networks."""
