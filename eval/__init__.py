"""Measurement: generate images for prompt sets and score them (nudity, classes, FID, CLIP)."""
