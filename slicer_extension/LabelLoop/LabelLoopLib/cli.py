"""The ``labelloop`` command line: drive a LabelLoop server from a terminal or a script.

It talks to the server only through :class:`LabelLoopLib.client.LabelLoopClient` (the client the Slicer module
uses) and reuses the Slicer-free workflow for submitting and training, so a terminal and Slicer behave alike.

The server is ``--server URL``, else the ``LABELLOOP_SERVER`` environment variable, else http://127.0.0.1:8000.
Leases name the annotator ``--client-id``, else ``LABELLOOP_CLIENT_ID``, else ``user@host`` (as the Slicer panel).

Exit codes:
  0  success
  1  the server refused a request or answered with an error, a task failed or was stopped, or the
     command could not finish (e.g. stored label maps that cannot be compared, a missing Python package)
  2  usage error: bad arguments, a local file that does not exist, or a label file that is not one
  3  the server is not reachable
  4  finished, but some images failed (batch inference, evaluate)
  130  interrupted (Ctrl-C); a batch or training already started keeps running on the server
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

from LabelLoopLib.client import EXPLAIN_METHODS, LabelLoopClient, LabelLoopError, ServerError, ServerUnreachable

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_PARTIAL = 4
EXIT_INTERRUPTED = 130

DEFAULT_SERVER = "http://127.0.0.1:8000"
SELECTIONS = ("all", "unlabeled", "labeled")
RUNNING = ("SUBMITTED", "RUNNING", "QUEUED")


class UsageError(Exception):
    """Bad arguments or a missing local file (exit code 2)."""


class CommandFailed(Exception):
    """The command ran but its result is a failure; ``code`` is the exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------------- helpers


def _out(text: str = "") -> None:
    print(text, flush=True)


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _progress(args: argparse.Namespace, **kw: Any):
    """A tqdm bar on stderr (``--quiet`` hides it)."""
    from tqdm import tqdm

    return tqdm(file=sys.stderr, disable=args.quiet, dynamic_ncols=True, **kw)


def _params(items: Optional[Sequence[str]]) -> Dict[str, Any]:
    """``KEY=VALUE`` pairs; values are read as JSON when they parse (numbers, true/false, lists), else text."""
    out: Dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def _existing_file(path: str) -> str:
    if not os.path.isfile(path):
        raise UsageError(f"no such file: {path}")
    return path


@contextlib.contextmanager
def _session(client: LabelLoopClient) -> Iterator[Any]:
    """A connected annotation session (the Slicer panel's workflow) whose downloads go to a folder removed after."""
    from LabelLoopLib.workflow import AnnotationSession

    cache = tempfile.mkdtemp(prefix="labelloop-")
    try:
        session = AnnotationSession(client, cache_dir=cache)
        session.connect()
        yield session
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _objects(client: LabelLoopClient) -> Dict[str, Any]:
    """Every datastore object ``{image id: {"image": ..., "labels": {tag: ...}}}``."""
    data = client.datastore("all")
    return dict((data or {}).get("objects") or {}) if isinstance(data, dict) else {}


def _with_tag(objects: Dict[str, Any], tag: str, images: Optional[Sequence[str]] = None) -> List[str]:
    ids = [i for i, o in sorted(objects.items()) if tag in ((o or {}).get("labels") or {})]
    if images:
        unknown = [i for i in images if i not in objects]
        if unknown:
            raise CommandFailed(f"unknown image id(s): {', '.join(unknown)}")
        ids = [i for i in images if i in ids]
    return ids


def _fmt_float(value: Any, digits: int = 3) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if v != v else f"{v:.{digits}f}"


# ------------------------------------------------------------------------------------------------- status


