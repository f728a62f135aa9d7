"""HTTP errors with messages that name the problem.

They subclass FastAPI's HTTPException, so raised anywhere below an endpoint they reach the client as a 4xx with
the message, and the server keeps serving.
"""

from __future__ import annotations

from fastapi import HTTPException


class LabelLoopHTTPError(HTTPException):
    status = 400

    def __init__(self, message: str):
        super().__init__(status_code=self.status, detail=message)

    def __str__(self) -> str:
        return str(self.detail)


class BadRequest(LabelLoopHTTPError):
    status = 400


class NotFound(LabelLoopHTTPError):
    status = 404


class Conflict(LabelLoopHTTPError):
    status = 409


class ModelNotTrained(Conflict):
    pass


class UnprocessableInput(LabelLoopHTTPError):
    status = 422
