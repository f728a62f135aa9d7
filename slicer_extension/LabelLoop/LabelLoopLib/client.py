"""The REST client of LabelLoop: every request to a LabelLoop (MONAI Label 0.8.5) server goes through here.

Used by the Slicer module and by the ``labelloop`` command line, so it needs nothing but ``requests`` (and
optionally ``requests_toolbelt`` to parse multipart answers; the standard library's ``email`` parser is the
fallback). It turns failures into three kinds of exceptions a person can act on:

* :class:`ServerUnreachable`: nothing answered (refused, unknown host, timeout) - "is the server running?";
* :class:`ServerError`: the server answered with an HTTP error; ``.message`` is the server's own explanation
  (FastAPI's ``detail``), e.g. ``HTTP 422: label geometry does not match image 'case_001': ...``;
* :class:`OperationCancelled`: a download was cancelled through its ``cancel`` event.

Requests are retried only when no answer arrived, and a request that may have reached the server (a POST whose
answer timed out) is never sent twice. Downloads stream to files; uploads use requests' multipart encoder.
"""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import getpass
import json
import logging
import os
import socket
import tempfile
import threading
import time
from typing import IO, Any, Callable, Dict, List, Mapping, Optional, Tuple, Union
from urllib.parse import quote

import requests

logger = logging.getLogger(__name__)

EXPLAIN_METHODS = ("gradcam", "occlusion")
"""The explanation maps a classification model draws on request (the ``explain`` inference parameter)."""

DEFAULT_TIMEOUT = (5.0, 600.0)
CHUNK = 1 << 20
PathLike = Union[str, "os.PathLike[str]"]
ProgressCallback = Callable[[int, Optional[int]], None]


class LabelLoopError(Exception):
    """Base class of every error the client raises."""


class ServerUnreachable(LabelLoopError):
    """No answer from the server: connection refused, unknown host, or no reply within the timeout."""

    def __init__(self, url: str, reason: str):
        self.url = url
        self.reason = reason
        super().__init__(
            f"The LabelLoop server at {url} is not reachable ({reason}). Is it running, and is the address right?"
        )


class ServerError(LabelLoopError):
    """The server answered with an HTTP error status; ``message`` is its own explanation."""

    def __init__(self, status_code: int, message: str, url: str = "", method: str = ""):
        self.status_code = int(status_code)
        self.message = message
        self.url = url
        self.method = method
        super().__init__(f"HTTP {self.status_code}: {message}")


class OperationCancelled(LabelLoopError):
    """The operation was cancelled before it finished."""


class ProtocolError(LabelLoopError):
    """The server answered something this client cannot interpret."""


def normalize_url(server_url: str) -> str:
    """``"host:8000/"`` -> ``"http://host:8000"``: scheme added when missing, trailing slashes removed."""
    url = (server_url or "").strip()
    if not url:
        raise ValueError("the server address is empty")
    if "://" not in url:
        url = "http://" + url
    scheme = url.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"unsupported address {server_url!r}: use http:// or https://")
    scheme_text, _, rest = url.partition("://")
    rest = rest.rstrip("/")
    if not rest or rest.startswith("/"):
        raise ValueError(f"the server address {server_url!r} names no host")
    return f"{scheme_text}://{rest}"


def _detail_text(detail: Any) -> str:
    """FastAPI's ``detail``: a string, or a list of validation errors ``{"loc": [...], "msg": ...}``."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict) and "msg" in item:
                loc = ".".join(str(p) for p in item.get("loc", []) if p not in ("body", "query"))
                parts.append(f"{loc}: {item['msg']}" if loc else str(item["msg"]))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return json.dumps(detail) if not isinstance(detail, (int, float)) else str(detail)


def error_message(response: requests.Response) -> str:
    """The server's explanation of an error response (its ``detail``), else a short excerpt of the body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "detail" in body:
        return _detail_text(body["detail"])
    if isinstance(body, dict) and "message" in body:
        return str(body["message"])
    text = (response.text or "").strip()
    if not text:
        return response.reason or "no explanation given"
    return text if len(text) <= 500 else text[:500] + "..."


