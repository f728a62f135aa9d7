"""Routes LabelLoop puts in front of MONAI Label's own, so that unknown task names get a 404 naming the
valid ones, an image or label (or its info) that is not stored a 404 naming it (MONAI Label answers ``{}`` for
the info), and training parameters a run cannot take a 422 naming them, instead of a background task that fails
later.
They delegate to MONAI Label's endpoint functions."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable, Dict, Optional

from fastapi import APIRouter, Depends
from monailabel.config import settings
from monailabel.endpoints import datastore as datastore_endpoint
from monailabel.endpoints import train as train_endpoint
from monailabel.endpoints.user.auth import RBAC, User

from labelloop_app.errors import Conflict, NotFound
from labelloop_app.form_json import build_form_json_router
from labelloop_app.request_params import TRAIN_RULES, checked

logger = logging.getLogger(__name__)


def require(kind: str, name: str, available: Dict) -> None:
    if name not in available:
        raise NotFound(f"unknown {kind} {name!r}; available: {', '.join(sorted(available)) or 'none'}")


STOP_WAIT_SECONDS = 30.0
"""How long a stop request waits for a submitted task's process to start (a training's starts within seconds)."""


def wait_until_started(method: str, seconds: float, poll: float = 0.05) -> bool:
    """Wait while a ``method`` task is submitted but its process has not started (MONAI Label marks a task RUNNING
    right after registering its process); False when ``seconds`` pass first."""
    from monailabel.utils.async_tasks.utils import tasks

    deadline = time.monotonic() + seconds
    while any(t.get("status") == "SUBMITTED" for t in tasks(method)):
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


def trainings_running() -> int:
    """How many of the server's training runs are running (each in its own process, on the same CPU)."""
    from monailabel.utils.async_tasks.utils import tasks

    return sum(t.get("status") == "RUNNING" for t in tasks("train"))


def require_training_data(model: str, trainer: Any, params: Optional[dict], datastore: Any) -> None:
    """A 409 when ``trainer`` has nothing to train on: its datalist (what the run would train on) is empty or
    cannot be made. MONAI Label would start the run, which then fails in the background."""
    try:
        datalist = trainer.pre_process({**trainer.config(), **(params or {})}, datastore)
    except ValueError as e:
        raise Conflict(f"cannot train {model!r}: {e}") from e
    if not datalist:
        raise Conflict(f"cannot train {model!r}: no image has a final label yet; submit labels first")


def build_router(trainers: Callable[[], Dict], infers: Callable[[], Dict], datastore: Callable[[], Any]) -> APIRouter:
    router = APIRouter()
    admin = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))

    @router.post("/train/{model}", include_in_schema=False)
    async def train_model(
        model: str,
        params: Optional[dict] = None,
        run_sync: Optional[bool] = False,
        enqueue: Optional[bool] = False,
        user: User = admin,
    ):
        require("train task", model, trainers())
        trainer = trainers()[model]
        params = checked(f"train {model!r}", params, TRAIN_RULES, trainer.config())
        require_training_data(model, trainer, params, datastore())
        return train_endpoint.run_model(model, params, run_sync, enqueue)

    @router.delete("/train/", include_in_schema=False)
    def stop_training(user: User = admin):
        """MONAI Label's stop, once a training just submitted has its process: stopped before that, MONAI Label
        finds nothing to stop and the run goes on (a *Stop* pressed right after *Train*)."""
        wait_until_started("train", STOP_WAIT_SECONDS)
        return train_endpoint.stop()

    user_role = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))

    def image_route(endpoint: Callable[[str], Any]):
        async def route(image: str, user: User = user_role):
            datastore().require_image(image)
            return endpoint(image)

        return route

    def label_route(endpoint: Callable[[str, str], Any]):
        async def route(label: str, tag: str, user: User = user_role):
            datastore().require_label(label, tag)
            return endpoint(label, tag)

        return route

    # MONAI Label's reads, but a 404 that names what is not stored (MONAI Label's say "NOT Found", or give {} info)
    for path, endpoint in (
        ("/datastore/image", datastore_endpoint.download_image),
        ("/datastore/image/info", datastore_endpoint.get_image_info),
    ):
        router.add_api_route(path, image_route(endpoint), methods=["GET"], include_in_schema=False)
    for path, endpoint in (
        ("/datastore/label", datastore_endpoint.download_label),
        ("/datastore/label/info", datastore_endpoint.get_label_info),
    ):
        router.add_api_route(path, label_route(endpoint), methods=["GET"], include_in_schema=False)

    # Batch inference has its own routes: labelloop_app.batch.build_batch_router.

    return router


def install_routes(trainers: Callable[[], Dict], infers: Callable[[], Dict], datastore: Callable[[], Any]) -> bool:
    """Put LabelLoop's routes first in the running server's route table (no-op outside the server process)."""
    return install_router(build_router(trainers, infers, datastore))


def install_form_json_checks() -> bool:
    """Put a check of their JSON form fields in front of MONAI Label's endpoints that read one
    (:mod:`labelloop_app.form_json`); no-op outside the server process."""
    server = sys.modules.get("monailabel.app")
    if server is None or not hasattr(server, "app"):
        return False
    return install_router(build_form_json_router(list(server.app.router.routes)))


def install_router(router: APIRouter) -> bool:
    """Put a router's routes before MONAI Label's own (which they replace); no-op outside the server process."""
    server = sys.modules.get("monailabel.app")
    if server is None or not hasattr(server, "app"):
        return False
    fastapi_app = server.app
    before = len(fastapi_app.router.routes)
    fastapi_app.include_router(router, prefix=settings.MONAI_LABEL_API_STR)
    added = fastapi_app.router.routes[before:]
    del fastapi_app.router.routes[before:]
    fastapi_app.router.routes[0:0] = added
    return True
