"""The frozen CLIP: open_clip loading, the layer loops methods hook into, the fused blocks, weight checks."""
