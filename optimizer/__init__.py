"""optimizer: optimizer construction with fused backends, and mixed-precision optimizer wrappers."""
