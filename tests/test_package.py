"""Packaging: cheap imports for napari's plugin discovery, a valid manifest, shipped files."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources


def test_plugin_discovery_does_not_import_torch():
    code = (
        "import sys\n"
        "import napari_xlstm_unet, napari_xlstm_unet.widgets, napari_xlstm_unet._sample_data\n"
        "import napari_xlstm_unet.cli\n"
        "print('torch' in sys.modules)\n"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert output.stdout.strip() == "False"


def test_manifest_is_valid_and_names_the_distribution():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-xlstm-unet")
    assert manifest.name == "napari-xlstm-unet"
    assert [w.display_name for w in manifest.contributions.widgets] == ["Segment", "Batch", "Evaluate", "Fine-tune"]
    assert [s.key for s in manifest.contributions.sample_data] == ["nuclei", "polyp"]
    for command in manifest.contributions.commands:
        assert command.id.startswith("napari-xlstm-unet.")


def test_shipped_files_are_package_data():
    root = resources.files("napari_xlstm_unet")
    assert (root / "weights" / "cells_small.pt").is_file()
    assert (root / "sample_data" / "nuclei_dsb2018.tif").is_file()
    assert (root / "napari.yaml").is_file()
