"""Training and fine-tuning: configuration, data, augmentation, the loop and its reports.

``training/train.py`` (the command line) and the napari Fine-tune widget both
run :func:`~napari_xlstm_unet.training.engine.run`.
"""
