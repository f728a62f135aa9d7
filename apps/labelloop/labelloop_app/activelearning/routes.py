"""HTTP routes of active learning, installed in front of MONAI Label's.

- ``GET /labelloop/queue?strategy=entropy&k=10``: the ranked queue (scores, model version, leases).
- ``POST /labelloop/lease?image=...&strategy=...&client_id=...``: lease an image the annotator chose (from the queue).
- ``DELETE /labelloop/lease?image=...&client_id=...``: give an image back before its lease expires.
- ``POST /scoring/{method}``, ``GET /scoring/``, ``DELETE /scoring/``: MONAI Label's scoring API with the same
  answers, served by the in-process background scorer instead of a subprocess (see ``background.py``).
"""

from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, Depends, HTTPException, Query
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User

from labelloop_app.activelearning.leases import anonymous_client
from labelloop_app.activelearning.manager import ActiveLearning
from labelloop_app.api import require
from labelloop_app.errors import BadRequest, NotFound
from labelloop_app.request_params import SCORING_RULES, STRATEGY_RULES, checked


def build_router(al: ActiveLearning) -> APIRouter:
    router = APIRouter()
    user_role = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))
    annotator = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))

    @router.get("/labelloop/queue", summary="Images a strategy would hand out next, with scores and leases")
    def queue(
        strategy: str = "entropy",
        k: int = Query(10, ge=1, le=1000),
        user: User = user_role,
    ):
        require("strategy", strategy, al._strategies)
        return al.queue(strategy, k)

    @router.post("/labelloop/lease", summary="Lease an image the annotator chose, as a strategy would hand it out")
    def take(image: str, strategy: str = "random", client_id: Optional[str] = None, user: User = annotator):
        require("strategy", strategy, al._strategies)
        client_id = checked(f"lease {image!r}", {"client_id": client_id}, STRATEGY_RULES)["client_id"]
        return al.take(strategy, image, client_id or anonymous_client())

    @router.delete("/labelloop/lease", summary="Give back an image handed out by a strategy")
    def release(image: str, client_id: Optional[str] = None, user: User = annotator):
        lease = al.leases.release(image, client_id)
        if lease is None:
            raise NotFound(f"no active lease on image {image!r}" + (f" held by {client_id!r}" if client_id else ""))
        return {"id": image, "released": lease.state()}

    @router.post("/scoring/{method}", summary="Score images for active learning (in the background)")
    def run_scoring(
        method: str,
        params: Optional[dict] = None,
        run_sync: Optional[bool] = False,
        user: User = annotator,
    ):
        require("scoring method", method, al._methods)
        if params is not None and not isinstance(params, dict):
            raise BadRequest("the request body must be a JSON object of scoring parameters")
        params = checked(f"score with {method!r}", params, SCORING_RULES)
        if run_sync:
            return al.background.run_sync(method, params)
        return al.background.submit(method, params)

    @router.get("/scoring/", summary="Status of the latest scoring run")
    def scoring_status(all: bool = False, check_if_running: bool = False, user: User = user_role):  # noqa: A002
        if check_if_running:
            if al.background.running is None:
                raise HTTPException(status_code=404, detail="No Scoring Tasks are currently Running")
            return al.background.running
        result = al.background.status(all)
        if not result:
            raise HTTPException(status_code=404, detail="No Scoring Tasks Found")
        return result

    @router.delete("/scoring/", summary="Stop scoring after the current image")
    def scoring_stop(user: User = annotator):
        return al.background.stop()

    return router
