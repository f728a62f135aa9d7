"""A 422 for a request whose JSON form field (``params`` of ``/infer`` and the datastore uploads, ``info`` of the
info updates) is not a JSON object.

MONAI Label's endpoints parse these fields themselves and use them as dicts, so ``params={bad`` or ``params=[1]``
ended in a 500 from inside the endpoint. :func:`build_form_json_router` gives every such endpoint a route in
front of it, with the same parameters, that checks the field and then calls MONAI Label's endpoint.
"""

from __future__ import annotations

import functools
import inspect
import json
from typing import Any, Callable, Iterable, Iterator, Optional

from fastapi import APIRouter
from fastapi.params import Form
from fastapi.routing import APIRoute

from labelloop_app.errors import UnprocessableInput

FIELDS = ("params", "info")


def not_a_json_object(text: Any) -> Optional[str]:
    """What is wrong with a form field's ``text`` as a JSON object (``None`` if nothing; empty means ``{}``)."""
    if not isinstance(text, str) or not text:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        return f"is not valid JSON ({e})"
    return None if isinstance(value, dict) else f"must be a JSON object, not {text[:60]!r}"


def json_fields(endpoint: Callable) -> list:
    """The endpoint's form parameters among :data:`FIELDS`."""
    parameters = inspect.signature(endpoint).parameters
    return [f for f in FIELDS if f in parameters and isinstance(parameters[f].default, Form)]


def checking_json_fields(endpoint: Callable, fields: Iterable[str]) -> Callable:
    """``endpoint`` (async, as MONAI Label's are) behind a check of its JSON form ``fields``; same signature."""
    fields = tuple(fields)

    @functools.wraps(endpoint)
    async def checked(*args, **kwargs):
        for field in fields:
            problem = not_a_json_object(kwargs.get(field))
            if problem:
                raise UnprocessableInput(f"form field {field!r} {problem}")
        return await endpoint(*args, **kwargs)

    return checked


def api_routes(routes: Iterable[Any]) -> Iterator[APIRoute]:
    """The endpoint routes among ``routes``, those of included routers too (FastAPI keeps an included router as one
    entry since 0.16x; its routes' paths hold their router's prefix, not the one it was included with)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):
            yield from api_routes(route.original_router.routes)


def build_form_json_router(routes: Iterable[Any]) -> APIRouter:
    """Routes in front of those of ``routes`` (the server's, to be included with the same prefix) whose endpoint
    reads a JSON form field, checking it first."""
    router = APIRouter()
    for route in api_routes(routes):
        fields = json_fields(route.endpoint) if inspect.iscoroutinefunction(route.endpoint) else []
        if fields:
            router.add_api_route(
                route.path,
                checking_json_fields(route.endpoint, fields),
                methods=list(route.methods),
                include_in_schema=False,
            )
    return router
