"""napari dock widgets; each is a thin shell over functions in ``inference``."""

from ._segment import SegmentWidget

__all__ = ["SegmentWidget"]
