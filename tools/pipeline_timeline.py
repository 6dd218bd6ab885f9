"""See a pipeline schedule run: per-rank forward/backward timeline, Chrome trace, PNG, bubble.

    python tools/pipeline_timeline.py                          # pp=4, 1F1B, 8 microbatches, CPU/gloo
    python tools/pipeline_timeline.py --schedule gpipe --microbatches 4 --out outputs/timeline
    python tools/pipeline_timeline.py --from-recording outputs/timeline/recording   # redraw only

It spawns ``pp`` gloo ranks, trains a few steps of the debug model with the trainer's own
pipeline path, and times every action each stage runs by wrapping the
stage's ``forward_one_chunk`` (F), ``backward_one_chunk`` (B; I when it computes only the
input gradient, as zero-bubble schedules do), ``backward_weight_one_chunk`` (W) and the last
stage's loss (L). It times ``--steps`` steps and reports the one with the median bubble. Then it
writes ``<out>/recording/rank<r>.json``, ``<out>/timeline.json`` (open in chrome://tracing
or ui.perfetto.dev) and ``<out>/timeline.png``, and prints

    measured bubble = 1 - (mean busy time per rank) / (step makespan)
    theory          = (p - 1) / (m + p - 1)        (1F1B/GPipe, equal-time stages)
                      (p - 1) / (v*m + p - 1)      (v virtual stages per rank: interleaved, ZBV)
    and, for 1F1B/GPipe, the theory for the stages' measured times t_s per microbatch:
                      1 - mean(m t_s) / (sum(t_s) + (m - 1) max(t_s))

Measured numbers on a shared CPU are indicative: steps vary by a few percent of the
step, and P2P sends and waits count as idle time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _pkg in ("core", "models", "train"):
    if str(ROOT / "packages" / _pkg) not in sys.path:
        sys.path.insert(0, str(ROOT / "packages" / _pkg))

COLORS = {"F": "#4C72B0", "L": "#8172B3", "B": "#55A868", "I": "#8FD19E", "W": "#DD8452"}


# ---------------------------------------------------------------- recording (runs on every rank)

def instrument(stage, events: list[dict], clock) -> None:
    """Wrap one PipelineStage's compute methods so each call appends {kind, stage, mb, start, end}."""
    def wrap(method_name: str, kind: str):
        original = getattr(stage, method_name)

        def timed(chunk_id, *args, **kwargs):
            label = "I" if kind == "B" and kwargs.get("full_backward", True) is False else kind
            start = clock()
            result = original(chunk_id, *args, **kwargs)
            events.append({"kind": label, "stage": stage.stage_index, "mb": chunk_id, "start": start, "end": clock()})
            return result
        setattr(stage, method_name, timed)

    wrap("forward_one_chunk", "F")
    wrap("backward_one_chunk", "B")
    wrap("backward_weight_one_chunk", "W")


def instrument_loss(schedule, stage_index: int, events: list[dict], clock) -> None:
    """Time the last stage's loss (run by the schedule between its forward and backward) as "L"."""
    loss_fn = schedule._loss_fn

    def timed(output, target):
        start = clock()
        loss = loss_fn(output, target)
        microbatch = sum(1 for e in events if e["kind"] == "L")  # the schedule computes them in order
        events.append({"kind": "L", "stage": stage_index, "mb": microbatch, "start": start, "end": clock()})
        return loss
    schedule._loss_fn = timed


