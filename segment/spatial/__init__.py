"""The image-level model's components: the bias field (:mod:`segment.spatial.bias`)."""
