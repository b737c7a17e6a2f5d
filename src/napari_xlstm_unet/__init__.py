"""2D xLSTM-UNet segmentation for napari and the command line.

Importing the package is cheap: torch loads only when a model, a widget or a
command runs, so napari's plugin discovery stays fast.
"""

__version__ = "0.1.0"
