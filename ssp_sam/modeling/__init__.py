"""SSP-SAM model components, one per file (in the shape of segment-anything's ``modeling`` package)."""
