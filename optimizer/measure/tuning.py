"""Session tuning (`benchmark.tune: true`): search ONNX Runtime's session options for one variant."""

from __future__ import annotations

import itertools

from optimizer.measure.benchmark import measure
from optimizer.engines.runners import session_options

LEVELS = ("basic", "extended", "all")
MODES = ("sequential", "parallel")


def _session(path, intra: int, inter: int, mode: str, level: str):
    import onnxruntime as ort

    options = session_options(intra, inter)
    options.execution_mode = {"sequential": ort.ExecutionMode.ORT_SEQUENTIAL,
                              "parallel": ort.ExecutionMode.ORT_PARALLEL}[mode]
    options.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def candidates(threads: int) -> list[dict]:
    """Thread splits within the spec's thread budget × execution mode × optimization level."""
    splits = sorted({(threads, 1), (1, 1)} | ({(max(1, threads // 2), 2)} if threads > 1 else set()))
    found = []
    for (intra, inter), mode, level in itertools.product(splits, MODES, LEVELS):
        if mode == "sequential" and inter > 1:
            continue  # inter-op threads only matter in parallel mode
        found.append({"intraOpThreads": intra, "interOpThreads": inter, "executionMode": mode, "optimizationLevel": level})
    return found


def tune(path, feed: dict, threads: int, warmup: int, runs: int) -> dict:
    tried = []
    for option in candidates(threads):
        session = _session(path, option["intraOpThreads"], option["interOpThreads"], option["executionMode"],
                           option["optimizationLevel"])
        inputs = {i.name: feed[i.name] for i in session.get_inputs()}
        latency = measure(lambda: session.run(None, inputs), warmup, runs)
        tried.append({**option, "meanMs": round(latency.mean, 4), "p50Ms": round(latency.p50, 4)})
    chosen = min(tried, key=lambda t: t["meanMs"])
    return {"chosen": chosen, "tried": tried}
