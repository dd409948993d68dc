"""Where the time goes: ONNX Runtime's profiler, summed by op type, for one variant."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from optimizer.engines.runners import session_options


def op_time_split(onnx_path: Path, feed: dict, threads: int, runs: int, workdir: Path) -> list[dict]:
    """[{op, ms, share}] per inference, largest first, from `runs` profiled runs."""
    import onnxruntime as ort

    options = session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(workdir / "ort-profile")
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    inputs = {i.name: feed[i.name] for i in session.get_inputs()}
    session.run(None, inputs)  # warm-up, excluded below by counting only the last `runs`
    for _ in range(runs):
        session.run(None, inputs)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_run = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    cutoff = per_run[-runs]["ts"] if len(per_run) >= runs else 0
    totals: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time") and event["ts"] >= cutoff:
            totals[event["args"]["op_name"]] += event["dur"] / 1000.0 / runs
    whole = sum(totals.values()) or 1.0
    return [{"op": op, "ms": round(ms, 4), "share": round(ms / whole, 4)}
            for op, ms in sorted(totals.items(), key=lambda kv: -kv[1])]
