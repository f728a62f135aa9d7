"""Slicer-free logic of the LabelLoop Slicer extension: REST client, workflow and segmentation file I/O."""