def cmd_status(client: LabelLoopClient, args: argparse.Namespace) -> int:
    from LabelLoopLib.workflow import ServerInfo, training_from_stats

    info = client.info()
    train_task = client.train_status()
    batch = client.batch_infer_status()
    if args.json:
        _out(json.dumps({"server": client.server_url, "info": info, "train": train_task, "batch": batch}, indent=2))
        return EXIT_OK
    server = ServerInfo.from_info(info)
    _out(f"Server      {client.server_url}  ({server.name} {server.version})")
    _out(f"Structures  {', '.join(f'{n}={v}' for n, v in server.labels.items()) or 'none'}")
    for name, m in server.models.items():
        state = {True: "trained", False: "not trained yet", None: "ready"}[m.trained]
        version = f", version {m.model_version}" if m.model_version else ""
        conf = ", ".join(str(m.config[k]) for k in ("network", "modality") if m.config.get(k))
        _out(f"Model       {name} ({m.type}{', ' + conf if conf else ''}): {state}{version}")
    _out(f"Strategies  {', '.join(server.strategies) or 'none'}")
    ds = server.datastore
    tags = ", ".join(f"{t} {n}" for t, n in sorted(ds.label_tags.items()))
    _out(f"Datastore   {ds.completed}/{ds.total} images labeled (final)" + (f"; labels by tag: {tags}" if tags else ""))
    task = train_task if isinstance(train_task, dict) else {}
    task_model = (task.get("request") or {}).get("model")  # the latest training task may be another model's
    for name in server.trainers:
        progress = training_from_stats(server.train_stats.get(name, {}), list(server.labels))
        status = str(task.get("status", "")) if task_model in (None, name) else ""
        if not progress.total_epochs and not status:
            _out(f"Training    {name}: no training yet")
            continue
        parts = [f"{name}: {status.lower() or 'last run'}", *progress.position()]
        if progress.loss is not None:
            parts.append(f"loss {progress.loss:.4f}")
        parts += progress.scores()
        _out("Training    " + " | ".join(parts))
        if progress.dice:
            _out("            Dice: " + ", ".join(f"{k} {_fmt_float(v)}" for k, v in progress.dice.items()))
    if isinstance(batch, dict):
        _out("Batch       " + _batch_line(batch))
    return EXIT_OK


# ------------------------------------------------------------------------------------------------- batch


def _batch_line(job: Dict[str, Any]) -> str:
    status = str(job.get("status", "?"))
    done, total = job.get("done", 0), job.get("total", 0)
    failed = job.get("failed") or []
    text = f"{status}: {done}/{total} images, {len(failed)} failed, model {job.get('model', '?')!r}"
    text += f" on {job.get('device', '?')}, {_fmt_float(job.get('elapsed_s'), 1)} s"
    if status in RUNNING and job.get("current"):
        text += f", now {job['current']}"
    return text


