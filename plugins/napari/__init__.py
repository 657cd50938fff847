"""psc's napari plugin (npe2; manifest ``napari.yaml``, entry point ``napari.manifest``):
readers for psc's MRI (NIfTI/MGZ) and EM (OME-Zarr) outputs, a Labels writer, the
Segment, Score and Threshold widgets, and two sample data sets.

Importing this package imports neither napari nor Qt: napari loads each contribution
from its own module when it is first used.
"""

from ._reader import napari_get_reader
from ._writer import write_labels

__all__ = ["napari_get_reader", "write_labels"]
