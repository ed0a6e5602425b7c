"""Label Studio ML backend serving SSP-SAM text-prompted brush pre-annotations."""
