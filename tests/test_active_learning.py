"""Active learning through a real server: strategies, leases, background scoring, the ranked queue.

The module starts its own server over small phantoms (3 labeled, 8 unlabeled) with short leases and a small
scoring cap, first without a model (the fallback), then with the session's trained model copied in (no training
here), so the session server's datastore is never touched.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from conftest import FAST_CONF, SMALL, datastore_json, run_cli, start_server, stop_server, write_case
from labelloop_app.activelearning.config import FEATURES, ActiveLearningConf
from labelloop_app.activelearning.leases import LeaseBook
from labelloop_app.activelearning.manager import ActiveLearning
from labelloop_app.activelearning.segmentation import BottleneckEmbedding, appearance, layout
from labelloop_app.activelearning.strategies import (
    DiversityStrategy,
    HybridStrategy,
    Pool,
    RarityStrategy,
    centre_distances,
    distance_blocks,
    feature_vectors,
    kcenter_greedy,
    knn_rarity,
)
from labelloop_app.class_labels import ClassLabelCheck
from labelloop_app.conf import ConfError
from labelloop_app.datastore import LabelLoopDatastore
from labelloop_app.model_file import ModelFile
from LabelLoopLib.client import LabelLoopClient, default_client_id
from LabelLoopLib.workflow import Sample, queue_table

pytestmark = pytest.mark.server

N_LABELED, N_UNLABELED = 3, 8
LEASE_SECONDS = 8
SCORING_CAP = 6
UNCERTAINTY = ("entropy", "bald", "tta", "diversity", "hybrid", "rarity")
STRATEGIES = ("random", "first", *UNCERTAINTY)
SCORE_NAMES = {
    "entropy": "entropy",
    "bald": "mutual_information",
    "tta": "tta",
    "diversity": "kcenter_distance",
    "hybrid": "kcenter_distance",
    "rarity": "knn_rarity",
}


@pytest.fixture(scope="module")
def al(tmp_path_factory):
    root = tmp_path_factory.mktemp("active_learning")
    studies = root / "studies"
    for i in range(N_LABELED + N_UNLABELED):
        labeled = i < N_LABELED
        # every 4th case is a hard one (small organs, low contrast, noise), as in the sample data
        write_case(
            studies,
            f"al_{i:03d}",
            seed=500 + i,
            label_dir=studies / "labels" / "final" if labeled else None,
            hard=i % 4 == 3,
            **SMALL,
        )
    conf = {
        **FAST_CONF,
        "lease_seconds": str(LEASE_SECONDS),
        "scoring_max_images": str(SCORING_CAP),
        "mc_samples": "4",
    }
    server = start_server(studies, root / "models", root / "server.log", conf)
    yield server
    stop_server(server)


def sample(server, strategy: str, client_id: str | None = None) -> dict:
    r = server.post(f"/activelearning/{strategy}", json={"client_id": client_id} if client_id else {})
    assert r.status_code == 200, r.text
    return r.json()


def unlabeled_ids(server) -> set:
    return {k for k, v in datastore_json(server.studies)["objects"].items() if "final" not in v["labels"]}


def records(server) -> dict:
    objects = datastore_json(server.studies)["objects"]
    return {
        k: v["image"]["info"]["labelloop_scores"]["segmentation"]
        for k, v in objects.items()
        if "segmentation" in v["image"]["info"].get("labelloop_scores", {})
    }


def release(server, image_id: str, client_id: str) -> None:
    r = server.delete(f"/labelloop/lease?image={image_id}&client_id={client_id}")
    assert r.status_code == 200, r.text


def test_without_a_model_uncertainty_strategies_fall_back_to_random_and_say_so(al):
    info = al.info()
    assert set(STRATEGIES) <= set(info["strategies"])
    assert "segmentation" in info["scoring"]
    stored = info["scoring"]["segmentation"]["scores"]  # what the queue and the strategies can rank or measure by
    assert {"entropy", "tta", "embedding", "appearance", "layout"} <= set(stored)
    unlabeled = unlabeled_ids(al)
    for strategy in UNCERTAINTY:
        answer = sample(al, strategy, client_id="alice")
        assert answer["id"] in unlabeled
        assert answer["fallback"] == "random" and answer["reason"] == "no trained model yet"
        assert answer["model_version"] is None and answer["current_model_version"] is None
        assert answer["lease"]["client_id"] == "alice"
    # what the Slicer panel shows of the server's answer
    assert (
        Sample(answer["id"], "", answer).describe()
        == f"{answer['id']} (rarity fell back to random: no trained model yet)"
    )
    release(al, answer["id"], "alice")
    out = run_cli(al.url, "next", "--strategy", "entropy")  # the command line says so too, beside the id
    assert out.returncode == 0 and out.stdout.strip() in unlabeled, out.stderr
    assert out.stderr.strip() == "entropy fell back to random: no trained model yet"
    assert al.delete(f"/labelloop/lease?image={out.stdout.strip()}").status_code == 200

    queue = al.get("/labelloop/queue?strategy=hybrid&k=3").json()
    assert queue["fallback"] == "random" and queue["reason"] == "no trained model yet"
    assert len(queue["items"]) == 3 and {i["id"] for i in queue["items"]} <= unlabeled

    r = al.post("/scoring/segmentation?run_sync=true")
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert result == {"method": "segmentation", "model_version": None, "scored": 0, "reason": "no trained model yet"}
    assert records(al) == {}


def test_scoring_writes_scores_skips_scored_images_and_inference_stays_responsive(al, trained_server):
    shutil.copy(trained_server.model_dir / "segmentation_unet.pt", al.model_dir / "segmentation_unet.pt")
    version = al.info()["models"]["segmentation"]["model_version"]
    assert len(version) == 12

    def infer_seconds() -> float:
        t0 = time.time()
        r = al.post("/infer/segmentation?image=al_004&output=json")
        assert r.status_code == 200, r.text
        return time.time() - t0

    infer_seconds()  # loads the network
    alone = min(infer_seconds(), infer_seconds())

    task = al.post("/scoring/segmentation").json()
    assert task["status"] in ("SUBMITTED", "RUNNING") and task["method"] == "segmentation"
    deadline = time.time() + 30
    while al.get("/scoring/").json()["status"] != "RUNNING" and time.time() < deadline:
        time.sleep(0.05)
    t0 = time.time()
    during = infer_seconds()
    t1 = t0 + during
    done = al.wait_task("scoring", timeout=120, poll=0.2)

    assert done["status"] == "DONE", done
    assert done["start_time"] < t0 and done["end_time"] > t1, "the inference did not overlap the scoring run"
    result = done["result"]
    assert result["paused_seconds"] > 0, "scoring did not yield to the inference request"
    assert result["model_version"] == version
    assert result["scored"] == SCORING_CAP and result["skipped"] == 0
    assert result["remaining"] == N_LABELED + N_UNLABELED - SCORING_CAP
    assert result["seconds"] > 0 and 0 < result["seconds_per_image"] < result["seconds"]

    stored = records(al)
    assert set(stored) == set(result["per_image"])
    assert set(stored) <= unlabeled_ids(al), "unlabeled images are scored first"
    for image_id, rec in stored.items():
        assert rec["model_version"] == version
        for score in ("entropy", "tta", "mutual_information", "expected_dice_loss", "sample_dice_loss"):
            assert 0.0 <= rec[score] <= 1.0, score
        assert len(rec["embedding"]) == 384 and any(v != 0 for v in rec["embedding"])
        assert len(rec["appearance"]) == 3 * 4  # mean, spread and share of each of the 4 organs
        assert len(rec["layout"]) == 4 * 4  # centre (3 fractions of the body's box) and share of each organ
        assert all(-0.5 <= v <= 1.5 for v in rec["layout"])
        assert rec["seconds"] == result["per_image"][image_id] > 0
        assert rec["spacing"] == [6.0, 6.0, 8.0]  # twice the inference spacing
    assert len({rec["entropy"] for rec in stored.values()}) > 1

    second = al.post("/scoring/segmentation?run_sync=true").json()["result"]
    assert second["scored"] == N_LABELED + N_UNLABELED - SCORING_CAP and second["skipped"] == SCORING_CAP
    after = records(al)
    assert all(after[i]["ts"] == stored[i]["ts"] for i in stored), "already scored images were scored again"
    labeled = set(after) - unlabeled_ids(al)
    assert len(labeled) == N_LABELED and all("entropy" not in after[i] and after[i]["embedding"] for i in labeled)
    assert all(after[i]["appearance"] and after[i]["layout"] for i in labeled)  # centres of the other features

    third = al.post("/scoring/segmentation?run_sync=true").json()["result"]
    assert third["scored"] == 0 and third["skipped"] == N_LABELED + N_UNLABELED
    # last, so that on a machine busy with other work a slow inference fails this test only: the module's other
    # tests need the scores written above
    assert during < max(3.0 * alone, alone + 5.0), f"inference took {during:.1f}s during scoring, {alone:.1f}s alone"


def test_every_strategy_returns_an_unlabeled_image_with_its_score(al):
    version = al.info()["models"]["segmentation"]["model_version"]
    stored = records(al)
    unlabeled = unlabeled_ids(al)
    previous = None
    for strategy in STRATEGIES:
        answer = sample(al, strategy, client_id="bob")
        assert answer["id"] in unlabeled, strategy
        assert "fallback" not in answer, answer
        assert answer["lease"]["client_id"] == "bob" and answer["lease"]["strategy"] == strategy
        if strategy in UNCERTAINTY:
            assert answer["score_name"] == SCORE_NAMES[strategy]
            assert answer["score"] is not None and answer["model_version"] == version
        if strategy in ("entropy", "bald", "tta"):
            # the top score among all unlabeled images except the one bob had (and skipped by asking again)
            key = SCORE_NAMES[strategy]
            best = max(stored[i][key] for i in unlabeled - {previous})
            assert answer["score"] == best == stored[answer["id"]][key]
            described = Sample(answer["id"], "", answer).describe()
            assert described == f"{answer['id']} ({key} {best:.4g}, model {version})"
        assert answer["id"] != previous
        previous = answer["id"]
    release(al, answer["id"], "bob")


def test_two_annotators_asking_at_once_get_different_images(al):
    barrier = threading.Barrier(4)

    def ask(n: int) -> dict:
        barrier.wait()
        return sample(al, "entropy", client_id=f"annotator{n}")

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(4)))
    ids = [a["id"] for a in answers]
    assert len(set(ids)) == 4, ids
    scores = sorted((a["score"] for a in answers), reverse=True)
    stored = records(al)
    assert scores == sorted((stored[i]["entropy"] for i in unlabeled_ids(al)), reverse=True)[:4]
    for n, a in enumerate(answers):
        release(al, a["id"], f"annotator{n}")


def test_diversity_does_not_hand_out_near_duplicates(al):
    """Consecutive diversity picks for different annotators: each is the farthest from labeled and leased ones,
    so the distance to the nearest centre can only shrink as centres are added."""
    picks = [sample(al, "diversity", client_id=f"d{n}") for n in range(3)]
    assert len({p["id"] for p in picks}) == 3
    distances = [p["score"] for p in picks]
    assert distances == sorted(distances, reverse=True) and distances[-1] > 0
    assert [p["centres"] for p in picks] == [N_LABELED, N_LABELED + 1, N_LABELED + 2]
    for n, p in enumerate(picks):
        release(al, p["id"], f"d{n}")


def test_queue_ranks_unlabeled_images_with_scores_versions_and_leases(al):
    version = al.info()["models"]["segmentation"]["model_version"]
    held = sample(al, "entropy", client_id="carol")
    r = al.get("/labelloop/queue?strategy=entropy&k=3")
    assert r.status_code == 200, r.text
    queue = r.json()
    assert queue["current_model_version"] == version and queue["k"] == 3
    assert queue["unlabeled"] == N_UNLABELED and queue["available"] == N_UNLABELED - 1
    assert [item["rank"] for item in queue["items"]] == [1, 2, 3]
    scores = [item["score"] for item in queue["items"]]
    assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
    assert all(item["model_version"] == version and item["lease"] is None for item in queue["items"])
    assert held["id"] not in {item["id"] for item in queue["items"]}
    assert [(x["id"], x["lease"]["client_id"]) for x in queue["leased"]] == [(held["id"], "carol")]
    assert 0 < queue["leased"][0]["lease"]["expires_in"] <= LEASE_SECONDS
    assert "embedding" not in queue["items"][0]["scores"] and "entropy" in queue["items"][0]["scores"]

    r = al.get("/labelloop/queue?strategy=nope")
    assert r.status_code == 404 and "unknown strategy 'nope'" in r.json()["detail"]

    # the same queue for the Slicer panel (the client and queue_table) and on the command line
    rows, line = queue_table(LabelLoopClient(al.url).queue("entropy", 3))
    assert line.startswith(f"entropy queue, model {version}: {N_UNLABELED - 1} of {N_UNLABELED} unlabeled")
    assert [row[:2] for row in rows] == [[str(x["rank"]), x["id"]] for x in queue["items"]] + [["leased", held["id"]]]
    assert rows[0][2] == f"entropy {queue['items'][0]['score']:.4g}" and rows[-1][4].startswith("carol, ")
    out = run_cli(al.url, "queue", "--strategy", "entropy", "-k", "3")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    listed = [ln.split()[:2] for ln in out.stdout.splitlines()[2:]]
    assert listed == [row[:2] for row in rows]
    bad = run_cli(al.url, "queue", "--strategy", "nope")
    assert bad.returncode == 1 and "unknown strategy 'nope'" in bad.stderr
    release(al, held["id"], "carol")


def test_an_annotator_takes_an_image_chosen_from_the_queue_and_nobody_else_gets_it(al, tmp_path):
    queue = al.get("/labelloop/queue?strategy=entropy&k=3").json()
    third = queue["items"][2]
    frank = LabelLoopClient(al.url, client_id="frank")
    answer = frank.take_image(third["id"], "entropy")
    assert answer["id"] == third["id"] and answer["chosen"] is True
    assert answer["lease"]["client_id"] == "frank" and answer["lease"]["strategy"] == "entropy"
    assert answer["scores"]["entropy"] == pytest.approx(third["score"]) and "embedding" not in answer["scores"]
    assert answer["model_version"] == third["model_version"] and answer["available"] == queue["available"] - 1
    after = al.get("/labelloop/queue?strategy=entropy&k=100").json()
    assert third["id"] not in {x["id"] for x in after["items"]}
    assert (third["id"], "frank") in {(x["id"], x["lease"]["client_id"]) for x in after["leased"]}
    assert sample(al, "entropy", client_id="gina")["id"] == queue["items"][0]["id"]  # the queue's top, not frank's
    release(al, queue["items"][0]["id"], "gina")

    # refusals name the problem, and the datastore is unchanged
    before = datastore_json(al.studies)
    labeled = sorted(set(before["objects"]) - unlabeled_ids(al))[0]
    for image, strategy, client, status, words in [
        (third["id"], "entropy", "gina", 409, f"image {third['id']!r} is leased to 'frank' for another"),
        (labeled, "entropy", "gina", 409, f"image {labeled!r} is already labeled for segmentation"),
        ("nope", "entropy", "gina", 404, "unknown image 'nope'"),
        ("../studies", "random", "gina", 404, "unknown image '../studies'"),
        (third["id"], "nope", "gina", 404, "unknown strategy 'nope'"),
    ]:
        r = al.post("/labelloop/lease", params={"image": image, "strategy": strategy, "client_id": client})
        assert r.status_code == status and words in r.json()["detail"], (image, r.text)
    assert datastore_json(al.studies) == before
    assert frank.take_image(third["id"], "entropy")["lease"]["client_id"] == "frank"  # its holder may take it again

    # the Slicer panel's double-click: the Lib leases and downloads it, and says why this image
    from LabelLoopLib.workflow import AnnotationSession

    picked = AnnotationSession(frank, cache_dir=str(tmp_path)).take_sample(third["id"], "entropy")
    assert picked.image_id == third["id"] and (tmp_path / "images").is_dir() and picked.path.startswith(str(tmp_path))
    assert picked.describe() == f"{third['id']} (chosen from the entropy queue)"

    # the command line: `labelloop take`, and the same refusal for an image someone holds
    fourth = [x["id"] for x in after["items"] if x["id"] != queue["items"][0]["id"]][0]
    out = run_cli(al.url, "--client-id", "hank", "take", fourth, "--strategy", "entropy", "--download", str(tmp_path))
    assert out.returncode == 0, out.stderr
    image_id, path = out.stdout.split()
    assert image_id == fourth and path.startswith(str(tmp_path)) and out.stderr.startswith("leased to hank for ")
    held = {x["id"]: x["lease"]["client_id"] for x in al.get("/labelloop/queue?strategy=entropy").json()["leased"]}
    assert held[fourth] == "hank" and held[third["id"]] == "frank"
    refused = run_cli(al.url, "take", third["id"])
    assert refused.returncode == 1 and f"image {third['id']!r} is leased to 'frank'" in refused.stderr
    # asking a strategy for the next image frees the chosen one: a client holds one image at a time
    assert frank.next_sample("first")["lease"]["client_id"] == "frank"
    held = {x["id"]: x["lease"]["client_id"] for x in al.get("/labelloop/queue?strategy=entropy").json()["leased"]}
    assert third["id"] not in held and list(held.values()).count("frank") == 1
    for image_id, client in held.items():
        release(al, image_id, client)


def test_the_panel_and_command_line_hold_one_image_each_so_skipping_frees_the_last_one(al):
    client = LabelLoopClient(al.url)
    assert client.client_id == default_client_id() and "@" in client.client_id
    first = client.next_sample("first")
    second = client.next_sample("first")  # skipped: another image, and the first is free again for anyone
    assert second["id"] != first["id"] and second["lease"]["client_id"] == client.client_id
    assert sample(al, "first", client_id="ivy")["id"] == first["id"]
    release(al, first["id"], "ivy")
    out = run_cli(al.url, "next", "--strategy", "first")  # the command line is the same annotator
    assert out.returncode == 0 and out.stdout.strip() == first["id"], out.stderr
    leased = al.get("/labelloop/queue?strategy=first").json()["leased"]
    assert [(x["id"], x["lease"]["client_id"]) for x in leased] == [(first["id"], client.client_id)]
    out = run_cli(al.url, "release", first["id"])  # given back before the lease expires
    assert out.returncode == 0 and out.stdout.strip() == f"released {first['id']}", out.stderr
    assert al.get("/labelloop/queue?strategy=first").json()["leased"] == []
    again = run_cli(al.url, "release", first["id"])
    assert again.returncode == 1 and f"no active lease on image {first['id']!r} held by" in again.stderr


def test_a_final_label_releases_the_lease_and_the_image_is_never_handed_out_again(al, tmp_path):
    answer = sample(al, "first", client_id="dave")
    image_id = answer["id"]
    n = int(image_id[-3:])
    write_case(tmp_path, image_id, seed=500 + n, label_dir=tmp_path / "labels", hard=n % 4 == 3, **SMALL)
    label = tmp_path / "labels" / f"{image_id}.nii.gz"
    with open(label, "rb") as f:
        r = al.put(f"/datastore/label?image={image_id}&tag=final", files={"label": (label.name, f)})
    assert r.status_code == 200, r.text
    queue = al.get("/labelloop/queue?strategy=random&k=100").json()
    assert image_id not in {x["id"] for x in queue["leased"]} and image_id not in {x["id"] for x in queue["items"]}
    assert al.delete(f"/labelloop/lease?image={image_id}").status_code == 404
    for _ in range(2):
        for strategy in STRATEGIES:
            got = sample(al, strategy, client_id="erin")
            assert got["id"] != image_id and "final" not in datastore_json(al.studies)["objects"][got["id"]]["labels"]
    release(al, got["id"], "erin")


def test_an_expired_lease_makes_the_image_available_again(al):
    handed = []
    while True:
        answer = sample(al, "first", client_id=f"lease{len(handed)}")
        if not answer:
            break
        handed.append(answer["id"])
        assert len(handed) <= N_UNLABELED
    assert len(handed) == len(unlabeled_ids(al)) and len(set(handed)) == len(handed)
    assert sample(al, "entropy", client_id="late") == {}  # everything is leased
    time.sleep(LEASE_SECONDS + 0.5)
    again = sample(al, "first", client_id="late")
    assert again["id"] == sorted(handed)[0]
    assert al.get("/labelloop/queue?strategy=first&k=1").json()["leased"][0]["id"] == again["id"]


def test_training_triggers_background_scoring_with_the_new_model(al):
    old = al.info()["models"]["segmentation"]["model_version"]
    time.sleep(1.1)  # a new modification time for the published model
    al.train({"max_epochs": 1})
    new = al.info()["models"]["segmentation"]["model_version"]
    assert new != old
    deadline, done = time.time() + 120, []
    while not done and time.time() < deadline:
        tasks = al.get("/scoring/?all=true").json()
        done = [t for t in tasks if t["status"] == "DONE" and (t["result"] or {}).get("model_version") == new]
        time.sleep(0.5)
    assert done, f"no scoring run with model {new} after training\n{al.log_tail()}"
    assert done[0]["trigger"] == "request"  # asked for by the training process when it ended
    assert done[0]["result"]["scored"] == SCORING_CAP and done[0]["result"]["skipped"] == 0
    assert sum(r["model_version"] == new for r in records(al).values()) >= SCORING_CAP


def test_classification_strategies_rank_stored_class_uncertainty(tmp_path):
    """The cls_* strategies use the same records and leases: the stored classification uncertainty of each image
    (as the classification task reports it) decides the order. An image with a class label is never offered; a
    segmentation label does not count as labeled for classification."""
    studies = tmp_path / "studies"
    for i in range(4):
        write_case(
            studies, f"cls_{i}", seed=700 + i, label_dir=studies / "labels" / "final" if i == 1 else None, **SMALL
        )
    ds = LabelLoopDatastore(str(studies), extensions=["*.nii.gz"], class_check=ClassLabelCheck(["normal", "lesion"]))
    class_file = tmp_path / "cls_0.json"
    class_file.write_text(json.dumps({"class": "lesion"}))
    ds.save_label("cls_0", str(class_file), "class", {})
    model = tmp_path / "classification.pt"
    model.write_bytes(b"weights")
    version = ModelFile(str(model)).version()
    stored = {
        "cls_0": {"entropy": 0.99, "margin": 0.99, "least_confidence": 0.99, "finding": 0.99},  # has a class
        "cls_1": {"entropy": 0.20, "margin": 0.90, "least_confidence": 0.10, "finding": 0.95},
        "cls_2": {"entropy": 0.80, "margin": 0.30, "least_confidence": 0.50, "finding": 0.10},
        "cls_3": {"entropy": 0.50, "margin": 0.60, "least_confidence": 0.70, "finding": 0.30},
    }
    for image_id, scores in stored.items():
        ds.update_image_info(image_id, {"labelloop_scores": {"classification": {**scores, "model_version": version}}})
    manager = ActiveLearning(
        ActiveLearningConf(), ["segmentation", "classification"], None, None, lambda: {}, lambda: ds
    )
    manager._model_files["classification"] = ModelFile(str(model))
    strategies = manager.strategies()
    assert {"cls_entropy", "cls_margin", "cls_least_confidence", "cls_finding"} <= set(strategies)
    best = {"cls_entropy": "cls_2", "cls_margin": "cls_1", "cls_least_confidence": "cls_3", "cls_finding": "cls_1"}
    for name, expected in best.items():
        answer = strategies[name]({"strategy": name, "client_id": "x"}, ds)
        assert answer["id"] == expected and answer["model_version"] == version == answer["current_model_version"]
        assert answer["score"] == stored[expected][name[4:]] and answer["score_name"] == name[4:]
    # x holds one image at a time; y, z and w share the rest and nobody gets the one with a class
    others = [strategies["cls_entropy"]({"client_id": c}, ds) for c in "yzw"]
    assert sorted(a["id"] for a in others if a) == sorted({"cls_1", "cls_2", "cls_3"} - {answer["id"]})
    assert others[-1] is None
    # a class label for an image ends its lease; a segmentation label for it would not
    held = others[0]["id"]
    (tmp_path / f"{held}.json").write_text(json.dumps({"class": "normal"}))
    ds.save_label(held, str(tmp_path / f"{held}.json"), "class", {})
    assert manager.on_label_saved(held, ds).client_id == "y" and held not in manager.leases.active()


def test_leases_are_thread_safe_and_expire():
    now = [1000.0]
    book = LeaseBook(10, clock=lambda: now[0])
    images = [f"img{i}" for i in range(50)]
    got: list = []

    def take(client: str) -> None:
        with book.lock:
            free = [i for i in images if i not in book.active()]
            book.take(free[0], client, "first")
            got.append(free[0])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(take, [f"c{n}" for n in range(50)]))
    assert sorted(got) == sorted(images)
    assert len(book.active()) == 50
    lease = book.take("img0", "c0", "random")  # c0 held another image: it goes back
    assert len(book.active()) == 50 - 1 + (got[0] == "img0") and lease.state(now[0])["expires_in"] == 10.0
    now[0] += 10.5
    assert book.active() == {}


def test_bottleneck_embedding_averages_over_space_and_windows():
    layer = torch.nn.Conv3d(1, 3, 1)
    image = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    with BottleneckEmbedding(layer) as embedding:
        windows = [layer(image[..., :4]), layer(image[..., 4:])]  # two sliding windows
    layer(image * 100)  # after the block: no longer recorded
    mean = torch.stack([w.mean(dim=(0, 2, 3, 4)) for w in windows]).mean(dim=0)
    assert embedding.vector() == pytest.approx(mean.tolist(), rel=1e-3, abs=1e-6)


def test_appearance_is_each_structures_weighted_intensity_spread_and_share():
    image = np.zeros((4, 4, 4), dtype=np.float32)
    image[:2] = 0.8  # organ 1, half of it brighter
    image[0] = 1.0
    image[2:, :2] = 0.3  # organ 2
    probabilities = np.zeros((3, 4, 4, 4), dtype=np.float32)
    probabilities[1, :2] = 1.0
    probabilities[2, 2:, :2] = 0.5  # an unsure organ: weights, not counts
    body = np.ones((4, 4, 4), dtype=bool)
    out = appearance(image, probabilities, body)
    assert out == pytest.approx([0.9, 0.1, 0.5, 0.3, 0.0, 0.125])
    probabilities[2] = 0.0  # an organ the model does not find
    assert appearance(image, probabilities, body)[3:] == [0.0, 0.0, 0.0]
    native = appearance(image * 0.5, np.concatenate([probabilities[:2], probabilities[1:2]]), body)
    assert native[0] == pytest.approx(0.45)  # the same structures, darker: what sets a contrast phase apart


def test_layout_is_each_structures_centre_in_the_bodys_box_and_its_share():
    body = np.zeros((6, 4, 4), dtype=bool)
    body[1:6] = True  # the box spans 4 steps along the first axis, 3 along the others
    probabilities = np.zeros((4, 6, 4, 4), dtype=np.float32)
    probabilities[1, 1:3, :2, :] = 1.0  # organ 1 on the first axis's low side
    probabilities[2, 5, 3, 3] = 0.4
    probabilities[2, 3, 3, 3] = 1.6  # weights, not counts: the centre is nearer the stronger voxel
    out = layout(probabilities, body)
    assert out[:4] == pytest.approx([0.125, 1 / 6, 0.5, 0.2], abs=1e-4)  # stored to 4 decimals
    assert out[4:8] == pytest.approx([0.6, 1.0, 1.0, 0.025])
    assert out[8:] == [0.5, 0.5, 0.5, 0.0]  # an organ the model does not find
    mirrored = layout(probabilities[:, ::-1], body[::-1])
    assert mirrored[0] == pytest.approx(1.0 - out[0])  # the same organs on the other side: what sets situs apart


def test_diversity_features_are_chosen_by_conf_and_named_in_the_description():
    assert ActiveLearningConf.from_conf({}).diversity_features == "bottleneck"
    assert ActiveLearningConf.from_conf({"diversity_features": "Appearance"}).diversity_features == "appearance"
    assert ActiveLearningConf.from_conf({"diversity_features": "layout"}).diversity_features == "layout"
    assert ActiveLearningConf.from_conf({"diversity_features": "appearance_layout"}).diversity_features == (
        "appearance_layout"
    )
    with pytest.raises(
        ConfError, match="diversity_features must be one of bottleneck, appearance, layout, appearance_layout"
    ):
        ActiveLearningConf.from_conf({"diversity_features": "pixels"})
    # the spaces disagree: the bottleneck calls "b" the odd one, the appearance "a", the layout "c"; joined, the
    # appearance and layout see "d", a little odd in both, as the oddest
    records = {
        "l": {"embedding": [0.0, 0.0], "appearance": [0.0, 0.0], "layout": [0.2, 0.8]},
        "a": {"embedding": [0.1, 0.0], "appearance": [9.0, 0.0], "layout": [0.2, 0.8]},
        "b": {"embedding": [9.0, 0.0], "appearance": [0.1, 0.0], "layout": [0.25, 0.8]},
        "c": {"embedding": [0.0, 0.1], "appearance": [0.0, 0.0], "layout": [0.8, 0.8]},  # organs on the other side
        "d": {"embedding": [0.1, 0.1], "appearance": [7.0, 0.0], "layout": [0.7, 0.8]},
    }
    records = {i: {**r, "model_version": "v1"} for i, r in records.items()}
    available = ["a", "b", "c", "d"]
    pool = Pool(available=available, labeled=["l"], leased={}, records=records, model_version="v1")
    book = LeaseBook(60)
    spaces = (("bottleneck", "b"), ("appearance", "a"), ("layout", "c"), ("appearance_layout", "d"))
    assert {f for f, _ in spaces} == set(FEATURES)
    for features, first in spaces:
        strategy = DiversityStrategy(book, lambda *a: pool, features=features)
        assert strategy.order(pool, 1)[0][0].image_id == first
        assert FEATURES[features].words in strategy.description
        hybrid = HybridStrategy(book, lambda *a: pool, fraction=1.0, features=features)
        entropies = {i: {**records[i], "entropy": 0.5} for i in records}
        scored = Pool(available=available, labeled=["l"], leased={}, records=entropies, model_version="v1")
        assert hybrid.order(scored, 1)[0][0].image_id == first
    # a record without one of the joined vectors is left out of the joined space, not compared on half of it
    partial = {**records, "e": {"appearance": [50.0, 0.0], "model_version": "v1"}}
    assert set(feature_vectors(partial, ("appearance", "layout"))) == set(records)
    assert feature_vectors(partial, ("appearance", "layout"))["d"].tolist() == [7.0, 0.0, 0.7, 0.8]


def test_rarity_keeps_handing_out_a_rare_kind_that_core_set_counts_covered_after_one_label():
    """Four scans of a rare kind far from thirty common ones, one of the rare ones labeled: core-set diversity counts
    the kind covered and picks a common scan, rarity picks the rare ones (their k-th nearest unlabeled neighbour is
    a common scan) until fewer than k are left unlabeled."""
    rng = np.random.default_rng(1)
    layout = {f"c{n}": rng.normal(size=2) for n in range(30)}
    layout.update({f"r{n}": np.array([6.0, 0.0]) + rng.normal(scale=0.3, size=2) for n in range(4)})
    records = {i: {"layout": v.tolist(), "model_version": "v1"} for i, v in layout.items()}
    labeled = ["r0", "c0", "c1", "c2"]
    pool = Pool([i for i in layout if i not in labeled], labeled, {}, records, "v1")
    book = LeaseBook(60)
    core_set = DiversityStrategy(book, lambda *a: pool, features="layout")
    assert core_set.order(pool, 1)[0][0].image_id.startswith("c")
    rarity = RarityStrategy(book, lambda *a: pool, features="layout", neighbours=3)
    picks, reason = rarity.order(pool, 1)
    assert reason is None and {p.image_id for p in picks[:3]} == {"r1", "r2", "r3"}
    assert picks[0].score_name == "knn_rarity" and picks[0].details == {"neighbours": 3}
    assert [p.score for p in picks] == sorted((p.score for p in picks), reverse=True)
    assert (
        "k-th nearest unlabeled image (k = 3)" in rarity.description and FEATURES["layout"].words in rarity.description
    )
    # the k-th neighbour of a pool smaller than k is its farthest one; a single image has none
    assert knn_rarity(["c3", "c4", "c5"], layout, 10) == knn_rarity(["c3", "c4", "c5"], layout, 2)
    assert knn_rarity(["c3"], layout, 10) == {"c3": 0.0}
    # no model yet: random order, and the reason
    fresh = Pool([i for i in layout if i not in labeled], labeled, {}, {}, "")
    assert rarity.order(fresh, 1)[1] == "no trained model yet"
    conf = ActiveLearningConf.from_conf({})
    assert (conf.rarity_features, conf.rarity_neighbours) == ("layout", 10)
    conf = ActiveLearningConf.from_conf({"rarity_features": "Appearance", "rarity_neighbours": "5"})
    assert (conf.rarity_features, conf.rarity_neighbours) == ("appearance", 5)
    with pytest.raises(ConfError, match="rarity_features must be one of bottleneck, appearance, layout"):
        ActiveLearningConf.from_conf({"rarity_features": "pixels"})
    with pytest.raises(ConfError, match="rarity_neighbours must be at least 1"):
        ActiveLearningConf.from_conf({"rarity_neighbours": "0"})


def test_distances_come_in_row_blocks_equal_to_the_full_difference_array():
    """Pools of thousands of images: distances are computed a block of rows at a time, never as an (n, m, features)
    array, and agree with it across block boundaries; the k-th neighbour is that of the full sorted distances."""
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(11, 4)), rng.normal(size=(7, 4))
    blocks = list(distance_blocks(a, b, rows=3))
    assert [len(block) for block in blocks] == [3, 3, 3, 2]
    full = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    np.testing.assert_allclose(np.concatenate(blocks), full, atol=1e-9)
    emb = {f"i{n}": v for n, v in enumerate(rng.normal(size=(40, 3)))}
    x = np.stack(list(emb.values()))
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    third = np.sort(np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)), axis=1)[:, 3]
    np.testing.assert_allclose(list(knn_rarity(list(emb), emb, 3).values()), third, atol=1e-9)


def test_centre_distances_are_what_the_first_kcenter_pick_maximises():
    rng = np.random.default_rng(0)
    emb = {f"i{n}": rng.normal(size=5) for n in range(10)}
    emb["odd"] = np.array([0.0, 0.0, 0.0, 0.0, 8.0])
    centres = ["i0", "i1"]
    candidates = [i for i in emb if i not in centres]
    distances = centre_distances(candidates, centres, emb)
    assert set(distances) == set(candidates) and all(d > 0 for d in distances.values())
    (first, distance), *_ = kcenter_greedy(candidates, centres, emb, 3)
    assert first == "odd" == max(distances, key=distances.get)
    assert distance == pytest.approx(distances["odd"], abs=1e-4)
    assert all(np.isinf(d) for d in centre_distances(candidates, [], emb).values())
    assert centre_distances([], centres, emb) == {}