def filename_from_disposition(header: Optional[str]) -> Optional[str]:
    """The file name in a ``Content-Disposition`` header (RFC 2231/5987 forms included), base name only."""
    if not header:
        return None
    message = email.message.Message()
    message["content-disposition"] = header
    name = message.get_filename()
    return os.path.basename(name) if name else None


def file_extension(name: str, default: str = ".nii.gz") -> str:
    """Image extension of a file name, double extensions included (``.nii.gz``, ``.seg.nrrd``)."""
    lower = name.lower()
    for ext in (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".png", ".jpg", ".json"):
        if lower.endswith(ext):
            return ext
    return default


# --------------------------------------------------------------------------------------------------- multipart


def parse_multipart(
    body: bytes, content_type: str, prefer_toolbelt: bool = True
) -> Dict[str, Tuple[Optional[str], bytes]]:
    """Parts of a ``multipart/form-data`` body: ``{field name: (file name or None, content bytes)}``.

    Uses ``requests_toolbelt``'s decoder when it is installed (MONAI Label encodes with its encoder), otherwise
    the standard library's ``email`` parser; both return the parts' bytes unchanged.
    """
    if prefer_toolbelt:
        try:
            from requests_toolbelt.multipart.decoder import MultipartDecoder
        except ImportError:
            MultipartDecoder = None  # noqa: N806
        if MultipartDecoder is not None:
            parts: Dict[str, Tuple[Optional[str], bytes]] = {}
            for part in MultipartDecoder(body, content_type).parts:
                disposition = part.headers.get(b"Content-Disposition", b"").decode("utf-8", "replace")
                message = email.message.Message()
                message["content-disposition"] = disposition
                name = message.get_param("name", header="content-disposition")
                if name:
                    parts[str(name)] = (message.get_filename(), part.content)
            return parts
    head = f"MIME-Version: 1.0\r\nContent-Type: {content_type}\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise ProtocolError(f"expected a multipart answer, got {content_type!r}")
    out: Dict[str, Tuple[Optional[str], bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True)
        out[str(name)] = (part.get_filename(), payload if payload is not None else b"")
    return out


# --------------------------------------------------------------------------------------------------- client


class LabelLoopClient:
    """A LabelLoop server: ``LabelLoopClient("localhost:8000").info()``.

    ``timeout`` is (connect, read) seconds. ``retries`` is how many times a request that got no answer is
    tried in all. ``client_id`` names the annotator to the server's leases (default :func:`default_client_id`): a
    client holds one leased image at a time, so asking for the next image frees the previous, skipped one.
    Safe to use from several threads: unless ``session`` is given, each thread gets its own ``requests.Session``
    (connection reuse without sharing a session across threads).
    """

    def __init__(
        self,
        server_url: str,
        timeout: Tuple[float, float] = DEFAULT_TIMEOUT,
        retries: int = 3,
        session: Optional[requests.Session] = None,
        retry_delay: float = 0.3,
        client_id: Optional[str] = None,
    ):
        self.server_url = normalize_url(server_url)
        self.client_id = client_id or default_client_id()
        self.timeout = (float(timeout[0]), float(timeout[1]))
        self.retries = max(1, int(retries))
        self.retry_delay = float(retry_delay)
        self._shared_session = session
        self._local = threading.local()
        self._sessions: List[requests.Session] = []
        self._lock = threading.Lock()
        self._info: Optional[Dict[str, Any]] = None

    def __repr__(self) -> str:
        return f"LabelLoopClient({self.server_url!r})"

    @property
    def session(self) -> requests.Session:
        """The session used by the calling thread."""
        if self._shared_session is not None:
            return self._shared_session
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = "LabelLoop-client"
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    @property
    def last_info(self) -> Optional[Dict[str, Any]]:
        """The latest ``/info/`` answer this client received (``None`` before the first)."""
        with self._lock:
            return self._info

    def close(self) -> None:
        """Close the connections this client opened (a shared ``session`` passed in is left open)."""
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    def __enter__(self) -> LabelLoopClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------------- transport

    def _url(self, path: str) -> str:
        return self.server_url + "/" + path.lstrip("/")

    def request(
        self,
        method: str,
        path: str,
        params: Optional[Mapping[str, Any]] = None,
        json_body: Any = None,
        data: Optional[Mapping[str, Any]] = None,
        files: Optional[Mapping[str, PathLike]] = None,
        stream: bool = False,
        timeout: Optional[Tuple[float, float]] = None,
    ) -> requests.Response:
        """Send a request; retry only while nothing answered; raise :class:`ServerError` on HTTP errors.

        ``files`` maps form field names to local paths; they are opened anew for every attempt.
        """
        url = self._url(path)
        method = method.upper()
        timeout = timeout or self.timeout
        last: Optional[Exception] = None
        for attempt in range(1, self.retries + 1):
            handles: List[IO[bytes]] = []
            try:
                upload = None
                if files:
                    upload = {}
                    for field, file_path in files.items():
                        fh = open(os.fspath(file_path), "rb")
                        handles.append(fh)
                        upload[field] = (os.path.basename(os.fspath(file_path)), fh, "application/octet-stream")
                response = self.session.request(
                    method,
                    url,
                    params={k: v for k, v in (params or {}).items() if v is not None} or None,
                    json=json_body if files is None and data is None else None,
                    data=data,
                    files=upload,
                    stream=stream,
                    timeout=timeout,
                )
            except requests.exceptions.ConnectTimeout as e:
                last = e
                reason = f"no connection within {timeout[0]:g} s"
            except requests.exceptions.ReadTimeout as e:
                # The request reached the server; sending it again could run it twice.
                raise ServerUnreachable(self.server_url, f"no answer to {method} {path} within {timeout[1]:g} s") from e
            except requests.exceptions.ConnectionError as e:
                last = e
                reason = _connection_reason(e)
                if method == "POST" and not _not_sent(e):
                    raise ServerUnreachable(self.server_url, reason) from e
            except requests.exceptions.RequestException as e:
                raise LabelLoopError(f"{method} {url} failed: {e}") from e
            else:
                if response.status_code >= 400:
                    try:
                        message = error_message(response)
                    finally:
                        response.close()
                    raise ServerError(response.status_code, message, url, method)
                return response
            finally:
                for fh in handles:
                    fh.close()
            if attempt < self.retries:
                logger.info("%s %s: %s; retrying (%d/%d)", method, url, reason, attempt + 1, self.retries)
                time.sleep(self.retry_delay * attempt)
        raise ServerUnreachable(self.server_url, reason) from last

    def _json(self, response: requests.Response) -> Any:
        try:
            return response.json() if response.content else {}
        except ValueError as e:
            raise ProtocolError(f"the server's answer is not JSON: {response.text[:200]!r}") from e

    def _download(
        self,
        response: requests.Response,
        out_path: PathLike,
        cancel: Optional[threading.Event] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> str:
        """Stream a response body to ``out_path`` (atomically; a cancelled download leaves no file)."""
        out_path = os.fspath(out_path)
        directory = os.path.dirname(os.path.abspath(out_path))
        os.makedirs(directory, exist_ok=True)
        total = response.headers.get("Content-Length")
        total_bytes = int(total) if total and total.isdigit() else None
        fd, tmp = tempfile.mkstemp(prefix=".download-", dir=directory)
        done = 0
        try:
            with os.fdopen(fd, "wb") as f, response:
                for chunk in response.iter_content(CHUNK):
                    if cancel is not None and cancel.is_set():
                        raise OperationCancelled("download cancelled")
                    if chunk:
                        f.write(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done, total_bytes)
            os.replace(tmp, out_path)
        except requests.exceptions.RequestException as e:
            raise ServerUnreachable(self.server_url, f"the download was interrupted: {e}") from e
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return out_path

    @staticmethod
    def _target(out_path: Optional[PathLike], response: requests.Response, fallback: str) -> str:
        """``out_path`` itself, or (for a folder or ``None``) the server's file name in that folder."""
        name = filename_from_disposition(response.headers.get("Content-Disposition")) or fallback
        if out_path is None:
            return os.path.join(tempfile.mkdtemp(prefix="labelloop-"), name)
        out_path = os.fspath(out_path)
        if os.path.isdir(out_path) or out_path.endswith(("/", os.sep)):
            return os.path.join(out_path, name)
        return out_path

    # ----------------------------------------------------------------------------------------------- app info

    def info(self) -> Dict[str, Any]:
        """``GET /info/``: labels, models (type, labels, trained, model_version, config), trainers, strategies,
        train_stats per model and datastore progress."""
        info = self._json(self.request("GET", "/info/"))
        with self._lock:
            self._info = info
        return info

    def label_map(self, model: Optional[str] = None, info: Optional[Mapping[str, Any]] = None) -> Dict[str, int]:
        """``{name: value}`` of the segmentation model (``model`` or the first of type "segmentation")."""
        info = info if info is not None else self.info()
        return label_map_from_info(info, model)

    # ----------------------------------------------------------------------------------------------- samples

    def next_sample(self, strategy: str = "random", params: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """``POST /activelearning/{strategy}``: the next image to annotate (``{}`` when none is left), leased to
        :attr:`client_id` unless ``params`` names another."""
        path = f"/activelearning/{quote(strategy, safe='')}"
        body = {"client_id": self.client_id, **dict(params or {})}
        return self._json(self.request("POST", path, json_body=body))

    def take_image(self, image_id: str, strategy: str = "random") -> Dict[str, Any]:
        """``POST /labelloop/lease``: lease an image the annotator chose (from the queue) to :attr:`client_id`, as
        ``strategy`` would have handed it out. The server refuses (409) an image labeled or leased to another."""
        params = {"image": image_id, "strategy": strategy, "client_id": self.client_id}
        return self._json(self.request("POST", "/labelloop/lease", params=params))

    def release_image(self, image_id: str) -> Dict[str, Any]:
        """``DELETE /labelloop/lease``: give back an image leased to :attr:`client_id` before its lease expires."""
        params = {"image": image_id, "client_id": self.client_id}
        return self._json(self.request("DELETE", "/labelloop/lease", params=params))

    def class_labels(self) -> Dict[str, Any]:
        """``GET /labelloop/classes``: every image's class label (``labels``), the count per class (``counts``)
        and each labeled image's number of findings (``findings``)."""
        return self._json(self.request("GET", "/labelloop/classes"))

    def queue(self, strategy: str = "entropy", k: int = 10) -> Dict[str, Any]:
        """``GET /labelloop/queue``: the next ``k`` images ``strategy`` would hand out (nothing is leased), with their
        scores and the model that scored them, and the images leased now."""
        return self._json(self.request("GET", "/labelloop/queue", params={"strategy": strategy, "k": int(k)}))

    def download_image(
        self,
        image_id: str,
        out_path: Optional[PathLike] = None,
        cancel: Optional[threading.Event] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> str:
        """``GET /datastore/image``: stream image ``image_id`` to ``out_path`` (a file, or a folder to keep the
        server's file name and extension). Returns the file path."""
        response = self.request("GET", "/datastore/image", params={"image": image_id}, stream=True)
        target = self._target(out_path, response, f"{image_id}.nii.gz")
        return self._download(response, target, cancel, progress)

    def upload_image(
        self, path: PathLike, image_id: Optional[str] = None, params: Optional[Mapping[str, Any]] = None
    ) -> str:
        """``PUT /datastore/``: add an image file; returns its id (``image_id`` or the file's name stem)."""
        response = self.request(
            "PUT",
            "/datastore/",
            params={"image": image_id},
            data={"params": json.dumps(dict(params or {}))},
            files={"file": path},
        )
        result = self._json(response)
        return str(result.get("image", image_id or "")) if isinstance(result, dict) else str(result)

    # ----------------------------------------------------------------------------------------------- inference

    def infer(
        self,
        model: str,
        image_id: Optional[str] = None,
        file: Optional[PathLike] = None,
        params: Optional[Mapping[str, Any]] = None,
        out_path: Optional[PathLike] = None,
    ) -> Tuple[Optional[str], Dict[str, Any]]:
        """``POST /infer/{model}?output=all``: run a model on a datastore image or an uploaded file.

        Returns ``(label file path, result json)``; the path is ``None`` when the model answers with JSON only
        (classification). ``out_path`` may be a file or a folder (server's file name kept).
        """
        if not image_id and file is None:
            raise ValueError("infer needs an image id or a file")
        response = self.request(
            "POST",
            f"/infer/{quote(model, safe='')}",
            params={"image": image_id or None, "output": "all"},
            data={"params": json.dumps(dict(params or {}))},
            files={"file": file} if file is not None and not image_id else None,
        )
        content_type = response.headers.get("Content-Type", "")
        if content_type.lower().startswith("multipart/"):
            parts = parse_multipart(response.content, content_type)
            result: Dict[str, Any] = {}
            if "params" in parts:
                try:
                    loaded = json.loads(parts["params"][1].decode("utf-8") or "{}")
                except ValueError as e:
                    raise ProtocolError("the inference result's parameters are not JSON") from e
                result = loaded if isinstance(loaded, dict) else {"result": loaded}
            if "image" not in parts:
                return None, result
            name, content = parts["image"]
            target = self._target(out_path, response, name or f"{image_id or 'result'}_{model}.nii.gz")
            _atomic_write(target, content)
            return target, result
        if content_type.lower().startswith("application/json"):
            loaded = self._json(response)
            return None, loaded if isinstance(loaded, dict) else {"result": loaded}
        target = self._target(out_path, response, f"{image_id or 'result'}_{model}.nii.gz")
        return self._download(response, target), {}

    # ----------------------------------------------------------------------------------------------- labels

    def save_label(
        self,
        image_id: str,
        label_path: PathLike,
        tag: str = "final",
        label_info: Optional[Union[List[Any], Mapping[str, Any]]] = None,
        params: Optional[Mapping[str, Any]] = None,
    ) -> Dict[str, Any]:
        """``PUT /datastore/label``: store a label file for ``image_id`` under ``tag``.

        ``label_info`` (a list of ``{"name", "idx", "color"}`` or any dict such as ``{"class": "lesion"}``) is
        sent as ``params = {"label_info": ...}``; ``params`` adds other fields.
        """
        body: Dict[str, Any] = dict(params or {})
        if label_info is not None:
            body["label_info"] = label_info
        response = self.request(
            "PUT",
            "/datastore/label",
            params={"image": image_id, "tag": tag},
            data={"params": json.dumps(body)},
            files={"label": label_path},
        )
        result = self._json(response)
        return result if isinstance(result, dict) else {"result": result}

    def download_label(
        self,
        image_id: str,
        tag: str = "final",
        out_path: Optional[PathLike] = None,
        cancel: Optional[threading.Event] = None,
    ) -> str:
        """``GET /datastore/label``: stream the ``tag`` label of ``image_id`` to a file; returns the path."""
        response = self.request("GET", "/datastore/label", params={"label": image_id, "tag": tag}, stream=True)
        target = self._target(out_path, response, f"{image_id}.nii.gz")
        return self._download(response, target, cancel)

    # ----------------------------------------------------------------------------------------------- datastore

    def datastore_status(self) -> Dict[str, Any]:
        """``GET /datastore/?output=stats``: ``{"total", "completed", "label_tags"}``."""
        return self._json(self.request("GET", "/datastore/", params={"output": "stats"}))

    def datastore(self, output: str = "all") -> Any:
        """``GET /datastore/?output=...`` (``all``: every object with its labels; ``train``: the datalist)."""
        return self._json(self.request("GET", "/datastore/", params={"output": output}))

    # ----------------------------------------------------------------------------------------------- training

    def train_start(self, model: str, params: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """``POST /train/{model}``: start training in the background; returns the task record."""
        return self._json(self.request("POST", f"/train/{quote(model, safe='')}", json_body=dict(params or {})))

    def train_status(self, all: bool = False, check_if_running: bool = False) -> Any:  # noqa: A002
        """``GET /train/``: the latest training task (or all); ``None`` when there is none (or none running)."""
        return self._task_status("/train/", all, check_if_running)

    def train_stop(self) -> Any:
        """``DELETE /train/``: stop the running training task."""
        return self._json(self.request("DELETE", "/train/"))

    # ----------------------------------------------------------------------------------------------- batch

    def batch_infer(
        self, model: str, images: str = "unlabeled", params: Optional[Mapping[str, Any]] = None
    ) -> Dict[str, Any]:
        """``POST /batch/infer/{model}?images=all|unlabeled``: infer every (unlabeled) image in the background."""
        return self._json(
            self.request(
                "POST", f"/batch/infer/{quote(model, safe='')}", params={"images": images}, json_body=dict(params or {})
            )
        )

    def batch_infer_status(self, all: bool = False, check_if_running: bool = False) -> Any:  # noqa: A002
        """``GET /batch/infer``: the latest batch inference task; ``None`` when there is none."""
        return self._task_status("/batch/infer", all, check_if_running)

    def _task_status(self, path: str, all: bool, check_if_running: bool) -> Any:  # noqa: A002
        """MONAI Label's task status endpoints answer 404 when there is no task: that is ``None`` here."""
        flags = {"all": str(bool(all)).lower(), "check_if_running": str(bool(check_if_running)).lower()}
        try:
            response = self.request("GET", path, params=flags)
        except ServerError as e:
            if e.status_code == 404:
                return None
            raise
        return self._json(response)

    def batch_infer_stop(self) -> Any:
        """``DELETE /batch/infer``: stop batch inference."""
        return self._json(self.request("DELETE", "/batch/infer"))


def default_client_id() -> str:
    """``user@host``: the same annotator on the same machine is one client, in Slicer and on the command line."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name in the environment or the password database
        user = "annotator"
    return f"{user}@{socket.gethostname() or 'localhost'}"


def label_map_from_info(info: Mapping[str, Any], model: Optional[str] = None) -> Dict[str, int]:
    """``{name: value}`` of a segmentation model in an ``/info/`` answer (the app's labels as a fallback).

    Labels given as a list are numbered 1, 2, ... in order (MONAI Label's convention); ``background`` is left out.
    """
    models = info.get("models") or {}
    chosen: Optional[Mapping[str, Any]] = None
    if model is not None:
        chosen = models.get(model)
        if chosen is None:
            raise KeyError(f"the server has no model {model!r}; models: {', '.join(models) or 'none'}")
    else:
        for m in models.values():
            if isinstance(m, Mapping) and str(m.get("type", "")).lower() == "segmentation":
                chosen = m
                break
    labels = (chosen or {}).get("labels") or info.get("labels") or {}
    return _as_label_map(labels)


def _as_label_map(labels: Any) -> Dict[str, int]:
    if isinstance(labels, Mapping):
        if labels and all(str(k).isdigit() for k in labels):  # {value: name}
            return {str(v): int(k) for k, v in labels.items() if str(v).lower() != "background" and int(k) != 0}
        return {str(k): int(v) for k, v in labels.items() if str(k).lower() != "background"}
    if isinstance(labels, (list, tuple)):
        names = [str(n) for n in labels if str(n).lower() != "background"]
        return {n: i for i, n in enumerate(names, start=1)}
    return {}


def _connection_reason(error: Exception) -> str:
    text = str(error)
    lowered = text.lower()
    if "refused" in lowered:
        return "connection refused"
    if "name or service not known" in lowered or "nodename nor servname" in lowered or "getaddrinfo" in lowered:
        return "unknown host name"
    if "timed out" in lowered:
        return "connection timed out"
    if "reset" in lowered or "aborted" in lowered or "remote end closed" in lowered:
        return "the connection was closed by the server"
    return "connection failed"


def _not_sent(error: Exception) -> bool:
    """Whether a connection error happened before the request could reach the server (safe to retry a POST)."""
    from urllib3.exceptions import NewConnectionError

    seen = set()
    current: Optional[BaseException] = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, NewConnectionError):
            return True
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            if isinstance(reason, NewConnectionError):
                return True
        args = getattr(current, "args", ())
        nested = next((a for a in args if isinstance(a, BaseException)), None)
        current = nested or current.__cause__ or current.__context__
    lowered = str(error).lower()
    return "refused" in lowered or "name or service not known" in lowered or "failed to establish" in lowered


def _atomic_write(path: str, content: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".result-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
