"""napari dock widgets; each is a thin shell over plain functions (``inference``, ``batch``, ``metrics``)."""

from ._batch import BatchWidget
from ._evaluate import EvaluateWidget
from ._finetune import FinetuneWidget
from ._segment import SegmentWidget

__all__ = ["BatchWidget", "EvaluateWidget", "FinetuneWidget", "SegmentWidget"]
