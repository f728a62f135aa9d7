"""The REST client and the background jobs without a LabelLoop server: unreachable servers, URL handling,
MONAI Label's multipart answers (built with the same encoder the server uses), HTTP errors from a small
in-process HTTP responder, retry rules, and the job runner's run/cancel/failure semantics with real threads."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, Iterator, List, Tuple

import pytest
import requests
from requests_toolbelt import MultipartEncoder

from LabelLoopLib import client as llclient
from LabelLoopLib.client import (
    LabelLoopClient,
    OperationCancelled,
    ServerError,
    ServerUnreachable,
    filename_from_disposition,
    label_map_from_info,
    normalize_url,
    parse_multipart,
)
from LabelLoopLib.workflow import (
    QUEUE_HEADERS,
    JobBusy,
    JobRunner,
    JobState,
    Sample,
    ServerInfo,
    curve_axis_title,
    curve_columns,
    describe_error,
    parse_classification,
    parse_history,
    queue_table,
    serialize_history,
    train_params,
    training_from_stats,
    update_history,
)


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ unreachable


@pytest.mark.parametrize("method", ["info", "next_sample", "train_start"])
def test_closed_port_raises_server_unreachable_quickly_with_the_url(method):
    url = f"http://127.0.0.1:{closed_port()}"
    c = LabelLoopClient(url, retries=3, retry_delay=0.05)
    start = time.time()
    with pytest.raises(ServerUnreachable) as err:
        if method == "train_start":
            c.train_start("segmentation")
        else:
            getattr(c, method)()
    assert time.time() - start < 5
    assert url in str(err.value)
    assert "not reachable" in str(err.value)
    assert "refused" in err.value.reason
    assert isinstance(err.value, llclient.LabelLoopError)


def test_unknown_host_is_unreachable_not_a_crash():
    c = LabelLoopClient("http://labelloop-host.invalid:8000", retries=1, timeout=(2, 2))
    with pytest.raises(ServerUnreachable) as err:
        c.info()
    assert "labelloop-host.invalid" in str(err.value)


# ------------------------------------------------------------------------------------------------ URLs


@pytest.mark.parametrize(
    "given,expected",
    [
        ("localhost:8000", "http://localhost:8000"),
        ("  http://127.0.0.1:8000/  ", "http://127.0.0.1:8000"),
        ("https://label.example.org/api//", "https://label.example.org/api"),
        ("HTTP://Host:1", "HTTP://Host:1"),
        ("10.0.0.5", "http://10.0.0.5"),
    ],
)
def test_url_normalisation(given, expected):
    assert normalize_url(given) == expected
    assert LabelLoopClient(given).server_url == expected


@pytest.mark.parametrize("bad", ["", "   ", "ftp://host", "http://"])
def test_invalid_urls_are_refused(bad):
    with pytest.raises(ValueError):
        normalize_url(bad)


def test_server_url_history_most_recent_first_deduplicated_and_bounded():
    history: List[str] = []
    for i in range(12):
        history = update_history(history, f"host{i}:8000")
    assert len(history) == 10
    assert history[0] == "http://host11:8000" and history[-1] == "http://host2:8000"
    history = update_history(history, "http://host5:8000/")
    assert history[0] == "http://host5:8000" and history.count("http://host5:8000") == 1
    assert parse_history(serialize_history(history)) == history
    assert parse_history("a:1\nb:2, a:1;;") == ["http://a:1", "http://b:2"]
    assert parse_history(None) == [] and parse_history("") == [] and parse_history(["", "ftp://x"]) == []


# ------------------------------------------------------------------------------------------------ multipart


def encoded(fields) -> Tuple[bytes, str]:
    m = MultipartEncoder(fields=fields)
    return m.to_string(), m.content_type


@pytest.mark.parametrize("prefer_toolbelt", [True, False], ids=["toolbelt", "stdlib-email"])
def test_multipart_answer_parsed_byte_for_byte(prefer_toolbelt):
    """The exact construction of MONAI Label's infer endpoint (``output=all``): a JSON ``params`` part and an
    ``image`` file part. Binary content with CR/LF bytes and boundary-like text must come back unchanged."""
    payload = bytes(range(256)) * 40 + b"\r\n--not-a-boundary\r\n\n\r" + os.urandom(5000) + b"\r\n"
    params = {"label_names": {"liver": 1}, "latencies": {"total": 1.5}, "text": "Äste"}
    body, ctype = encoded(
        {
            "params": (None, json.dumps(params), "application/json"),
            "image": ("tmp1_a.nii.gz", payload, "application/gzip"),
        }
    )
    parts = parse_multipart(body, ctype, prefer_toolbelt=prefer_toolbelt)
    assert set(parts) == {"params", "image"}
    assert json.loads(parts["params"][1].decode("utf-8")) == params
    assert parts["image"][0] == "tmp1_a.nii.gz"
    assert parts["image"][1] == payload


def test_content_disposition_file_names():
    assert filename_from_disposition('attachment; filename="case_001.nii.gz"') == "case_001.nii.gz"
    assert filename_from_disposition("attachment; filename*=utf-8''Leber%20%C3%84ste.nrrd") == "Leber Äste.nrrd"
    assert filename_from_disposition('attachment; filename="../../etc/passwd"') == "passwd"
    assert filename_from_disposition(None) is None


# ------------------------------------------------------------------------------------------------ a tiny HTTP responder


class Responder:
    """An HTTP server in a thread answering with canned responses per path, recording requests."""

    def __init__(self, routes: Dict[str, Callable[[BaseHTTPRequestHandler, bytes], None]]):
        self.routes = routes
        self.requests: List[Tuple[str, str, bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                outer.requests.append((self.command, self.path, body))
                route = outer.routes.get(f"{self.command} {self.path.split('?')[0]}")
                if route is None:
                    send(self, 404, {"detail": "Not Found"})
                else:
                    route(self, body)

            do_GET = do_POST = do_PUT = do_DELETE = _handle  # noqa: N815

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def send(handler, status: int, payload=None, body: bytes = b"", content_type: str = "application/json", headers=None):
    data = json.dumps(payload).encode() if payload is not None else body
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(data)))
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(data)


@pytest.fixture
def responder() -> Iterator[Callable[[dict], Responder]]:
    made: List[Responder] = []

    def make(routes):
        r = Responder(routes)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def test_http_errors_carry_the_servers_detail(responder):
    detail = "label geometry does not match image 'case_001': size (10, 10, 5) != (64, 64, 32) (label != image)"
    r = responder(
        {
            "PUT /datastore/label": lambda h, b: send(h, 422, {"detail": detail}),
            "POST /activelearning/nope": lambda h, b: send(h, 404, {"detail": "unknown strategy 'nope'"}),
            "GET /info/": lambda h, b: send(h, 500, body=b"Internal Server Error", content_type="text/plain"),
            "POST /train/segmentation": lambda h, b: send(
                h, 422, {"detail": [{"loc": ["body", "max_epochs"], "msg": "value is not a valid integer"}]}
            ),
        }
    )
    c = LabelLoopClient(r.url)
    label = os.path.join(os.path.dirname(__file__), "test_client_offline.py")
    with pytest.raises(ServerError) as err:
        c.save_label("case_001", label)
    assert err.value.status_code == 422 and err.value.message == detail
    assert str(err.value) == f"HTTP 422: {detail}"
    assert "refused the request (HTTP 422)" in describe_error(err.value)
    with pytest.raises(ServerError, match="unknown strategy 'nope'") as err:
        c.next_sample("nope")
    assert err.value.status_code == 404
    with pytest.raises(ServerError) as err:
        c.info()
    assert err.value.status_code == 500 and err.value.message == "Internal Server Error"
    with pytest.raises(ServerError, match="max_epochs: value is not a valid integer"):
        c.train_start("segmentation", {"max_epochs": "x"})
    # one request each: HTTP errors are never retried
    assert [m for m, _, _ in r.requests] == ["PUT", "POST", "GET", "POST"]


def test_a_post_whose_answer_times_out_is_not_sent_again(responder):
    def slow(handler, body):
        time.sleep(1.5)
        send(handler, 200, {})

    r = responder({"POST /train/segmentation": slow})
    c = LabelLoopClient(r.url, timeout=(2, 0.5), retries=3, retry_delay=0.01)
    with pytest.raises(ServerUnreachable, match="no answer to POST /train/segmentation within 0.5 s"):
        c.train_start("segmentation", {"max_epochs": 1})
    time.sleep(0.2)
    assert len([x for x in r.requests if x[0] == "POST"]) == 1


def test_json_body_form_params_and_files_are_sent_as_the_endpoints_expect(responder, tmp_path):
    seen = {}

    def save_label(handler, body):
        seen["ctype"] = handler.headers["Content-Type"]
        seen["body"] = body
        seen["path"] = handler.path
        send(handler, 200, {"image": "case_001", "label": "case_001"})

    def sample(handler, body):
        seen["sample"] = json.loads(body)
        send(handler, 200, {"id": "case_002", "name": "case_002.nii.gz"})

    r = responder({"PUT /datastore/label": save_label, "POST /activelearning/random": sample})
    c = LabelLoopClient(r.url)
    label = tmp_path / "case_001.nii.gz"
    label.write_bytes(b"\x1f\x8bfake")
    answer = c.save_label("case_001", label, tag="final", label_info=[{"name": "liver", "idx": 1}])
    assert answer["label"] == "case_001"
    assert seen["path"] == "/datastore/label?image=case_001&tag=final"
    parts = parse_multipart(seen["body"], seen["ctype"])
    assert parts["label"] == ("case_001.nii.gz", b"\x1f\x8bfake")
    assert json.loads(parts["params"][1]) == {"label_info": [{"name": "liver", "idx": 1}]}
    assert c.next_sample("random", {"client_id": "me"})["id"] == "case_002"
    assert seen["sample"] == {"client_id": "me"}


def test_infer_returns_label_file_and_json_from_multipart_or_json(responder, tmp_path):
    payload = os.urandom(3000)

    def infer_all(handler, body):
        data, ctype = encoded(
            {
                "params": (None, json.dumps({"label_names": {"liver": 1}}), "application/json"),
                "image": ("tmpab12.nii.gz", payload, "application/gzip"),
            }
        )
        send(handler, 200, body=data, content_type=ctype)

    r = responder(
        {
            "POST /infer/segmentation": infer_all,
            "POST /infer/classification": lambda h, b: send(h, 200, {"prediction": 1, "probabilities": [0.2, 0.8]}),
        }
    )
    c = LabelLoopClient(r.url)
    path, result = c.infer("segmentation", image_id="case_001", out_path=str(tmp_path) + os.sep)
    assert path == str(tmp_path / "tmpab12.nii.gz")
    assert open(path, "rb").read() == payload
    assert result == {"label_names": {"liver": 1}}
    target = tmp_path / "mine.nii.gz"
    path, _ = c.infer("segmentation", image_id="case_001", out_path=target)
    assert path == str(target) and target.read_bytes() == payload
    path, result = c.infer("classification", image_id="case_001")
    assert path is None and result["probabilities"] == [0.2, 0.8]
    parsed = parse_classification(result, ["normal", "lesion"])
    assert parsed.predicted == "lesion" and parsed.probabilities == {"normal": 0.2, "lesion": 0.8}
    assert r.requests[0][1] == "/infer/segmentation?image=case_001&output=all"


def test_download_streams_to_file_keeps_server_name_and_can_be_cancelled(responder, tmp_path):
    content = os.urandom(3 * llclient.CHUNK + 17)

    def image(handler, body):
        send(
            handler,
            200,
            body=content,
            content_type="application/gzip",
            headers={"Content-Disposition": 'attachment; filename="case_001.nrrd"'},
        )

    r = responder({"GET /datastore/image": image})
    c = LabelLoopClient(r.url)
    seen = []
    path = c.download_image("case_001", str(tmp_path) + os.sep, progress=lambda done, total: seen.append((done, total)))
    assert path == str(tmp_path / "case_001.nrrd")
    assert open(path, "rb").read() == content
    assert seen[-1] == (len(content), len(content))
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(OperationCancelled):
        c.download_image("case_001", tmp_path / "cancelled.nrrd", cancel=cancel)
    assert not (tmp_path / "cancelled.nrrd").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".download")] == []


def test_missing_train_task_is_none_not_an_error(responder):
    r = responder(
        {
            "GET /train/": lambda h, b: send(h, 404, {"detail": "No Train Tasks Found"}),
            "GET /batch/infer": lambda h, b: send(h, 200, {"id": "x", "status": "RUNNING", "details": ["a"]}),
        }
    )
    c = LabelLoopClient(r.url)
    assert c.train_status() is None
    assert c.batch_infer_status()["status"] == "RUNNING"


# ------------------------------------------------------------------------------------------------ info parsing


LESION = {"type": "classification", "labels": ["normal", "lesion"]}
INFO = {
    "name": "LabelLoop",
    "version": "0.1.0",
    "labels": {"liver": 1, "spleen": 2},
    "models": {
        "segmentation": {
            "type": "segmentation",
            "labels": {"liver": 1, "spleen": 2},
            "trained": True,
            "model_version": "abc",
        },
        "lesion": LESION,
    },
    "trainers": {"segmentation": {}},
    "strategies": {"random": {}, "first": {}},
    "datastore": {"total": 7, "completed": 4, "label_tags": {"final": 4}},
    "train_stats": {
        "segmentation": {
            "epoch": 2,
            "total_epochs": 5,
            "best_metric": 0.61,
            "loss": 0.42,
            "val_mean_dice": 0.6,
            "val_dice": {"liver": 0.8, "spleen": 0.4},
            "run_id": "20240101_101010",
            "history": [
                {"epoch": 1, "loss": 0.9, "train_mean_dice": 0.2, "val_mean_dice": 0.3, "seconds": 3},
                {"epoch": 2, "loss": 0.42, "train_mean_dice": 0.5, "val_mean_dice": 0.6, "seconds": 3},
            ],
        }
    },
}


def test_info_parsing_labels_models_progress_and_metrics():
    assert label_map_from_info(INFO) == {"liver": 1, "spleen": 2}
    assert label_map_from_info(INFO, "lesion") == {"normal": 1, "lesion": 2}
    assert label_map_from_info({"labels": {"1": "liver", "0": "background"}}) == {"liver": 1}
    info = ServerInfo.from_info(INFO)
    assert info.segmentation_model.name == "segmentation" and info.classification_model.classes == ["normal", "lesion"]
    assert info.strategies == ["random", "first"] and info.trainers == ["segmentation"]
    assert (info.datastore.completed, info.datastore.total) == (4, 7)
    assert "best Dice 0.610" in info.metrics_summary() and "liver 0.80" in info.metrics_summary()
    progress = training_from_stats(INFO["train_stats"]["segmentation"], ["liver", "spleen"])
    assert (progress.epoch, progress.total_epochs, progress.loss) == (2, 5, 0.42)
    assert progress.dice == {"liver": 0.8, "spleen": 0.4}
    assert [h["epoch"] for h in progress.history] == [1, 2]
    assert progress.history[0]["val_mean_dice"] == 0.3


def test_a_classifier_s_progress_shows_its_accuracy_and_auc_not_a_dice():
    stats = {
        "epoch": 3,
        "total_epochs": 30,
        "loss": 0.5,
        "best_metric": 1.0007,  # the trainer's own score, not a Dice
        "train_accuracy": 0.9,
        "val_accuracy": 0.75,
        "val_balanced_accuracy": 0.625,
        "val_auc": 0.8125,
    }
    progress = training_from_stats(stats, ["normal", "lesion"])
    progress.state = "running"
    assert progress.metrics == {"val accuracy": 0.75, "val balanced accuracy": 0.625, "val ROC AUC": 0.8125}
    assert progress.summary() == (
        "Running | epoch 3/30 | loss 0.5000 | val accuracy 0.750 | val balanced accuracy 0.625 | val ROC AUC 0.812"
    )
    # without a validation set, the training figures, named as such
    train_only = training_from_stats({"epoch": 1, "train_accuracy": 0.5, "train_auc": 0.6})
    assert train_only.metrics == {"train accuracy": 0.5, "train ROC AUC": 0.6}
    info = ServerInfo.from_info(
        {
            **INFO,
            "train_stats": {"lesion": stats},
            "models": {**INFO["models"], "lesion": {**LESION, "model_version": "abc"}},
        }
    )
    line = info.metrics_summary("lesion")
    assert "Dice" not in line and "val ROC AUC 0.812" in line and "version abc" in line
    assert training_from_stats(INFO["train_stats"]["segmentation"], ["liver", "spleen"]).metrics == {}
    assert progress.table() == (
        ["Metric", "Value"],
        [("val accuracy", 0.75), ("val balanced accuracy", 0.625), ("val ROC AUC", 0.8125)],
    )
    segmentation = training_from_stats(INFO["train_stats"]["segmentation"], ["liver", "spleen"])
    assert segmentation.table() == (["Structure", "Dice"], [("liver", 0.8), ("spleen", 0.4)])


def test_the_learning_curve_plots_what_the_trainer_records():
    segmentation = training_from_stats(INFO["train_stats"]["segmentation"], ["liver", "spleen"]).history
    assert curve_columns(segmentation) == ["loss", "train_mean_dice", "val_mean_dice"]
    assert curve_axis_title(curve_columns(segmentation)) == "loss / Dice"
    history = [
        {"epoch": 1, "loss": 0.7, "train_auc": 0.6, "val_auc": 0.55, "val_balanced_accuracy": 0.5, "seconds": 2},
        {"epoch": 2, "loss": 0.6, "train_auc": 0.7, "val_auc": None, "val_balanced_accuracy": 0.6, "seconds": 2},
    ]
    classifier = training_from_stats({"epoch": 2, "history": history}).history
    assert curve_columns(classifier) == ["loss", "train_auc", "val_auc", "val_balanced_accuracy"]
    assert [e["val_auc"] for e in classifier] == [0.55, None] and "seconds" not in classifier[0]
    assert curve_axis_title(curve_columns(classifier)) == "loss / ROC AUC, balanced accuracy"
    assert curve_columns([{"epoch": 1, "loss": 0.5}]) == ["loss"] and curve_axis_title(["loss"]) == "loss"
    # a validation set of one class has no AUC: the column stays, as a gap, so the chart is not rebuilt later
    assert curve_columns([{"epoch": 1, "loss": 0.5, "train_auc": 0.6}]) == curve_columns(classifier)


def test_a_run_that_only_its_time_budget_ends_reports_its_progress_in_time():
    stats = {"epoch": 171, "total_epochs": 10000, "loss": 0.4, "max_minutes": 10, "until_budget": True}
    progress = training_from_stats({**stats, "elapsed_seconds": 450.0})
    progress.state = "running"
    assert progress.fraction == pytest.approx(0.75)
    assert progress.summary() == "Running | epoch 171 | 7.5/10 min | loss 0.4000"
    assert progress.counts() == (450, 600, "s")  # what the panel's and the command line's bars count
    capped = training_from_stats({**stats, "total_epochs": 300, "until_budget": False, "elapsed_seconds": 60.0})
    assert capped.fraction == pytest.approx(171 / 300) and capped.position() == ["epoch 171/300", "1.0/10 min"]
    plain = training_from_stats({"epoch": 2, "total_epochs": 5})
    assert plain.position() == ["epoch 2/5"] and plain.fraction == pytest.approx(0.4)
    assert plain.counts() == (2, 5, "epoch") and capped.counts() == (171, 300, "epoch")


def test_the_panel_s_training_fields_make_the_request():
    assert train_params() == {} and train_params(0, 0.0) == {}
    assert train_params(30) == {"max_epochs": 30}
    assert train_params(0, 10) == {"max_minutes": 10.0}
    assert train_params(200, 2.5) == {"max_epochs": 200, "max_minutes": 2.5}


def test_the_queue_reads_as_a_table_with_what_it_is_and_any_fallback():
    answer = {
        "strategy": "entropy",
        "current_model_version": "abc123",
        "unlabeled": 9,
        "available": 8,
        "items": [
            {"rank": 1, "id": "case_3", "score": 0.123456, "score_name": "entropy", "model_version": "abc123"},
            {"rank": 2, "id": "case_7", "score": None, "score_name": None, "model_version": None},
        ],
        "leased": [{"id": "case_1", "lease": {"client_id": "ann", "expires_in": 1500.0}, "scores": {}}],
    }
    rows, line = queue_table(answer)
    assert QUEUE_HEADERS == ["#", "image", "score", "model", "lease"]
    assert rows == [
        ["1", "case_3", "entropy 0.1235", "abc123", ""],
        ["2", "case_7", "-", "-", ""],
        ["leased", "case_1", "-", "-", "ann, 25 min left"],
    ]
    assert line == "entropy queue, model abc123: 8 of 9 unlabeled images available"
    _, fallback = queue_table(
        {**answer, "current_model_version": None, "fallback": "random", "reason": "no trained model yet"}
    )
    assert fallback == (
        "entropy queue, model none yet: 8 of 9 unlabeled images available; falls back to random: no trained model yet"
    )


def test_a_sample_says_why_it_was_handed_out():
    scored = {
        "score": 0.1139152,
        "score_name": "entropy",
        "model_version": "3effc69f7cc2",
        "lease": {"strategy": "entropy"},
    }
    assert Sample("case_5", "/x", scored).describe() == "case_5 (entropy 0.1139, model 3effc69f7cc2)"
    fallback = {"fallback": "random", "reason": "no trained model yet", "lease": {"strategy": "bald"}}
    assert Sample("case_5", "/x", fallback).describe() == "case_5 (bald fell back to random: no trained model yet)"
    assert Sample("case_5", "/x", {"score": None, "lease": {"strategy": "random"}}).describe() == "case_5"
    assert Sample("case_5", "/x").describe() == "case_5"


def test_describe_error_is_written_for_people():
    assert "not reachable" in describe_error(ServerUnreachable("http://h:1", "connection refused"))
    assert describe_error(ServerError(409, "model 'segmentation' has not been trained yet")).startswith(
        "The server cannot do this now"
    )
    assert "HTTP 503" in describe_error(ServerError(503, "overloaded"))
    assert describe_error(ValueError("x")) == "ValueError: x"


# ------------------------------------------------------------------------------------------------ jobs


def run_until_finished(runner: JobRunner, timeout: float = 10.0) -> list:
    deadline = time.time() + timeout
    done = []
    while time.time() < deadline:
        done += runner.poll()
        if not runner.is_running() and not runner.jobs():
            return done
        time.sleep(0.01)
    raise AssertionError("jobs did not finish")


def test_job_result_and_progress_arrive_on_the_polling_thread():
    runner = JobRunner()
    events = []
    worker_threads = []

    def work(ctx):
        worker_threads.append(threading.current_thread())
        for i in range(3):
            ctx.progress(f"step {i}", (i + 1) / 3)
        return 42

    job = runner.submit(
        "work",
        work,
        on_done=lambda r: events.append(("done", r, threading.current_thread())),
        on_progress=lambda m: events.append(("progress", m.text, threading.current_thread())),
    )
    finished = run_until_finished(runner)
    assert finished == [job] and job.state == JobState.DONE and job.result == 42
    assert worker_threads[0] is not threading.main_thread()
    assert [e[1] for e in events] == ["step 0", "step 1", "step 2", 42]
    assert all(e[2] is threading.main_thread() for e in events)


def test_job_failure_is_reported_with_the_exception():
    runner = JobRunner()
    errors = []
    done = []

    def boom(ctx):
        raise ServerError(422, "label geometry does not match")

    job = runner.submit("boom", boom, on_done=done.append, on_failed=errors.append)
    run_until_finished(runner)
    assert job.state == JobState.FAILED and done == []
    assert isinstance(errors[0], ServerError) and errors[0].message == "label geometry does not match"
    assert "ServerError" in job.traceback


def test_cancel_is_cooperative_and_discards_the_result():
    runner = JobRunner()
    started = threading.Event()
    loops = []
    outcome = []

    def long_loop(ctx):
        started.set()
        for i in range(1000):
            ctx.check_cancelled()
            loops.append(i)
            time.sleep(0.01)
        return "finished"

    job = runner.submit("long", long_loop, on_done=outcome.append, on_cancelled=lambda: outcome.append("cancelled"))
    assert started.wait(5)
    time.sleep(0.05)
    assert runner.cancel("long") == 1
    run_until_finished(runner)
    assert job.state == JobState.CANCELLED and outcome == ["cancelled"]
    assert 0 < len(loops) < 1000 and job.result is None


def test_a_job_that_ignores_cancel_still_ends_as_cancelled():
    runner = JobRunner()
    release = threading.Event()
    outcome = []
    job = runner.submit(
        "stubborn",
        lambda ctx: release.wait(5) and "value",
        on_done=outcome.append,
        on_cancelled=lambda: outcome.append("cancelled"),
    )
    job.cancel()
    release.set()
    run_until_finished(runner)
    assert job.state == JobState.CANCELLED and outcome == ["cancelled"] and job.result is None


def test_exclusive_jobs_and_callback_errors():
    runner = JobRunner()
    gate = threading.Event()
    runner.submit("same", lambda ctx: gate.wait(5))
    with pytest.raises(JobBusy):
        runner.submit("same", lambda ctx: None)
    runner.submit("same", lambda ctx: None, exclusive=False)  # allowed when asked for
    gate.set()
    delivered = []

    def bad_callback(result):
        raise RuntimeError("callback bug")

    runner.submit("a", lambda ctx: 1, on_done=bad_callback)
    runner.submit("b", lambda ctx: 2, on_done=delivered.append)
    assert runner.wait_all(5)
    with pytest.raises(RuntimeError, match="callback bug"):
        runner.poll()
    assert delivered == [2]  # the other job's result was still delivered
    assert runner.poll() == [] and runner.jobs() == []


def test_real_network_error_inside_a_job_is_reported():
    runner = JobRunner()
    errors = []
    c = LabelLoopClient(f"127.0.0.1:{closed_port()}", retries=1)
    runner.submit("info", lambda ctx: c.info(), on_failed=errors.append)
    run_until_finished(runner)
    assert isinstance(errors[0], ServerUnreachable)
    assert isinstance(errors[0].__cause__, requests.ConnectionError)
