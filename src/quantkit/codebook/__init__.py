"""JLCM: weights as small per-group codebooks plus packed indices, learned jointly on calibration data.

Pieces (design.md section 3): :mod:`~quantkit.codebook.grouping` (row descriptors, k-means into groups),
:mod:`~quantkit.codebook.init` (weighted 1-D k-means codebooks), :mod:`~quantkit.codebook.learn` (joint learning
with the proximal or straight-through mapping update), :mod:`~quantkit.codebook.calib` (input Gram matrices from
the calibration artifact), :mod:`~quantkit.codebook.quantize` (one layer -> a packed ``QuantLinear`` /
``QuantConv2d``). The stored format is :class:`quantkit.formats.spec.CodebookFormat`.
"""

from quantkit.codebook.calib import LayerGram, collect_grams, default_split
from quantkit.codebook.grouping import group_rows, kmeans, row_descriptors
from quantkit.codebook.init import kmeans_1d, nearest_codeword
from quantkit.codebook.learn import CodebookFit, LearnSettings, fit_codebook, output_error, proximal_update
from quantkit.codebook.quantize import column_weight, quantize_layer

__all__ = [
    "CodebookFit",
    "LayerGram",
    "LearnSettings",
    "collect_grams",
    "column_weight",
    "default_split",
    "fit_codebook",
    "group_rows",
    "kmeans",
    "kmeans_1d",
    "nearest_codeword",
    "output_error",
    "proximal_update",
    "quantize_layer",
    "row_descriptors",
]
