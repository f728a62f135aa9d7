"""How fast inference runs when other work shares the CPU, by the number of PyTorch threads it takes.

    python benchmarks/cpu_sharing.py                 # about 5 minutes on 2 cores
    python benchmarks/cpu_sharing.py --repeats 1 --batches 4

The unit of work is one batch of an occlusion map: the classification network (DenseNet121, 32/16 features)
forward on 8 volumes of 64 x 64 x 32, as ``explain=occlusion`` runs it a hundred times or more per map. It is
timed, with ``threads`` PyTorch threads:

* ``alone``: nothing else runs;
* ``beside training``: a training process runs beside it (the segmentation network's training steps on 32-voxel
  patches with every core's thread, as the server's training subprocess does);
* ``two at once``: a second thread of the same process runs the same inference with the same thread count (two
  annotators' requests at once).

PyTorch's CPU threads synchronise in every layer, and the threads that wait spin before they sleep (OpenMP's
active wait policy). When there are more threads than cores, a layer waits for a thread that has no core, while
the spinning ones keep the cores busy.

``--server`` then measures what an annotator waits for: a real server (``--conf tasks classification`` over the
sample data's classification studies, 64 x 64 x 32 input) trains one epoch, then answers an occlusion map of one
image alone and again while a training of its own runs, and reports the thread count the answer says it used
(``cpu_threads``). Run it again with ``PYTHONPATH`` naming another version's ``apps/labelloop`` to compare versions.

Writes ``benchmarks/results/cpu_sharing.{json,md}``; ``--render <name>.json`` re-writes a recording's report from its
JSON (with the written notes in its ``notes``) and runs nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import torch
from classification import prepare_studies  # same folder: the sample data's studies with their class labels
from common import command, machine, write_results

from labelloop_app.devserver import start_server, stop_server
from labelloop_app.networks import classification_network, segmentation_network
from labelloop_app.synthetic import generate_sample_data

HERE = Path(__file__).resolve().parent


def inference_unit() -> tuple:
    torch.manual_seed(0)
    network = classification_network("densenet121", 2).eval()
    return network, torch.randn(8, 1, 64, 64, 32)


def train_forever(threads: int, steps: mp.Value, stop: mp.Event) -> None:
    """The competing training process: the segmentation network's steps on 32-voxel patches until ``stop``."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    network = segmentation_network("unet", 6)
    optimizer = torch.optim.Adam(network.parameters(), 1e-3)
    x, y = torch.randn(4, 1, 32, 32, 32), torch.randint(0, 6, (4, 1, 32, 32, 32))
    loss_fn = torch.nn.CrossEntropyLoss()
    while not stop.is_set():
        loss = loss_fn(network(x), y[:, 0])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with steps.get_lock():
            steps.value += 1


def time_batches(network, x, threads: int, batches: int) -> float:
    """Seconds per batch over ``batches`` batches, on the calling thread with ``threads`` PyTorch threads."""
    torch.set_num_threads(threads)
    with torch.inference_mode():
        network(x)  # warm-up
        start = time.perf_counter()
        for _ in range(batches):
            network(x)
    return (time.perf_counter() - start) / batches


@contextlib.contextmanager
def training_beside(threads: int) -> Iterator[Callable[[], float]]:
    """A training process (:func:`train_forever`) running in its stride; yields a function giving its steps per
    second since the ``with`` block began."""
    ctx = mp.get_context("spawn")
    steps, stop = ctx.Value("l", 0), ctx.Event()
    trainer = ctx.Process(target=train_forever, args=(threads, steps, stop), daemon=True)
    trainer.start()
    try:
        while steps.value < 3:
            time.sleep(0.2)
        first, start = steps.value, time.perf_counter()
        yield lambda: (steps.value - first) / (time.perf_counter() - start)
    finally:
        stop.set()
        trainer.join()


def measure(case: str, threads: int, batches: int, cores_threads: int) -> Dict[str, float]:
    """One timing of ``case`` with ``threads`` threads; the training's steps per second when one ran beside it."""
    network, x = inference_unit()
    result: Dict[str, float] = {}
    if case == "alone":
        result["seconds_per_batch"] = time_batches(network, x, threads, batches)
    elif case == "beside training":
        with training_beside(cores_threads) as rate:
            result["seconds_per_batch"] = time_batches(network, x, threads, batches)
            result["training_steps_per_second"] = rate()
    elif case == "two at once":
        times: List[float] = []
        other = threading.Thread(target=lambda: times.append(time_batches(network, x, threads, batches)))
        other.start()
        result["seconds_per_batch"] = time_batches(network, x, threads, batches)
        other.join()
        result["other_seconds_per_batch"] = times[0]
    else:
        raise ValueError(case)
    return result


def training_alone(cores_threads: int, seconds: float = 20.0) -> float:
    with training_beside(cores_threads) as rate:
        time.sleep(seconds)
        return rate()


SERVER_CONF = {
    "tasks": "classification",
    "cls_size": "64,64,32",
    "cls_spacing": "6,6,6",
    "cls_batch_size": "2",
    "auto_scoring": "false",
}
EXPLAINED = "lesion_009"


