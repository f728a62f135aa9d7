"""MONAI Label entry point: ``monailabel start_server --app apps/labelloop --studies <folder>``.

The task code lives in the importable ``labelloop_app`` package next to this file.
"""

import os
import sys

_APP_DIR = os.path.dirname(os.path.abspath(__file__))
if _APP_DIR not in sys.path:
    sys.path.insert(0, _APP_DIR)  # MONAI Label removes the app dir from sys.path after loading main.py

from labelloop_app.app import LabelLoopApp  # noqa: E402

__all__ = ["LabelLoopApp"]
