"""Pictures of what a segmenter with token reduction does.

* :mod:`algm.pictures.maps`: class palettes, label maps and token maps as RGB arrays.
* :mod:`algm.pictures.figures`: matplotlib figures of those arrays.
* :mod:`algm.pictures.predict`: one image through one model -> a :class:`Prediction`.
* :mod:`algm.pictures.gallery`: the suites' gallery of token maps and predictions on fixed frames.

Rendering (maps, figures) takes arrays and draws; it knows no model and no dataset.
"""
