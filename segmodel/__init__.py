"""The seed's segmentation model, its data format, metrics and exactly resumable chunk training."""
