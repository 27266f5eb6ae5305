"""The image-level model: :class:`~segment.spatial.model.SpatialGaussianMixture` (``model``) and
its components, the bias field (``field``, maths in ``bias``) and the MRF prior (``mrf``)."""
