"""napari dock widgets; each is a thin shell over plain functions (``inference``, ``batch``)."""

from ._batch import BatchWidget
from ._segment import SegmentWidget

__all__ = ["BatchWidget", "SegmentWidget"]