def record_rank(rank: int, world: int, port: int, args: dict, out_dir: str) -> None:
    """One spawned rank: train ``warmup`` untimed steps, then time the actions of ``steps`` steps."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    from train.loop import build_trainer, train_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    code = 0
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t = build_trainer(run_config(world, args, tmp))
            for _ in range(args["warmup"]):  # the first step also infers stage shapes: not representative
                train_step(t)
            events: list[dict] = []
            pipe = t.model.pipeline
            for stage in pipe.stages:
                instrument(stage, events, time.perf_counter)
            if pipe.has_last:
                instrument_loss(pipe.schedule, pipe.n_stages - 1, events, time.perf_counter)
            steps = []
            for _ in range(args["steps"]):
                events.clear()
                dist.barrier()  # a common time origin: every rank leaves the barrier at about the same moment
                origin = time.perf_counter()
                train_step(t)
                steps.append([{**e, "start": e["start"] - origin, "end": e["end"] - origin} for e in events])
        recording = {"rank": rank, "pp": world, "microbatches": pipe.microbatches, "schedule": args["schedule"],
                     "stages": pipe.stage_ids, "steps": steps}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(recording, indent=1))
    except BaseException:  # noqa: BLE001 - report, then leave without gloo's exit-time abort
        traceback.print_exc()
        code = 1
    finally:
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_config(pp: int, args: dict, output_dir: str):
    from train.config import TrainConfig

    return TrainConfig(mesh=f"pp={pp}", pp_schedule=args["schedule"], microbatches=args["microbatches"],
                       dataset="synthetic", steps=args["warmup"] + args["steps"], seq_len=args["seq_len"],
                       global_batch_size=args["batch"], output_dir=output_dir)


def record(pp: int, schedule: str, microbatches: int, seq_len: int, batch: int, warmup: int, steps: int,
           out_dir: Path) -> None:
    """Spawn ``pp`` ranks, each writing ``out_dir/rank<r>.json``. A bad configuration fails here, once."""
    import socket

    import torch.multiprocessing as mp

    from train.validation import validate

    args = dict(schedule=schedule, microbatches=microbatches, seq_len=seq_len, batch=batch, warmup=warmup,
                steps=steps)
    try:
        validate(run_config(pp, args, str(out_dir)), pp)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=record_rank, args=(r, pp, port, args, str(out_dir))) for r in range(pp)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    missing = [r for r in range(pp) if not (out_dir / f"rank{r}.json").exists()]
    if missing:
        raise SystemExit(f"ranks {missing} wrote no recording (see their errors above)")


def load_recording(folder: Path) -> list[dict]:
    recordings = sorted((json.loads(p.read_text()) for p in folder.glob("rank*.json")), key=lambda r: r["rank"])
    if not recordings:
        raise SystemExit(f"error: no rank*.json in {folder}: pass the recording folder a run wrote "
                         f"(<out>/recording), or record one by leaving out --from-recording")
    if any("steps" not in r for r in recordings):
        raise SystemExit(f"error: {folder} was recorded by an older version of this tool (one step, no 'steps'): "
                         f"record it again")
    return recordings


# ---------------------------------------------------------------- analysis and drawing

def steps_of(recordings: list[dict]) -> list[list[dict]]:
    """Per timed step, the ranks' recordings of that step alone (each with its ``events``)."""
    return [[{**r, "events": r["steps"][k]} for r in recordings] for k in range(len(recordings[0]["steps"]))]


def bubble(recordings: list[dict]) -> dict:
    """Measured idle fraction of the step vs the theory for equal-time stages.

    1F1B/GPipe: (p-1)/(m+p-1). With v virtual stages per rank each chunk of work is 1/v as
    long, so the warm-up/cool-down shrinks: (p-1)/(v*m+p-1) (interleaved 1F1B; for ZBV it is
    an upper bound, as its split weight-gradient work W fills part of the bubble).

    The step's makespan runs from the first action's start to the last action's end over
    all ranks; a rank is busy while one of its actions runs.
    """
    events = [e for r in recordings for e in r["events"]]
    begin, end = min(e["start"] for e in events), max(e["end"] for e in events)
    makespan = end - begin
    busy = [sum(e["end"] - e["start"] for e in r["events"]) for r in recordings]
    p, m, schedule = recordings[0]["pp"], recordings[0]["microbatches"], recordings[0]["schedule"]
    v = len(recordings[0]["stages"])
    mean_busy = sum(busy) / len(busy)
    stats = {"pp": p, "microbatches": m, "schedule": schedule, "makespan_s": makespan, "busy_s": busy,
             "measured": 1 - mean_busy / makespan, "theory": (p - 1) / (v * m + p - 1),
             "formula": "(p-1)/(m+p-1)" if v == 1 else f"(p-1)/(v*m+p-1), v={v}"}
    if v == 1:
        # Unequal stages: microbatches stream at the pace of the slowest stage (t per
        # microbatch), after filling and before draining the others: sum(t) + (m-1) max(t).
        per_microbatch = [b / m for b in busy]
        ideal_makespan = sum(per_microbatch) + (m - 1) * max(per_microbatch)
        stats["theory_for_stage_times"] = 1 - mean_busy / ideal_makespan
    return stats