def batch_rows(job: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """One CSV row per image of a batch record: ``image``, ``ok``, ``stored`` (a label map under ``original``),
    ``model_version``, ``seconds`` and ``error``; for a classification model also ``class`` and ``p_<class>``."""
    rows = []
    for r in job.get("results") or []:
        row: Dict[str, Any] = {
            "image": r.get("image"),
            "ok": bool(r.get("ok")),
            "stored": bool(r.get("stored")),
            "model_version": r.get("model_version", ""),
            "seconds": r.get("seconds", ""),
            "error": r.get("error", ""),
        }
        result = r.get("result") or {}
        if "class" in result:
            row["class"] = result["class"]
            row.update({f"p_{name}": p for name, p in (result.get("probabilities") or {}).items()})
        rows.append(row)
    return rows


def write_batch_csv(job: Mapping[str, Any], path: str) -> str:
    rows = batch_rows(job)
    fields = list(dict.fromkeys(key for row in rows for key in row)) or ["image", "ok", "error"]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _print_batch_result(job: Dict[str, Any], out: Optional[str] = None) -> int:
    status = str(job.get("status", ""))
    failed = job.get("failed") or []
    ok = int(job.get("succeeded", 0))
    rate = job.get("images_per_minute") or 0
    results = [r for r in job.get("results") or [] if r.get("ok")]
    kept = sum(1 for r in results if not r.get("stored", True))  # classification answers, kept in the record
    where = "classified" if results and kept == len(results) else f"stored as {job.get('label_tag', 'original')!r}"
    _out(
        f"{status}: {ok}/{job.get('total', 0)} images {where} "
        f"in {_fmt_float(job.get('elapsed_s'), 1)} s ({_fmt_float(rate, 1)} images/min), {len(failed)} failed"
    )
    if out:
        _out(f"per-image results: {write_batch_csv(job, out)}")
    for f in failed:
        _out(f"  failed {f.get('image')}: {f.get('error')}")
    if status == "DONE":
        return EXIT_PARTIAL if failed else EXIT_OK
    raise CommandFailed(f"batch inference {status.lower()}" + (f": {job.get('error')}" if job.get("error") else ""))


def _selection(values: Sequence[str]) -> Any:
    if len(values) == 1 and values[0].lower() in SELECTIONS:
        return values[0].lower()
    mixed = [v for v in values if v.lower() in SELECTIONS]
    if mixed:
        raise UsageError(f"--images takes either one of {', '.join(SELECTIONS)} or image ids, not both")
    return list(dict.fromkeys(values))


def cmd_batch_infer(client: LabelLoopClient, args: argparse.Namespace) -> int:
    if args.out and not args.wait:
        raise UsageError("--out writes the results at the end: give --wait too")
    selection = _selection(args.images)
    params = _params(args.param)
    if args.device:
        params["device"] = args.device
    if isinstance(selection, list):
        params["images"] = selection
        query = "all"
    else:
        query = selection
    job = client.batch_infer(args.model, images=query, params=params)
    total = int(job.get("total", 0))
    _out(f"batch {str(job.get('id', ''))[:8]}: {total} image(s) with model {args.model!r} on {job.get('device')}")
    if not args.wait:
        _out("follow it with: labelloop batch-status   (stop it with: labelloop batch-stop)")
        return EXIT_OK
    return _wait_batch(client, args, str(job.get("id", "")), total)


def _wait_batch(client: LabelLoopClient, args: argparse.Namespace, job_id: str, total: int) -> int:
    bar = _progress(args, total=total, unit="image", desc="batch")
    try:
        while True:
            job = client.batch_infer_status()
            if not isinstance(job, dict) or (job_id and job.get("id") != job_id):
                raise CommandFailed("the batch disappeared from the server (was it restarted?)")
            bar.n = int(job.get("done", 0))
            bar.set_postfix_str(f"failed {len(job.get('failed') or [])}, now {job.get('current') or '-'}")
            bar.refresh()
            if job.get("status") not in RUNNING:
                break
            time.sleep(args.poll)
    except KeyboardInterrupt:
        bar.close()
        _err("stopped waiting; the batch keeps running on the server (labelloop batch-status / batch-stop)")
        raise
    bar.close()
    return _print_batch_result(job, args.out)


def cmd_batch_status(client: LabelLoopClient, args: argparse.Namespace) -> int:
    job = client.batch_infer_status()
    if not isinstance(job, dict):
        _out("no batch inference has run since the server started")
        return EXIT_OK
    if args.json:
        _out(json.dumps(job, indent=2))
        return EXIT_OK
    _out(_batch_line(job))
    for f in job.get("failed") or []:
        _out(f"  failed {f.get('image')}: {f.get('error')}")
    return EXIT_OK


def cmd_batch_stop(client: LabelLoopClient, args: argparse.Namespace) -> int:
    job = client.batch_infer_stop()
    if not isinstance(job, dict):
        _out("no batch inference is running")
        return EXIT_OK
    _out(f"{job.get('status')}: {job.get('done', 0)}/{job.get('total', 0)} images were done when it stopped")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------- annotation


def _download_into(client: LabelLoopClient, image_id: str, folder: Optional[str]) -> None:
    """``--download DIR``: fetch the image into ``folder`` (when given) and print the file's path."""
    if folder:
        os.makedirs(folder, exist_ok=True)
        _out(client.download_image(image_id, os.path.join(folder, "")))


def cmd_next(client: LabelLoopClient, args: argparse.Namespace) -> int:
    from LabelLoopLib.workflow import fallback_note

    answer = client.next_sample(args.strategy)
    image_id = answer.get("id") if isinstance(answer, dict) else None
    if not image_id:
        _err("no image is left to label")
        return EXIT_OK
    _out(str(image_id))
    note = fallback_note(answer, args.strategy)
    if note:
        _err(note)
    _download_into(client, str(image_id), args.download)
    return EXIT_OK


def cmd_take(client: LabelLoopClient, args: argparse.Namespace) -> int:
    answer = client.take_image(args.image_id, args.strategy)
    lease = answer.get("lease") or {}
    _out(str(answer.get("id", args.image_id)))
    _err(f"leased to {lease.get('client_id', client.client_id)} for {_fmt_float(lease.get('expires_in'), 0)} s")
    _download_into(client, args.image_id, args.download)
    return EXIT_OK


def cmd_release(client: LabelLoopClient, args: argparse.Namespace) -> int:
    client.release_image(args.image_id)
    _out(f"released {args.image_id}")
    return EXIT_OK


def cmd_queue(client: LabelLoopClient, args: argparse.Namespace) -> int:
    from LabelLoopLib.workflow import QUEUE_HEADERS, queue_table

    if args.k < 1:
        raise UsageError("-k must be at least 1")
    rows, line = queue_table(client.queue(args.strategy, args.k))
    _out(line)
    table = [QUEUE_HEADERS, *rows]
    widths = [max(len(r[c]) for r in table) for c in range(len(QUEUE_HEADERS))]
    for r in table:
        _out("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return EXIT_OK


def cmd_upload(client: LabelLoopClient, args: argparse.Namespace) -> int:
    if args.id and len(args.files) > 1:
        raise UsageError("--id names one image: upload one file at a time with it")
    for path in args.files:
        _existing_file(path)
    for path in args.files:
        image_id = client.upload_image(path, image_id=args.id)
        _out(f"{image_id}\t{path}")
    return EXIT_OK


def cmd_submit(client: LabelLoopClient, args: argparse.Namespace) -> int:
    _existing_file(args.label_file)
    with _session(client) as session:
        result = session.submit(
            args.label_file,
            image_id=args.image_id,
            drop_unknown=args.drop_unknown,
            allow_empty=args.allow_empty,
            tag=args.tag,
        )
    voxels = ", ".join(f"{n} {v}" for n, v in result.voxels_per_name.items() if v) or "empty"
    _out(f"stored {args.tag!r} label for {result.image_id}: {voxels} voxels")
    if result.dropped_names:
        _out(f"dropped segments the server does not know: {', '.join(result.dropped_names)}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------- classification


def _finding(text: str) -> Dict[str, Any]:
    """``X,Y,Z,R``: a finding's centre in LPS millimetres and its radius in millimetres."""
    try:
        x, y, z, r = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--finding {text!r}: expected X,Y,Z,RADIUS in millimetres (LPS)") from None
    return {"centre_lps": [x, y, z], "radius_mm": r}


def cmd_classify(client: LabelLoopClient, args: argparse.Namespace) -> int:
    from LabelLoopLib.workflow import safe_file_stem

    if (args.out or args.explain_class) and not args.explain:
        raise UsageError("--out and --explain-class go with --explain")
    out = args.out or (f"{safe_file_stem(args.image_id)}_{args.explain}.nii.gz" if args.explain else None)
    if out and not out.endswith((".nii.gz", ".nii")):
        raise UsageError(f"--out {out!r}: the map is a NIfTI file, name it .nii.gz")
    with _session(client) as session:
        result = session.classify(
            args.image_id,
            model=args.model,
            explain=args.explain,
            explain_class=args.explain_class,
            out_path=os.path.abspath(out) if out else None,
        )
    ranked = sorted(result.probabilities.items(), key=lambda kv: -kv[1])
    version = result.raw.get("model_version")
    _out(
        f"{args.image_id}: {result.predicted} ("
        + ", ".join(f"{name} {p:.3f}" for name, p in ranked)
        + ")"
        + (f", model {version}" if version else "")
    )
    if result.explanation_path:
        about = result.raw.get("explanation") or {}
        _out(f"{about.get('method', args.explain)} map of class {about.get('class', '?')}: {result.explanation_path}")
    return EXIT_OK


def cmd_submit_class(client: LabelLoopClient, args: argparse.Namespace) -> int:
    findings = [_finding(f) for f in args.finding] if args.finding else None
    with _session(client) as session:
        session.submit_class(args.class_name, args.image_id, model=args.model, findings=findings)
    where = f" with {len(findings)} finding(s)" if findings else ""
    _out(f"stored class {args.class_name!r} for {args.image_id}{where}")
    return EXIT_OK


def cmd_classes(client: LabelLoopClient, args: argparse.Namespace) -> int:
    data = client.class_labels()
    counts = data.get("counts") or {}
    findings = data.get("findings") or {}
    _out("classes: " + ", ".join(f"{name} {counts.get(name, 0)}" for name in data.get("classes") or counts))
    for image_id, name in sorted((data.get("labels") or {}).items()):
        marks = findings.get(image_id)
        _out(f"{image_id}\t{name}" + (f"\t{marks} finding(s)" if marks else ""))
    return EXIT_OK


# ------------------------------------------------------------------------------------------------- training


def cmd_train(client: LabelLoopClient, args: argparse.Namespace) -> int:
    from LabelLoopLib.workflow import AnnotationSession

    params = _params(args.param)
    if args.epochs is not None:
        params["max_epochs"] = args.epochs
    if args.minutes is not None:
        params["max_minutes"] = args.minutes
    session = AnnotationSession(client, cache_dir=tempfile.gettempdir())
    server = session.connect()
    model = args.model or (server.trainers[0] if server.trainers else "")
    if not model:
        raise CommandFailed("the server has no train task")
    task = session.train_start(model, params)
    _out(f"training {model!r} started (task {str(task.get('id', ''))[:8]})")
    if not args.wait:
        _out("follow it with: labelloop status")
        return EXIT_OK
    bar = _progress(args, total=int(params.get("max_epochs") or 0) or None, unit="epoch", desc="train")
    try:
        while True:
            progress = session.poll_training(model)
            done, total, unit = progress.counts()  # seconds when only the time budget ends the run
            if total:
                bar.total = total
            bar.unit, bar.n = unit, done
            post = [f"epoch {progress.epoch}"] if unit == "s" else []
            if progress.loss is not None:
                post.append(f"loss {progress.loss:.4f}")
            post += progress.scores()
            bar.set_postfix_str(", ".join(post))
            bar.refresh()
            if not progress.running:
                break
            time.sleep(args.poll)
    except KeyboardInterrupt:
        bar.close()
        _err("stopped waiting; training keeps running on the server (labelloop status)")
        raise
    bar.close()
    _out(progress.summary())
    if progress.dice:
        _out("Dice: " + ", ".join(f"{k} {_fmt_float(v)}" for k, v in progress.dice.items()))
    if progress.state != "done":
        detail = progress.details[-1] if progress.details else ""
        raise CommandFailed(f"training {progress.state}" + (f": {detail}" if detail else ""))
    return EXIT_OK


# ------------------------------------------------------------------------------------------------- export, evaluate


def cmd_export(client: LabelLoopClient, args: argparse.Namespace) -> int:
    labels = client.label_map()
    ids = _with_tag(_objects(client), args.tag, args.images)
    os.makedirs(args.out, exist_ok=True)
    for image_id in _progress(args, iterable=ids, unit="label", desc="export"):
        client.download_label(image_id, args.tag, os.path.join(args.out, ""))
    with open(os.path.join(args.out, "labels.json"), "w") as f:
        json.dump(labels, f, indent=2)
    _out(f"exported {len(ids)} {args.tag!r} label(s) to {args.out} (name -> value map in labels.json)")
    return EXIT_OK


def cmd_evaluate(client: LabelLoopClient, args: argparse.Namespace) -> int:
    from LabelLoopLib import evaluation

    if args.pred_tag == args.ref_tag:
        raise UsageError("--pred-tag and --ref-tag must differ")
    labels = client.label_map()
    if args.labels:
        unknown = [n for n in args.labels if n not in labels]
        if unknown:
            raise UsageError(f"unknown structure(s) {', '.join(unknown)}; the server has: {', '.join(labels)}")
        labels = {n: labels[n] for n in args.labels}
    objects = _objects(client)
    ids = [i for i in _with_tag(objects, args.ref_tag, args.images) if args.pred_tag in objects[i].get("labels", {})]
    if not ids:
        raise CommandFailed(f"no image has both a {args.pred_tag!r} and a {args.ref_tag!r} label")
    scores, problems = [], []
    tmp = tempfile.mkdtemp(prefix="labelloop-evaluate-")
    try:
        for image_id in _progress(args, iterable=ids, unit="image", desc="evaluate"):
            pred = client.download_label(image_id, args.pred_tag, os.path.join(tmp, "pred", ""))
            ref = client.download_label(image_id, args.ref_tag, os.path.join(tmp, "ref", ""))
            try:
                scores.extend(evaluation.score_files(pred, ref, labels, labels, image=image_id))
            except evaluation.EvaluationError as e:
                problems.append(f"{image_id}: {e}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _out(f"{args.pred_tag} vs {args.ref_tag}, structures matched by name: {', '.join(labels)}")
    if scores:
        _out(evaluation.format_summary(scores, worst=args.worst))
    if args.out:
        evaluation.write_csv(scores, args.out)
        _out(f"per-image metrics: {args.out}")
    if args.plot and scores:
        evaluation.box_plot(scores, args.plot, title=f"{args.pred_tag} vs {args.ref_tag}")
        _out(f"box plot: {args.plot}")
    for p in problems:
        _err(f"skipped {p}")
    if problems:
        if not scores:
            raise CommandFailed(f"no image could be evaluated ({len(problems)} skipped)")
        return EXIT_PARTIAL
    return EXIT_OK


# ------------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server",
        default=argparse.SUPPRESS,
        help=f"server address (default: $LABELLOOP_SERVER, else {DEFAULT_SERVER})",
    )
    common.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    common.add_argument("--client-id", default=argparse.SUPPRESS, help="who holds leased images (default: user@host)")

    parser = argparse.ArgumentParser(
        prog="labelloop",
        description="Drive a LabelLoop server: status, batch inference, annotation, training, export, evaluation.",
        epilog="Exit codes:" + __doc__.split("Exit codes:", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--server",
        default=os.environ.get("LABELLOOP_SERVER") or DEFAULT_SERVER,
        help=f"server address (default: $LABELLOOP_SERVER, else {DEFAULT_SERVER}); also accepted after COMMAND",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    parser.add_argument(
        "--client-id",
        default=os.environ.get("LABELLOOP_CLIENT_ID") or None,
        help="who holds the images that 'next' and 'take' lease (default: $LABELLOOP_CLIENT_ID, else user@host); a "
        "client holds one image at a time, so asking again frees the previous one",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, description: str = "") -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help_text, description=description or help_text)

    p = command("status", "server, models, strategies, datastore progress and the last training's metrics")
    p.add_argument("--json", action="store_true", help="print the raw answers as JSON")
    p.set_defaults(func=cmd_status)

    p = command(
        "batch-infer",
        "run a model on many datastore images; results are stored as 'original' labels",
        "Run a model on many datastore images inside the server (the model stays loaded, the next image is read "
        "while the current one is computed). Results are stored as 'original' labels; 'final' labels are never "
        "touched. Exit code 4 when some images failed.",
    )
    p.add_argument("--model", default="segmentation", help="infer task (default: segmentation)")
    p.add_argument(
        "--images",
        nargs="+",
        default=["unlabeled"],
        metavar="SEL",
        help="all | unlabeled (no final label) | labeled | one or more image ids (default: unlabeled)",
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: a GPU when there is one; CPU fallback)")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="extra inference parameter (repeatable)")
    p.add_argument("--wait", action="store_true", help="show a progress bar and wait for the end")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between progress checks (default: 1)")
    p.add_argument(
        "--out",
        metavar="CSV",
        help="with --wait: write one row per image (a classifier's class and probabilities included)",
    )
    p.set_defaults(func=cmd_batch_infer)

    p = command("batch-status", "progress of the latest batch inference (done/total, current image, failures)")
    p.add_argument("--json", action="store_true", help="print the server's full progress record")
    p.set_defaults(func=cmd_batch_status)

    p = command("batch-stop", "cancel the running batch inference (labels already stored are kept)")
    p.set_defaults(func=cmd_batch_stop)

    p = command("next", "print the id of the next image to annotate (empty output when none is left)")
    p.add_argument("--strategy", default="random", help="active learning strategy (default: random)")
    p.add_argument("--download", metavar="DIR", help="also download the image into DIR and print its path")
    p.set_defaults(func=cmd_next)

    p = command(
        "take",
        "lease an image you chose (from the queue) and print its id",
        "Lease the image IMAGE_ID to this client, as 'next' leases the strategy's own pick: refused when the image is "
        "already labeled for the strategy's task or leased to someone else.",
    )
    p.add_argument("image_id", metavar="IMAGE_ID")
    p.add_argument("--strategy", default="random", help="the queue it was chosen from (default: random)")
    p.add_argument("--download", metavar="DIR", help="also download the image into DIR and print its path")
    p.set_defaults(func=cmd_take)

    p = command("release", "give back an image 'next' or 'take' leased to this client, before its lease expires")
    p.add_argument("image_id", metavar="IMAGE_ID")
    p.set_defaults(func=cmd_release)

    p = command(
        "queue",
        "the images a strategy would hand out next, with scores, models and leases",
        "The ranked queue: the next K images the strategy would hand out, in order (nothing is leased), with each "
        "one's score and the model that scored it, then the images leased now and who holds them.",
    )
    p.add_argument("--strategy", default="entropy", help="active learning strategy (default: entropy)")
    p.add_argument("-k", type=int, default=10, help="how many images (default: 10)")
    p.set_defaults(func=cmd_queue)

    p = command("classify", "run the classification model on an image: class, probabilities, model version")
    p.add_argument("image_id", metavar="IMAGE_ID")
    p.add_argument("--model", help="classification model (default: the server's)")
    p.add_argument(
        "--explain",
        choices=EXPLAIN_METHODS,
        help="also write a map of where the model sees the class (on the image's grid, values 0-1)",
    )
    p.add_argument("--explain-class", metavar="CLASS", help="the class to explain (default: the predicted one)")
    p.add_argument("--out", metavar="FILE", help="where the map goes (default: IMAGE_ID_METHOD.nii.gz here)")
    p.set_defaults(func=cmd_classify)

    p = command(
        "submit-class",
        "store an image's class (the 'class' label), optionally with findings",
        "Store an image-level class as the image's 'class' label (a JSON file {\"class\": CLASS}, the same "
        "convention as the server's API and the Slicer panel). An unknown class is refused and nothing is stored.",
    )
    p.add_argument("image_id", metavar="IMAGE_ID")
    p.add_argument("class_name", metavar="CLASS")
    p.add_argument(
        "--finding",
        action="append",
        metavar="X,Y,Z,R",
        help="where the class shows: centre in LPS millimetres and radius in millimetres (repeatable; write "
        "--finding=X,Y,Z,R when X is negative)",
    )
    p.add_argument("--model", help="classification model (default: the server's)")
    p.set_defaults(func=cmd_submit_class)

    p = command("classes", "every image's class label and the count per class")
    p.set_defaults(func=cmd_classes)

    p = command("upload", "add image files to the datastore; prints 'ID<TAB>FILE' per image")
    p.add_argument("files", nargs="+", metavar="FILE", help="NIfTI, NRRD or MHA image")
    p.add_argument("--id", help="image id (one file only; default: the file name without extension)")
    p.set_defaults(func=cmd_upload)

    p = command(
        "submit",
        "store a corrected label for an image (segments matched to the server's structures by name)",
        "Store a corrected label for an image. LABEL_FILE is a .seg.nrrd (segments matched to the server's "
        "structures by name) or a label map already in the server's values.",
    )
    p.add_argument("image_id", metavar="IMAGE_ID")
    p.add_argument("label_file", metavar="LABEL_FILE")
    p.add_argument("--tag", default="final", help="label tag (default: final)")
    p.add_argument("--drop-unknown", action="store_true", help="leave out segments the server does not know")
    p.add_argument("--allow-empty", action="store_true", help="store an empty label map")
    p.set_defaults(func=cmd_submit)

    p = command("train", "start training (fine-tunes the served model; the new one is served when published)")
    p.add_argument("--model", help="train task (default: the server's first)")
    p.add_argument("--epochs", type=int, help="max_epochs")
    p.add_argument(
        "--minutes", type=float, help="time budget (max_minutes); without --epochs the budget alone ends the run"
    )
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="extra training parameter (repeatable)")
    p.add_argument("--wait", action="store_true", help="show a progress bar per epoch and wait for the end")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between progress checks (default: 2)")
    p.set_defaults(func=cmd_train)

    p = command("export", "download every label of a tag into a folder (plus labels.json: name -> value)")
    p.add_argument("--tag", default="final", help="final or original (default: final)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--images", nargs="+", metavar="ID", help="only these images")
    p.set_defaults(func=cmd_export)

    p = command(
        "evaluate",
        "compare two label tags: Dice, HD95 (mm) and volume difference per image and structure",
        "Compare two label tags image by image and structure by structure (matched by name through the server's "
        "name -> value map): Dice, 95th-percentile Hausdorff distance in mm (voxel spacing respected) and volume "
        "difference in mL and %. Prints a summary (mean, median, worst cases); writes a CSV and a box plot.",
    )
    p.add_argument("--pred-tag", default="original", help="tag of the labels to evaluate (default: original)")
    p.add_argument("--ref-tag", default="final", help="tag of the reference labels (default: final)")
    p.add_argument("--out", metavar="CSV", help="write per-image, per-structure metrics to this CSV")
    p.add_argument("--plot", metavar="PNG", help="write box plots of Dice and HD95 per structure")
    p.add_argument("--images", nargs="+", metavar="ID", help="only these images")
    p.add_argument("--labels", nargs="+", metavar="NAME", help="only these structures")
    p.add_argument("--worst", type=int, default=3, help="how many worst cases to list (default: 3)")
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns the exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        client = LabelLoopClient(args.server, client_id=args.client_id)
    except ValueError as e:
        _err(f"labelloop: error: {e}")
        return EXIT_USAGE
    from LabelLoopLib.workflow import describe_error

    try:
        with client:
            return int(args.func(client, args))
    except UsageError as e:
        _err(f"labelloop {args.command}: error: {e}")
        return EXIT_USAGE
    except ServerUnreachable as e:
        _err(f"labelloop: {e}")
        return EXIT_UNREACHABLE
    except CommandFailed as e:
        _err(f"labelloop {args.command}: {e}")
        return e.code
    except (ServerError, LabelLoopError) as e:
        _err(f"labelloop {args.command}: {describe_error(e)}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        _err("labelloop: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the output went to a reader that stopped (| head): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as e:  # expected failures (evaluation, local files, a missing package): no traceback
        from LabelLoopLib.evaluation import EvaluationError
        from LabelLoopLib.segio import SegmentationFileError

        if isinstance(e, SegmentationFileError):  # the label file given is not one
            _err(f"labelloop {args.command}: error: {e}")
            return EXIT_USAGE
        if isinstance(e, EvaluationError):
            _err(f"labelloop {args.command}: {e}")
            return EXIT_ERROR
        if isinstance(e, (OSError, ImportError)):
            _err(f"labelloop {args.command}: {describe_error(e)}")
            return EXIT_ERROR
        raise


if __name__ == "__main__":
    sys.exit(main())
