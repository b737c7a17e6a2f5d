"""Run ``python -m napari_xlstm_unet``, the same as ``xlstm-unet``."""

from .cli import main

raise SystemExit(main())
