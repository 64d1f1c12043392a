"""Quantities of the frozen CLIP, computed once and cached by content: image features of an image list (`features`,
the evaluation feature cache) and what several methods share (`quantities`: hand-crafted class text features,
unprompted image features)."""