def chrome_trace(recordings: list[dict]) -> dict:
    """Trace Event Format: one process row per rank, one complete ("X") event per action, times in us."""
    trace = []
    for r in recordings:
        trace.append({"name": "process_name", "ph": "M", "pid": r["rank"],
                      "args": {"name": f"rank {r['rank']} (stages {r['stages']})"}})
        for e in r["events"]:
            trace.append({"name": f"{e['kind']}{e['mb']}", "cat": e["kind"], "ph": "X", "pid": r["rank"],
                          "tid": e["stage"], "ts": e["start"] * 1e6, "dur": (e["end"] - e["start"]) * 1e6,
                          "args": {"stage": e["stage"], "microbatch": e["mb"]}})
    return {"traceEvents": trace, "displayTimeUnit": "ms"}


def draw(recordings: list[dict], stats: dict, path: Path) -> None:
    """A Gantt chart: one row per rank, boxes labelled with the microbatch, colored by kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    origin = min(e["start"] for r in recordings for e in r["events"])
    min_label_width = stats["makespan_s"] * 1e3 / 80  # ms; narrower boxes stay unlabelled
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(recordings) + 1.6))
    for r in recordings:
        y = len(recordings) - 1 - r["rank"]
        for e in r["events"]:
            x, w = (e["start"] - origin) * 1e3, (e["end"] - e["start"]) * 1e3
            ax.broken_barh([(x, w)], (y - 0.4, 0.8), facecolors=COLORS[e["kind"]], edgecolor="black", linewidth=0.4)
            label = str(e["mb"]) if len(r["stages"]) == 1 else f"{e['mb']}s{e['stage']}"
            if w >= min_label_width:
                ax.text(x + w / 2, y, label, ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(recordings)), [f"rank {r['rank']}" for r in reversed(recordings)])
    ax.set_xlabel("time in step (ms)")
    ax.set_title(f"{stats['schedule']}  pp={stats['pp']}  m={stats['microbatches']}   bubble: measured "
                 f"{stats['measured']:.1%}, theory {stats['formula']} = {stats['theory']:.1%}")
    kinds = sorted({e["kind"] for r in recordings for e in r["events"]}, key="FLBIW".index)
    names = {"F": "forward", "L": "loss", "B": "backward", "I": "backward (input)", "W": "backward (weight)"}
    ax.legend(handles=[Patch(color=COLORS[k], label=names[k]) for k in kinds], loc="upper left",
              bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--schedule", default="1f1b", choices=["1f1b", "gpipe", "interleaved-1f1b", "zbv"])
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences); cut into microbatches")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the recorded ones")
    parser.add_argument("--steps", type=int, default=5,
                        help="timed steps; the step with the median bubble is reported and drawn")
    parser.add_argument("--out", type=Path, default=Path("outputs/timeline"))
    parser.add_argument("--from-recording", type=Path, help="draw an existing recording folder instead of running")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: time at least one step (--steps 1 or more)")

    folder = args.from_recording or args.out / "recording"
    if args.from_recording is None:
        record(args.pp, args.schedule, args.microbatches, args.seq_len, args.batch, args.warmup, args.steps, folder)
    steps = steps_of(load_recording(folder))
    per_step = [bubble(step) for step in steps]
    median = sorted(range(len(per_step)), key=lambda k: per_step[k]["measured"])[len(per_step) // 2]
    recordings, stats = steps[median], per_step[median]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "timeline.json").write_text(json.dumps(chrome_trace(recordings)))
    draw(recordings, stats, args.out / "timeline.png")
    print(f"{stats['schedule']} pp={stats['pp']} m={stats['microbatches']}, median of {len(per_step)} steps: "
          f"step {stats['makespan_s'] * 1e3:.1f} ms, busy per rank {[round(b * 1e3, 1) for b in stats['busy_s']]} ms")
    every_step = ", ".join(f"{step['measured']:.3f}" for step in per_step)
    print(f"bubble fraction: measured {stats['measured']:.3f} (steps: {every_step}), "
          f"theory {stats['formula']} = {stats['theory']:.3f}")
    if "theory_for_stage_times" in stats:
        print(f"  theory for these stages' measured times (an unequal split idles the faster stages): "
              f"{stats['theory_for_stage_times']:.3f}")
    print(f"wrote {args.out / 'timeline.json'} (chrome://tracing, ui.perfetto.dev) and {args.out / 'timeline.png'}")
    return stats


if __name__ == "__main__":
    main()
