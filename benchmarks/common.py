"""What the benchmark scripts share: the machine line, timed training through the server, writing the results."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent


def command(script: str, argv: Optional[Sequence[str]]) -> str:
    """The command line that reproduces a run, with its paths made portable (:func:`portable_path`)."""
    args = argv if argv is not None else sys.argv[1:]
    return " ".join(["python", f"benchmarks/{script}", *(portable_path(a) for a in args)])


def portable_path(arg: str) -> str:
    """An absolute path in a command-line argument (``/x/y`` or ``--out=/x/y``) relative to the project when it lies
    inside it, else ``<folder>`` or ``<file>``, so that a recorded command names nothing of the machine it ran on."""
    option, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    path = Path(value)
    if not path.is_absolute():
        return arg
    try:
        value = str(path.resolve().relative_to(ROOT))
    except ValueError:
        value = "<file>" if path.suffix else "<folder>"
    return f"{option}{eq}{value}"


def machine() -> str:
    """CPU, cores, torch threads and the accelerator, in one line. The CPU's model and the vector instructions torch
    uses are part of it: two machines that differ there round differently, and a study resumed on the other one
    does not repeat its recorded runs."""
    device = f"CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CPU only"
    return (
        f"{platform.processor() or platform.machine()}{cpu_model()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads, {device}"
    )


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """`` (<model name>, family F model M, <torch's CPU capability>[ with AMX])`` where ``cpuinfo`` can be read (Linux),
    else only the capability."""
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        fields = dict(
            (key.strip(), value.strip())
            for key, _, value in (line.partition(":") for line in cpuinfo.read_text().split("\n\n")[0].splitlines())
        )
    except OSError:
        return f" ({capability})"
    amx = " with AMX" if "amx_tile" in fields.get("flags", "").split() else ""
    name = fields.get("model name", "unknown CPU")
    return f" ({name}, family {fields.get('cpu family', '?')} model {fields.get('model', '?')}, {capability}{amx})"


def training_arguments(ap, here: Path) -> None:
    """The options every timed-training benchmark takes."""
    ap.add_argument("--minutes", type=float, default=15.0, help="training time budget")
    ap.add_argument("--sample-data", type=Path, default=here.parent / "sample-data")
    ap.add_argument("--out", type=Path, default=here / "results")
    ap.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"), help="server --conf")
    ap.add_argument("--learning-rate", type=float, help="initial learning rate (default: the task's)")


def train_with_progress(
    server, model: str, minutes: float, params: Dict[str, Any], postfix: Callable[[Dict[str, Any]], Dict[str, Any]]
) -> Dict[str, Any]:
    """Train ``model`` from scratch for ``minutes`` through the server with a progress bar; its train stats.

    ``postfix`` turns the latest history entry into the figures shown beside the bar.
    """
    r = server.post(f"/train/{model}", json={"max_epochs": 10000, "max_minutes": minutes, **params})
    r.raise_for_status()
    start = time.time()
    with tqdm(total=int(minutes * 60), desc="training", unit="s") as bar:
        while True:
            task = server.get("/train/").json()
            bar.n = min(int(time.time() - start), bar.total)
            stats = server.info()["train_stats"].get(model, {})
            if stats.get("history"):
                bar.set_postfix(epoch=stats["epoch"], **postfix(stats["history"][-1]))
            bar.refresh()
            if task.get("status") not in ("SUBMITTED", "RUNNING", "QUEUED"):
                break
            time.sleep(5)
    if task.get("status") != "DONE":
        raise RuntimeError(f"training failed: {task}\n{server.log_tail()}")
    return server.info()["train_stats"][model]


def write_results(out: Path, name: str, result: Dict[str, Any], lines: List[str]) -> None:
    """``<name>.json`` and ``<name>.md`` under ``out``; the report is printed too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=float))
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