def occlusion_seconds(server) -> Dict[str, float]:
    """One occlusion map through ``/infer``: the wall time and the thread count the answer reports."""
    start = time.perf_counter()
    r = server.post(
        f"/infer/classification?image={EXPLAINED}&output=json",
        data={"params": json.dumps({"explain": "occlusion"})},
        timeout=1800,
    )
    r.raise_for_status()
    return {"seconds": time.perf_counter() - start, "cpu_threads": r.json().get("cpu_threads")}


def through_the_server(sample: Path, repeats: int) -> Dict[str, List[Dict[str, float]]]:
    """An occlusion map's wall time, ``repeats`` times alone, then as often beside the server's own training."""
    generate_sample_data(sample)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = start_server(prepare_studies(sample, root), root / "models", root / "server.log", SERVER_CONF)
        try:
            server.post("/train/classification", json={"max_epochs": 1}).raise_for_status()
            assert server.wait_task("train")["status"] == "DONE", server.log_tail()
            occlusion_seconds(server)  # loads the model
            alone = [occlusion_seconds(server) for _ in range(repeats)]
            print(f"server, alone: {alone}", flush=True)
            server.post("/train/classification", json={"max_epochs": 10000}).raise_for_status()
            while server.get("/train/").json().get("status") != "RUNNING":
                time.sleep(0.2)
            time.sleep(10)  # the training is in its stride
            beside = []
            for _ in range(repeats):
                beside.append(occlusion_seconds(server))
                print(f"server, beside its training: {beside[-1]}", flush=True)
            server.delete("/train/")
            server.wait_task("train")
        finally:
            stop_server(server)
    return {"alone": alone, "beside training": beside}


def report(result: Dict) -> List[str]:
    rows = result["rows"]
    base = next(r for r in rows if r["case"] == "alone" and r["threads"] == result["cores_threads"])
    lines = [
        "# Inference beside other work on the CPU",
        "",
        f"`{result['command']}` on {result['machine']}; {result['repeats']} repeat(s) of {result['batches']} batches"
        f" each, medians. Unit: one occlusion-map batch (DenseNet121 on 8 x 64 x 64 x 32). The training process"
        f" alone runs {result['training_alone_steps_per_second']:.1f} steps/s.",
        "",
        "| case | inference threads | s per batch (median) | repeats | x alone with all threads | training steps/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        steps = r.get("training_steps_per_second")
        lines.append(
            f"| {r['case']} | {r['threads']} | {r['median']:.3f} | {', '.join(f'{v:.3f}' for v in r['values'])} | "
            f"{r['median'] / base['median']:.1f} | {'' if steps is None else f'{steps:.1f}'} |"
        )
    server = result.get("server")
    if server:
        lines += [
            "",
            "Through the server (`--server`): one occlusion map of the 64 x 64 x 32 classification input.",
            "",
            "| case | seconds | threads the answer reports |",
            "|---|---|---|",
        ]
        for case, runs in server.items():
            seconds = ", ".join(f"{m['seconds']:.1f}" for m in runs)
            threads = ", ".join(str(m["cpu_threads"] or "not reported (all)") for m in runs)
            lines.append(f"| {case} | {seconds} | {threads} |")
    return lines + [""] + result.get("notes", [])


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=8, help="timed batches per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--server", action="store_true", help="also time an occlusion map through a real server")
    ap.add_argument("--server-repeats", type=int, default=2, help="occlusion maps per case through the server")
    ap.add_argument("--name", default="cpu_sharing", help="the results' file name")
    ap.add_argument("--sample-data", type=Path, default=HERE.parent / "sample-data")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--render", type=Path, help="a recorded .json: re-write its report, run nothing")
    args = ap.parse_args(argv)
    if args.render:
        args.render.with_suffix(".md").write_text("\n".join(report(json.loads(args.render.read_text()))) + "\n")
        return 0
    cores_threads = torch.get_num_threads()
    machine_line = machine()
    thread_counts = sorted({cores_threads, max(1, cores_threads // 2)}, reverse=True)
    rows = []
    for case in ("alone", "beside training", "two at once"):
        for threads in thread_counts:
            runs = [measure(case, threads, args.batches, cores_threads) for _ in range(args.repeats)]
            values = [r["seconds_per_batch"] for r in runs]
            row = {"case": case, "threads": threads, "values": values, "median": statistics.median(values)}
            if case == "beside training":
                row["training_steps_per_second"] = statistics.median(r["training_steps_per_second"] for r in runs)
            rows.append(row)
            print(f"{case}, {threads} thread(s): {row['median']:.3f} s per batch", flush=True)
    result = {
        "command": command("cpu_sharing.py", argv),
        "machine": machine_line,
        "cores": os.cpu_count(),
        "cores_threads": cores_threads,
        "batches": args.batches,
        "repeats": args.repeats,
        "training_alone_steps_per_second": training_alone(cores_threads),
        "rows": rows,
    }
    if args.server:
        result["server"] = through_the_server(args.sample_data, args.server_repeats)
    write_results(args.out, args.name, result, report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
