"""The classification benchmark's AUC helpers, on scores whose AUC is known by construction."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from classification import auc_interval, pair_auc  # noqa: E402


def test_pair_auc_counts_ordered_pairs_and_half_ties_for_lists_and_arrays():
    # pairs (pos, neg): 0.9 beats both, 0.5 beats 0.1 and ties 0.5: (2 + 1 + 0.5) / 4
    assert pair_auc([0.9, 0.5], [0.1, 0.5]) == pytest.approx(0.875)
    assert pair_auc(np.array([0.9, 0.5]), np.array([0.1, 0.5])) == pytest.approx(0.875)
    assert pair_auc([], [0.1]) is None and pair_auc(np.array([]), np.array([0.1])) is None


def test_auc_interval_brackets_the_auc_and_collapses_when_the_classes_separate():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1.0, 1.0, 40), rng.normal(0.0, 1.0, 40)
    lo, hi = auc_interval(list(pos), list(neg))
    assert lo < pair_auc(pos, neg) < hi and hi - lo < 0.4
    assert auc_interval([0.9, 0.8, 0.95], [0.1, 0.2]) == [1.0, 1.0]
    assert auc_interval([], [0.1]) is None


def test_study_summary_counts_labels_to_the_target_on_any_metric_and_relative_to_random():
    from active_learning import labels_to_reach, summarise

    # the target is 0.9 x 0.8 = 0.72: random's mean curve crosses it halfway from 4 to 8 labels, the other's at 4
    rows = {
        "random": {
            0: [
                {"labels": 2, "auc": 0.5, "auc_rare": 0.5},
                {"labels": 4, "auc": 0.6, "auc_rare": 0.5},
                {"labels": 8, "auc": 0.84, "auc_rare": 0.6},
            ]
        },
        "cls_entropy": {
            0: [
                {"labels": 2, "auc": 0.5, "auc_rare": 0.5},
                {"labels": 4, "auc": 0.72, "auc_rare": 0.7},
                {"labels": 8, "auc": 0.8, "auc_rare": 0.8},
            ]
        },
    }
    summary = summarise(rows, [{"auc": 0.8}], 0.9, metric="auc")
    assert summary["target_auc"] == pytest.approx(0.72) and summary["metric"] == "auc"
    random_row, entropy_row = summary["strategies"]["random"], summary["strategies"]["cls_entropy"]
    assert random_row["labels_to_target"] == pytest.approx(6.0)
    assert entropy_row["labels_to_target"] == pytest.approx(4.0)
    assert entropy_row["relative_to_random"] == pytest.approx(4.0 / 6.0)
    assert entropy_row["final_auc_rare"] == pytest.approx(0.8) and random_row["mean_auc"][8] == pytest.approx(0.84)
    assert labels_to_reach({2: 0.1, 4: 0.2}, 0.5) is None
    # random ends at 0.84 with 8 labels; the other's curve never gets there
    assert random_row["labels_to_random_final"] == pytest.approx(8.0) and random_row["relative_at_random_final"] == 1
    assert entropy_row["labels_to_random_final"] is None and entropy_row["relative_at_random_final"] is None


def test_a_strategy_is_measured_against_randoms_final_result_when_random_never_reaches_the_target():
    from active_learning import summarise

    def rows(*dice):
        return [{"labels": 2 * (i + 1), "dice": d, "dice_rare": d} for i, d in enumerate(dice)]

    # target 0.95 x 0.9 = 0.855, which random (0.8 at 6 labels) never reaches; entropy passes 0.8 at 3.5 labels
    summary = summarise(
        {"random": {0: rows(0.5, 0.6, 0.8)}, "entropy": {0: rows(0.5, 0.9, 0.9)}}, [{"dice": 0.9}], 0.95
    )
    random_row, entropy_row = summary["strategies"]["random"], summary["strategies"]["entropy"]
    assert random_row["labels_to_target"] is None and entropy_row["relative_to_random"] is None
    assert entropy_row["labels_to_target"] == pytest.approx(2 + 2 * 0.355 / 0.4)
    assert entropy_row["labels_to_random_final"] == pytest.approx(2 + 2 * 0.3 / 0.4)
    assert entropy_row["relative_at_random_final"] == pytest.approx((2 + 2 * 0.3 / 0.4) / 6.0)


def test_relative_labels_interval_resamples_the_seeds_both_strategies_ran():
    from active_learning import interval_text, relative_interval, summarise

    def curve(at4: float) -> list:
        return [{"labels": n, "dice": d, "dice_rare": d} for n, d in ((2, 0.5), (4, at4), (6, 0.9))]

    # target 0.8: random crosses it at 5 labels in every seed; "fast" at 4 in seeds 0 and 1, "slow" only in seed 0
    rows = {
        "random": {0: curve(0.7), 1: curve(0.7), 2: curve(0.7)},
        "fast": {0: curve(0.8), 1: curve(0.8), 2: curve(0.8)},
        "slow": {
            0: curve(0.8),
            1: [{"labels": n, "dice": d, "dice_rare": d} for n, d in ((2, 0.5), (4, 0.6), (6, 0.7))],
        },
    }
    summary = summarise(rows, [{"dice": 1.0}], 0.8)["strategies"]
    assert summary["random"]["relative_to_random_interval"] is None
    assert summary["fast"]["relative_to_random_interval"] == pytest.approx([0.8, 0.8])
    low, high = relative_interval(rows, "slow", 0.8, "dice")
    # resampled: seed 0 twice reaches 0.8 at 4 labels (4/5), seeds 0 and 1 at 6 (6/5), seed 1 twice never
    assert low == pytest.approx(0.8) and high is None
    assert interval_text([low, high]) == "80%-never" and interval_text(None) == "-"
    assert relative_interval({"random": rows["random"], "one": {0: curve(0.8)}}, "one", 0.8, "dice") is None


def test_binary_uncertainty_measures_rank_images_alike():
    """Why the classification study runs one of them: for two classes each falls as the top probability rises."""
    from labelloop_app.uncertainty import MEASURES

    top = np.random.default_rng(0).permutation(np.linspace(0.5, 0.99, 50))
    for lesion_first in (True, False):
        probs = np.stack([top, 1.0 - top] if lesion_first else [1.0 - top, top])
        for name, fn in MEASURES.items():
            assert np.array_equal(np.argsort(-fn(probs), kind="stable"), np.argsort(top, kind="stable")), name


def test_resume_adds_strategies_or_seeds_to_a_recorded_study_but_refuses_another_study(tmp_path):
    import argparse
    import json

    from active_learning import recorded, resumed, study_arguments

    ap = argparse.ArgumentParser()
    ap.add_argument("--strategies", default="random,cls_entropy")
    study_arguments(ap, steps=300)
    defaults = vars(ap.parse_args([]))
    runs = {"random": {"0": [{"labels": 2, "auc": 0.5}]}, "cls_entropy": {"0": [{"labels": 2, "auc": 0.5}]}}
    path = tmp_path / "study.json"
    config = {k: v for k, v in defaults.items() if k not in ("out", "resume")}
    notes = ["**Target missed**", "", "why"]
    study = {"config": config, "runs": runs, "reference": [{"seed": 0}], "minutes": 30.0, "notes": notes}
    path.write_text(json.dumps(study))

    args = ap.parse_args(["--strategies", "random,cls_finding", "--seeds", "2", "--resume", str(path)])
    results, reference, start = resumed(args, ["random", "cls_finding"], 1000.0)
    assert list(results) == ["random", "cls_entropy", "cls_finding"]  # recorded first, then the new one
    assert results["random"] == {0: runs["random"]["0"]} and results["cls_finding"] == {}
    assert reference == [{"seed": 0}] and start == 1000.0 - 1800.0
    assert recorded(args, "notes") == notes and recorded(ap.parse_args([]), "notes") == []  # written notes carried over
    assert resumed(ap.parse_args([]), ["random"], 5.0) == ({"random": {}}, [], 5.0)
    redo = ap.parse_args(["--redo", "random,cls_entropy", "--resume", str(path)])
    results, reference, _ = resumed(redo, ["random", "cls_finding"], 0.0)
    assert results == {"random": {}, "cls_finding": {}} and reference == [{"seed": 0}]  # only the references kept
    with pytest.raises(SystemExit, match="steps=300"):
        resumed(ap.parse_args(["--steps", "200", "--resume", str(path)]), ["random"], 0.0)
    path.write_text(json.dumps({**study, "reference": [{"seed": 0}, {"seed": 1}]}))
    fewer = ap.parse_args(["--seeds", "1", "--resume", str(path)])
    assert resumed(fewer, ["random"], 0.0)[1] == [{"seed": 0}]  # a study of fewer seeds: their references only


def test_a_study_repeats_exactly_with_the_same_seed(tmp_path):
    """Training noise is seeded (torch and the training transforms' own generators), so strategies of one seed share
    it and a study can be resumed or repeated: two tiny studies give identical curves."""
    import json

    from active_learning import main

    tiny = "--pool 6 --rare-every 3 --heldout 2 --seeds 1 --strategies random,entropy,diversity,diversity_layout,rarity"
    tiny += ",rarity_appearance_layout"
    tiny += " --initial 2 --batch 2 --max-labels 4"
    runs = []
    for k in range(2):
        argv = [*tiny.split(), "--warmup-steps", "5", "--steps", "5", "--threads", "1", "--out", str(tmp_path / str(k))]
        assert main(argv) == 0
        runs.append(json.loads((tmp_path / str(k) / "active_learning.json").read_text()))
    curves = [{s: [r["dice"] for r in by_seed["0"]] for s, by_seed in run["runs"].items()} for run in runs]
    assert curves[0] == curves[1] and len(curves[0]["random"]) == 2
    assert runs[0]["reference"][0]["dice"] == runs[1]["reference"][0]["dice"]
    # diversity's rounds record how well the embedding distance to the labeled cases sets the rare cases apart
    separation = runs[0]["runs"]["diversity"]["0"][0]["centre_distance_rare_vs_common"]
    assert 0.0 <= separation["auc_centre_distance_rare"] <= 1.0
    summary = runs[0]["summary"]["strategies"]
    assert summary["diversity"]["centre_distance_auc_rare_vs_common"] == separation["auc_centre_distance_rare"]
    assert summary["random"]["centre_distance_auc_rare_vs_common"] is None
    # diversity in the layout features (the server's --conf diversity_features layout) records its own distances
    layout = runs[0]["runs"]["diversity_layout"]["0"][0]
    assert 0.0 <= layout["centre_distance_rare_vs_common"]["auc_centre_distance_rare"] <= 1.0
    assert layout["picked"] and all(p["score"] is not None for p in layout["picked"])
    # rarity picks the unlabeled case farthest from its k-th unlabeled neighbour, and records how well that tells
    rarity = runs[0]["runs"]["rarity"]["0"][0]
    auc = rarity["knn_rarity_rare_vs_common"]["auc_knn_rarity_rare"]
    assert 0.0 <= auc <= 1.0 and summary["rarity"]["score_auc_rare_vs_common"] == auc
    assert [p["score"] for p in rarity["picked"]] == sorted((p["score"] for p in rarity["picked"]), reverse=True)
    # rarity in another space (the server's --conf rarity_features appearance_layout) measures in that space
    joined = runs[0]["runs"]["rarity_appearance_layout"]["0"][0]
    assert 0.0 <= joined["knn_rarity_rare_vs_common"]["auc_knn_rarity_rare"] <= 1.0
    assert joined["picked"] and all(p["score"] is not None for p in joined["picked"])
    assert [p["score"] for p in joined["picked"]] != [p["score"] for p in rarity["picked"]]


def test_resume_first_checks_that_this_machine_repeats_the_recorded_runs(tmp_path):
    """Training repeats exactly on one machine but not across machines, so a resumed study retrains a recorded
    seed's warm start and compares it with the recorded round 0: a match is recorded and the study goes on; a
    mismatch (here a recorded round 0 off by 0.01, as from another machine) stops it with nothing written, unless
    --other-machine, which records the mix in the .json and the report."""
    import json

    from active_learning import main

    tiny = "--pool 6 --rare-every 3 --heldout 2 --initial 2 --batch 2 --max-labels 4 --warmup-steps 5 --steps 5"
    tiny += " --threads 1"
    first = tmp_path / "first"
    assert main([*tiny.split(), "--strategies", "random", "--seeds", "1", "--out", str(first)]) == 0
    recorded = first / "active_learning.json"
    assert json.loads(recorded.read_text())["reproduction"] == []  # nothing resumed, nothing checked

    # resumed in place (--out the recorded study's folder), as the recorded studies are
    assert (
        main([*tiny.split(), "--strategies", "random", "--seeds", "2", "--resume", str(recorded), "--out", str(first)])
        == 0
    )
    study = json.loads(recorded.read_text())
    [check] = study["reproduction"]
    assert check["seed"] == 0 and check["reproduces"] and check["metric"] == "dice"
    assert check["retrained"] == check["recorded"] == study["runs"]["random"]["0"][0]["dice"]
    assert sorted(study["runs"]["random"]) == ["0", "1"]
    assert "seed 0's warm start, retrained, gives dice" in (first / "active_learning.md").read_text()

    elsewhere = json.loads(recorded.read_text())
    elsewhere["runs"]["random"]["0"][0]["dice"] += 0.01
    recorded.write_text(json.dumps(elsewhere))
    before = recorded.read_text()
    for strategies, seeds in (("random", "3"), ("random,entropy", "1")):  # adding seeds, adding strategies
        argv = [*tiny.split(), "--strategies", strategies, "--seeds", seeds, "--resume", str(recorded)]
        with pytest.raises(SystemExit, match="does not repeat its runs"):
            main([*argv, "--out", str(first)])
        assert recorded.read_text() == before  # nothing written
    mixed = tmp_path / "mixed"
    argv = [*tiny.split(), "--strategies", "random", "--seeds", "3", "--resume", str(recorded), "--other-machine"]
    assert main([*argv, "--out", str(mixed)]) == 0
    study = json.loads((mixed / "active_learning.json").read_text())
    assert [c["reproduces"] for c in study["reproduction"]] == [True, False]  # the recorded check, then this one
    assert "other_machine" not in study["config"]  # a recorded mismatch, not a setting that a later resume must match
    assert "MIXED MACHINES" in (mixed / "active_learning.md").read_text()


def test_ideal_observer_detectability_scales_with_contrast_and_bounds_the_matched_filter():
    from lesion_visibility import detectability, heldout_plan, ideal_auc, lesion_signal

    case = next(c for c in heldout_plan(0) if c["lesion"])
    cases = [{**case, "lesion_radius_mm": 5.0, "lesion_contrast_hu": c} for c in (-15, -30)]
    faint, strong = (detectability(c, *lesion_signal(c)) for c in cases)
    assert strong["d_prime"] == pytest.approx(2 * faint["d_prime"], rel=0.05)  # the signal is linear in contrast
    for r in (faint, strong):
        assert 0 < r["d_prime_npw"] <= r["d_prime"]  # prewhitening never loses
        assert r["lesion_radius_mm"] == 5.0 and r["signal_voxels"] > 0
    assert ideal_auc(0.0) == 0.5 and ideal_auc(1.0) == pytest.approx(0.7602, abs=1e-4) and ideal_auc(10) > 0.999


def test_searching_observer_rates_noise_in_standard_units_and_finds_a_plain_lesion():
    """Each filter's response to the case's noise alone has unit standard deviation (so sizes are weighed alike),
    and a plain lesion rates far above what the noise alone reaches anywhere in the liver, for both observers."""
    from lesion_visibility import (
        SEARCH_RADII_MM,
        SearchingObserver,
        heldout_plan,
        lesion_prior,
        lesion_signal,
        phantom_args,
    )

    from labelloop_app.synthetic import acquisition_noise, lesion_acquisition, lesion_phantom_liver

    case = next(c for c in heldout_plan(0) if c["lesion"])
    case = {**case, "lesion_radius_mm": 10.0, "lesion_contrast_hu": -40.0}
    args = phantom_args(case)
    acq = lesion_acquisition(**args)
    observer = SearchingObserver(lesion_phantom_liver(**args), acq)
    assert observer.liver.any() and len(observer.filters) == len(SEARCH_RADII_MM)
    noise = acquisition_noise(observer.shape, acq, np.random.default_rng(0))
    for radius, z in zip(SEARCH_RADII_MM, observer.responses(noise)):
        # a large ball's response is smooth: few independent samples in one liver
        assert float(np.sqrt((z**2).mean())) == pytest.approx(1.0, rel=0.1 if radius <= 8 else 0.3)
    signal, _ = lesion_signal(case)
    assert observer.liver[signal != 0].mean() > 0.9  # the lesion lies in the searched liver
    noise_only = observer.ratings(None, 3, seed=1)
    found = observer.ratings(signal, 1, seed=2)[0]
    assert max(r["scan"] for r in noise_only) < 6.0 < found["scan"]
    assert max(r["bayes"] for r in noise_only) < 0.0 < found["bayes"]  # noise alone is likelier than a lesion
    assert sum(w for _, _, w in lesion_prior()) == pytest.approx(1.0)


def test_a_recorded_command_names_project_paths_relatively_and_no_other_path():
    from common import ROOT, command

    recorded = ROOT / "benchmarks" / "results" / "study.json"
    argv = ["--out", "/somewhere/out", "--resume", str(recorded), "--out=/somewhere/x.json", "--seeds", "3"]
    line = "python benchmarks/s.py --out <folder> --resume benchmarks/results/study.json --out=<file> --seeds 3"
    assert command("s.py", argv) == line


RECORDED_STUDIES = sorted(
    (Path(__file__).resolve().parents[1] / "benchmarks" / "results").glob("active_learning*.json")
)


@pytest.mark.parametrize("recorded", RECORDED_STUDIES, ids=[p.stem for p in RECORDED_STUDIES])
def test_every_recorded_study_report_is_what_its_json_renders_to(recorded, tmp_path):
    """``--render`` re-writes a recorded study's report and plot from its JSON alone (runs, references, notes), so
    the recorded Markdown and summary must be exactly what the current summary code makes of the recorded runs."""
    import json
    import shutil

    import active_learning
    import active_learning_classification

    study = active_learning_classification if "classification" in recorded.stem else active_learning
    copy = tmp_path / recorded.name
    shutil.copy(recorded, copy)
    assert study.main(["--render", str(copy)]) == 0
    assert copy.with_suffix(".md").read_text() == recorded.with_suffix(".md").read_text()
    assert json.loads(copy.read_text()) == json.loads(recorded.read_text())
    assert copy.with_suffix(".png").stat().st_size > 10_000


def test_score_against_error_measures_rank_agreement_and_the_error_a_score_picks():
    from score_vs_error import measure, rank_correlation, top_error_ratio

    error = [0.1, 0.4, 0.2, 0.3]
    assert rank_correlation([1, 4, 2, 3], error) == pytest.approx(1.0)
    assert rank_correlation([4, 1, 3, 2], error) == pytest.approx(-1.0)
    # the two highest scores pick errors 0.4 and 0.3: their mean over the pool's mean 0.25
    assert top_error_ratio([0.0, 9.0, 1.0, 5.0], error, 2) == pytest.approx(0.35 / 0.25)
    ids = ["a", "b", "c", "d"]
    rare = {"a": False, "b": True, "c": False, "d": True}
    got = measure({"oracle": error}, ids, dict(zip(ids, error)), rare, 2)["oracle"]
    assert got == {"spearman": 1.0, "top_error_ratio": 1.4, "auc_rare": 1.0}


@pytest.mark.parametrize("name", ["score_vs_error", "score_vs_error_mirrored"])
def test_the_recorded_score_study_report_is_what_its_json_renders_to(name):
    import json

    from score_vs_error import SCORES, markdown

    recorded = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / f"{name}.json"
    result = json.loads(recorded.read_text())
    assert all(set(row["scores"]) <= set(SCORES) for row in result["checkpoints"])
    assert {"entropy", "oracle"} <= set(result["checkpoints"][0]["scores"])
    assert "\n".join(markdown(result)) + "\n" == recorded.with_suffix(".md").read_text()


def test_oracle_strategies_pick_the_worst_segmented_or_the_rare_cases_first():
    import random

    from active_learning import make_strategy, oracle_records

    from labelloop_app.activelearning.leases import LeaseBook
    from labelloop_app.activelearning.strategies import Pool

    cases = {f"c{i}": {"rare": i in (3, 5)} for i in range(8)}
    labeled = ["c0", "c5"]

    class PoolDice:  # the study's trainer, as far as the oracle needs it: Dice of pool cases on ground truth
        def pool_dice(self, network, ids):
            return {i: 0.9 - 0.1 * int(i[1:]) if i != "c2" else 0.05 for i in ids}

    def picks(strategy: str, records) -> list:
        pool = Pool(
            available=[i for i in cases if i not in labeled],
            labeled=labeled,
            leased={},
            records=records,
            model_version="v1",
        )
        chooser = make_strategy(strategy, LeaseBook(60.0), lambda *a: pool, random.Random(0), 0.5)
        return [p.image_id for p in chooser.order(pool, 3)[0]]

    worst = oracle_records("oracle_error", None, PoolDice(), cases, labeled, random.Random(0), "v1")
    assert set(worst) == set(cases) - set(labeled) and worst["c2"]["oracle_error"] == pytest.approx(0.95)
    assert picks("oracle_error", worst)[:3] == ["c2", "c7", "c6"]

    for seed in range(5):
        rare_first = oracle_records("oracle_rare", None, PoolDice(), cases, labeled, random.Random(seed), "v1")
        assert picks("oracle_rare", rare_first)[0] == "c3"  # the only unlabeled rare case, whatever the draws
    orders = {
        tuple(picks("oracle_rare", oracle_records("oracle_rare", None, None, cases, labeled, random.Random(s), "v1")))
        for s in range(5)
    }
    assert len(orders) > 1, "the common cases follow in a random order"


@pytest.mark.parametrize("rare", ["native", "mirrored"])
def test_the_study_cohort_puts_every_nth_case_in_the_rare_subgroup_and_nothing_else_changes(tmp_path, rare):
    import SimpleITK as sitk
    from active_learning import build_cohort

    from labelloop_app.synthetic import SEG_LABELS

    cases = build_cohort(tmp_path, "seg", 4, 0, rare, 2)
    assert [c["rare"] for c in cases] == [False, True, False, True]
    checked = set()
    for case in cases:
        label = sitk.ReadImage(case["label"])
        image = sitk.ReadImage(case["image"])
        assert (label.GetSize(), label.GetOrigin(), label.GetDirection()) == (
            image.GetSize(),
            image.GetOrigin(),
            image.GetDirection(),
        )
        liver = np.argwhere(sitk.GetArrayFromImage(label) == SEG_LABELS["liver"])
        if len(liver) == 0:  # a field-of-view cut may miss the liver
            continue
        centre = label.TransformContinuousIndexToPhysicalPoint([float(v) for v in liver[:, ::-1].mean(axis=0)])
        on_patient_left = centre[0] > 0  # LPS: patient left is +x
        assert on_patient_left == (rare == "mirrored" and case["rare"]), case["id"]
        checked.add(case["rare"])
        kidney_hu = sitk.GetArrayFromImage(image)[sitk.GetArrayFromImage(label) == SEG_LABELS["kidney_left"]]
        if rare == "native" and len(kidney_hu) > 20:  # enhanced kidneys are 150-200 HU, native 25-40 HU
            assert (np.median(kidney_hu) < 100) == case["rare"], case["id"]
    assert checked == {False, True}


def test_random_runs_on_past_the_budget_repeating_its_recorded_rounds(tmp_path):
    """``--beyond`` runs random again in a recorded study's seeds and on past its budget, with the study's target:
    the repeated rounds must equal the recorded ones (else it stops with nothing written), the continuation is
    recorded beside the runs, and the summary measures random's labels to the target on the longer curves."""
    import json

    from active_learning import main

    tiny = "--pool 6 --rare-every 3 --heldout 2 --initial 2 --batch 2 --max-labels 4 --warmup-steps 5 --steps 5"
    tiny += " --threads 1 --strategies random,rarity --seeds 1"
    with pytest.raises(SystemExit, match="needs --resume"):
        main([*tiny.split(), "--beyond", "6", "--out", str(tmp_path / "none")])
    study = tmp_path / "study"
    assert main([*tiny.split(), "--out", str(study)]) == 0
    recorded = study / "active_learning.json"
    before = json.loads(recorded.read_text())
    assert "beyond" not in before and "beyond" not in before["summary"]

    assert main([*tiny.split(), "--beyond", "6", "--resume", str(recorded), "--out", str(study)]) == 0
    after = json.loads(recorded.read_text())
    assert after["runs"] == before["runs"] and after["reference"] == before["reference"]
    assert after["summary"]["target_dice"] == before["summary"]["target_dice"]
    rows = after["beyond"]["runs"]["0"]
    assert [r["labels"] for r in rows] == [4, 6]  # from the study's last label count on
    assert rows[0]["dice"] == before["runs"]["random"]["0"][-1]["dice"]
    assert after["beyond"]["repeats"]["0"]["reproduces"]
    b = after["summary"]["beyond"]
    assert b["max_labels"] == 6 and b["seeds_run_on"] == [0] and b["repeats"]
    curve = {r["labels"]: r["dice"] for r in before["runs"]["random"]["0"] + rows[1:]}
    assert b["random_mean_dice"] == {str(n): d for n, d in curve.items()}
    assert set(b["strategies"]) == {"random", "rarity"} and b["strategies"]["random"]["relative_per_seed"] == 1.0
    assert b["strategies"]["random"]["cap"] == 6 and b["strategies"]["rarity"]["cap"] == 4  # where each stopped
    assert "Random run on past the budget, up to 6 labels" in (study / "active_learning.md").read_text()
    assert "config" in after and "beyond" not in after["config"]

    elsewhere = json.loads(recorded.read_text())
    del elsewhere["beyond"]
    elsewhere["runs"]["random"]["0"][1]["dice"] += 0.01  # a recorded round this machine does not repeat
    recorded.write_text(json.dumps(elsewhere))
    text = recorded.read_text()
    with pytest.raises(SystemExit, match="does not repeat its runs"):
        main([*tiny.split(), "--beyond", "6", "--resume", str(recorded), "--out", str(study)])
    assert recorded.read_text() == text


def test_random_run_on_leaves_out_a_strategy_until_it_has_run_in_every_seed():
    """A strategy added with ``--resume`` to a study whose random ran on past the budget is saved after each of its
    seeds; until it has run in all of random's seeds it is left out of the comparison with random's longer curves
    (it is not compared on fewer seeds than random, and saving does not fail)."""
    from active_learning import summarise

    def rows(*dice):
        return [{"labels": 2 + 2 * i, "dice": d, "dice_rare": d} for i, d in enumerate(dice)]

    runs = {"random": {0: rows(0.5, 0.7), 1: rows(0.5, 0.6)}, "rarity": {0: rows(0.5, 0.9)}}
    beyond = {
        "max_labels": 6,
        "runs": {0: rows(0.5, 0.7, 0.9)[1:], 1: rows(0.5, 0.6, 0.9)[1:]},
        "repeats": {0: {"max_difference": 0.0, "reproduces": True}, 1: {"max_difference": 0.0, "reproduces": True}},
    }
    reference = [{"dice": 1.0}, {"dice": 1.0}]  # target 0.8: random reaches it at 5 and 16/3 labels
    partial = summarise(runs, reference, 0.8, "dice", beyond)["beyond"]
    assert set(partial["strategies"]) == {"random"}
    assert partial["random_labels_to_target_per_seed"] == pytest.approx([5.0, 16 / 3])

    runs["rarity"][1] = rows(0.5, 0.85)
    full = summarise(runs, reference, 0.8, "dice", beyond)["beyond"]["strategies"]["rarity"]
    own = [3.5, 2 + 2 * 0.3 / 0.35]  # where each of rarity's seeds crosses 0.8
    assert full["mean_labels_per_seed"] == pytest.approx(np.mean(own))
    assert full["relative_per_seed"] == pytest.approx(np.mean(own) / np.mean([5.0, 16 / 3]))
    assert full["seeds_not_reaching"] == 0


def test_the_machine_line_names_the_cpu_model_and_its_vector_instructions(tmp_path):
    """Two machines that round differently must read differently in a recorded study's header: the CPU's model and
    the instructions torch uses (with AMX, which changes the kernels) are in it; without /proc/cpuinfo, the
    instructions alone."""
    import torch
    from common import cpu_model, machine

    capability = torch.backends.cpu.get_cpu_capability()
    cpuinfo = tmp_path / "cpuinfo"
    first = "processor\t: 0\ncpu family\t: 6\nmodel\t\t: 143\nmodel name\t: Some Xeon\nflags\t\t: fpu avx2 amx_tile\n"
    cpuinfo.write_text(first + "\n" + first.replace("processor\t: 0", "processor\t: 1"))
    assert cpu_model(cpuinfo) == f" (Some Xeon, family 6 model 143, {capability} with AMX)"
    cpuinfo.write_text(first.replace(" amx_tile", "").replace("143", "85"))
    assert cpu_model(cpuinfo) == f" (Some Xeon, family 6 model 85, {capability})"
    assert cpu_model(tmp_path / "absent") == f" ({capability})"
    assert capability in machine() and "cores" in machine()
