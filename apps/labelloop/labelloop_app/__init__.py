"""LabelLoop: a MONAI Label app for annotate-retrain-infer loops on CT and MRI."""

__version__ = "0.1.0"
