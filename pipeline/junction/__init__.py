"""The lumbosacral junction: is a found vertebra the last mobile one, with the sacrum right
below it? A small 3D classifier that fixes L5 (L6) where the field of view is too narrow for the
hand-made sacrum test of :mod:`pipeline.anchors` (grid: :mod:`.grid`, crops: :mod:`.crops`,
network: :mod:`.net`, use: :mod:`.infer` and :mod:`.chain`; training volumes: :mod:`.volumes`,
training: :mod:`.train`)."""
