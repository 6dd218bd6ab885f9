"""Tracking: JSONL + console lines, real offline W&B read back, resume, failure tolerance; FLOPs; plots."""

import json
import struct
from pathlib import Path

import pytest
import torch

from train.flops import peak_flops, transformer_flops_per_token
from train.tracking import MetricsLogger, WandbOptions

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def offline_wandb(monkeypatch):
    """Real W&B, offline, quiet, never touching the network; its service is stopped afterwards."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")  # W&B's own switch: the logger leaves the mode to W&B
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # were it to try, it fails fast and locally
    yield wandb
    wandb.teardown()


def read_wandb_history(run_file: Path) -> list[dict]:
    """History rows of an offline ``run-<id>.wandb`` file, decoded with wandb's own protobuf Record.

    The file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB
    blocks of chunks, each ``crc32c:u32, length:u16, type:u8`` + payload; type 1 is a whole
    record, 2/3/4 the first/middle/last piece of one.
    """
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    rows, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def run_files(output_dir: Path, run_id: str) -> list[Path]:
    """The offline run files of one run id, oldest first (W&B adds "-1" to a folder name when a
    restart falls in the same second, so sort by time, not name)."""
    found = output_dir.glob(f"wandb/offline-run-*-{run_id}*/run-{run_id}.wandb")
    return sorted(found, key=lambda path: path.stat().st_mtime_ns)


def test_jsonl_and_console_line(tmp_path, capsys):
    logger = MetricsLogger(tmp_path / "out", {"model": "debug", "lr": 1e-3}, is_logging_rank=True, total_steps=10)
    for step in (1, 2, 3):
        logger.log(step, {"loss": torch.tensor(3.0 / step), "grad_norm": 1.5, "lr": 1e-3, "tokens_per_sec": 12345.0,
                          "mfu": 0.25, "mem_peak_mib": 1536.0, "aux": 7})
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["loss"] == pytest.approx(1.0) and rows[0]["aux"] == 7
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("step 1/10 | loss 3.0000 | grad_norm 1.500 | lr 1.00e-03 | tok/s 12.3k | mfu 25.0% | "
                               "mem 1.50GiB | aux 7")
    assert "eta " in lines[2] and "eta " not in lines[0]
    MetricsLogger(tmp_path / "out", {}, True, first_step=4).log(4, {"loss": 0.5})  # a restart appends
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 4
    # a run resumed from step 2's checkpoint drops what the stopped run logged after it, then appends
    with (tmp_path / "out" / "metrics.jsonl").open("a") as torn:
        torn.write('{"step": 5, "lo')  # a row cut short by a crash
    MetricsLogger(tmp_path / "out", {}, True, first_step=3).log(3, {"loss": 0.7})
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 3.0), (2, 1.5), (3, 0.7)]


def test_non_logging_rank_writes_nothing(tmp_path, capsys, offline_wandb):
    logger = MetricsLogger(tmp_path / "out", {}, is_logging_rank=False, wandb=WandbOptions(), wandb_run_id="keep")
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "out").exists() and capsys.readouterr().out == ""
    assert logger.run_id == "keep"


@pytest.mark.timeout(120)
def test_wandb_offline_history_and_resume_of_the_same_run(tmp_path, offline_wandb):
    out = tmp_path / "out"
    first = MetricsLogger(out, {"lr": 0.1}, True, wandb=WandbOptions(), total_steps=5)
    run_id = first.run_id
    assert run_id
    for step in (1, 2, 3):
        first.log(step, {"loss": 4.0 - step, "lr": 0.1})
    first.close()
    assert first.run_id == run_id  # still known after close, for the final checkpoint

    second = MetricsLogger(out, {"lr": 0.1}, True, wandb=WandbOptions(), wandb_run_id=run_id, total_steps=5,
                           first_step=4)
    assert second.run_id == run_id
    for step in (4, 5):
        second.log(step, {"loss": 4.0 - step, "lr": 0.1})
    second.close()
    offline_wandb.teardown()  # finish() may return before W&B's service has written the last records

    files = run_files(out, run_id)
    assert len(files) == 2, "a restart with the run id must write to the same W&B run id"
    history = [read_wandb_history(f) for f in files]
    assert [(row["_step"], row["loss"]) for row in history[0]] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert [(row["_step"], row["loss"]) for row in history[1]] == [(4, 0.0), (5, -1.0)]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 5


@pytest.mark.timeout(60)
def test_broken_wandb_warns_once_and_jsonl_continues(tmp_path, offline_wandb, monkeypatch):
    def broken_init(**kwargs):
        raise RuntimeError("no W&B today")

    monkeypatch.setattr(offline_wandb, "init", broken_init)
    with pytest.warns(RuntimeWarning, match="no W&B today"):
        logger = MetricsLogger(tmp_path / "a", {}, True, wandb=WandbOptions(), wandb_run_id="abc")
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert logger.run_id == "abc"
    assert json.loads((tmp_path / "a" / "metrics.jsonl").read_text())["loss"] == 1.0

    class BrokenRun:
        id = "xyz"
        calls = 0

        def log(self, *args, **kwargs):
            BrokenRun.calls += 1
            raise OSError("disk full")

        def finish(self):
            raise AssertionError("finish must not be called on a dropped run")

    monkeypatch.setattr(offline_wandb, "init", lambda **kwargs: BrokenRun())
    logger = MetricsLogger(tmp_path / "b", {}, True, wandb=WandbOptions())
    with pytest.warns(RuntimeWarning, match="disk full") as caught:
        for step in (1, 2, 3):
            logger.log(step, {"loss": float(step)})
    logger.close()
    assert BrokenRun.calls == 1 and len(caught) == 1  # warned once, W&B dropped after the first failure
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 3


def test_wandb_gets_the_run_names_and_tags_and_chooses_its_own_mode(tmp_path, offline_wandb, monkeypatch):
    """No mode= from us (wandb decides from `wandb login` / WANDB_API_KEY / WANDB_MODE); entity, name, tags pass."""
    seen = {}

    class Run:
        id = "r1"

        def log(self, *args, **kwargs):
            pass

        def finish(self):
            pass

    def init(**kwargs):
        seen.update(kwargs)
        return Run()

    monkeypatch.setattr(offline_wandb, "init", init)
    logger = MetricsLogger(tmp_path, {"lr": 1.0}, True, wandb=WandbOptions("proj", "team", "first-try", ("a", "b")))
    logger.close()
    assert "mode" not in seen and seen["project"] == "proj" and seen["entity"] == "team"
    assert seen["name"] == "first-try" and seen["tags"] == ["a", "b"] and seen["config"] == {"lr": 1.0}


def test_flops_formula_and_peaks(monkeypatch):
    # 6N + 12 L d s for N=1e6, L=2, d=64, s=128
    assert transformer_flops_per_token(1_000_000, 2, 64, 128) == 6e6 + 12 * 2 * 64 * 128
    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, dtype, want in [("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.5e12),
                              ("NVIDIA H200", torch.float16, 989.5e12),
                              ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
                              ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
                              ("NVIDIA H100 NVL", torch.bfloat16, None),
                              ("NVIDIA B200", torch.bfloat16, 2250e12),
                              ("NVIDIA GB200", torch.bfloat16, 2500e12),  # not the HGX B200's peak
                              ("NVIDIA L40S", torch.bfloat16, 362.05e12),
                              ("NVIDIA A10G", torch.bfloat16, 70e12),
                              ("NVIDIA A10", torch.bfloat16, None),       # not the A10G
                              ("AMD Instinct MI300X", torch.bfloat16, 1307.4e12),
                              ("NVIDIA GeForce RTX 4090", torch.bfloat16, None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert peak_flops(torch.device("cuda", 0), dtype) == want, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert peak_flops(torch.device("cuda"), torch.float32) == 19.5e12
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert peak_flops(torch.device("cuda"), torch.float32) == 156e12


def test_plot_metrics_overlays_runs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import plot_metrics

    files = []
    for run, speed in (("run-a", 1000.0), ("run-b", 2000.0)):
        (tmp_path / run).mkdir()
        path = tmp_path / run / "metrics.jsonl"
        rows = [{"step": s, "loss": 3.0 / s, "tokens_per_sec": speed} for s in (1, 2, 3)] + [{"step": 2, "loss": 9.0}]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append(path)
    assert [r["loss"] for r in plot_metrics.read_metrics(files[0])] == [3.0, 9.0, 1.0]  # last record of a step wins
    out = tmp_path / "curves.png"
    assert plot_metrics.main([str(f) for f in files] + ["-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
