"""Per-image scores kept in the datastore's image info, one record per task.

``info["labelloop_scores"] = {"segmentation": {"model_version": ..., "entropy": ..., "tta": ..., "embedding": [...],
"seconds": ..., "ts": ...}, "classification": {...}}``. Keeping them with the image means they survive restarts,
travel with the studies folder, and are visible to any MONAI Label client (``GET /datastore/image/info``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Iterable, Optional

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import ImageNotFoundException

from labelloop_app.errors import NotFound

logger = logging.getLogger(__name__)

SCORES_KEY = "labelloop_scores"


def read_records(datastore: Datastore, task: str, image_ids: Optional[Iterable[str]] = None) -> Dict[str, Dict]:
    """The ``task`` record of every image that has one."""
    out: Dict[str, Dict] = {}
    for image_id in datastore.list_images() if image_ids is None else image_ids:
        record = (datastore.get_image_info(image_id).get(SCORES_KEY) or {}).get(task)
        if record:
            out[image_id] = record
    return out


def store_record(datastore: Datastore, image_id: str, task: str, record: Dict[str, Any]) -> bool:
    """Replace the ``task`` record of one image, keeping other tasks' records. False if the image is gone.

    The datastore is shared with the request threads; a write that races with one of them (a dictionary changing
    while it is serialised) is retried.
    """
    for attempt in range(10):
        try:
            scores = dict(datastore.get_image_info(image_id).get(SCORES_KEY) or {})
            scores[task] = record
            datastore.update_image_info(image_id, {SCORES_KEY: scores})
            return True
        except (ImageNotFoundException, NotFound):
            return False
        except RuntimeError as e:
            logger.debug("Retrying the score update of %s (%s)", image_id, e)
            time.sleep(0.05 * (attempt + 1))
    logger.warning("Could not store the %s scores of %s", task, image_id)
    return False
