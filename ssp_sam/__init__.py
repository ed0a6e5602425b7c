"""SSP-SAM: SAM with Semantic-Spatial Prompts for referring expression segmentation.

A clean-room re-implementation of the official model (github WayneTomas/SSP-SAM) that loads its checkpoints.
This package knows nothing of Label Studio.
"""

__version__ = "0.1.0"
