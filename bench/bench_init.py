"""Time the fast vs the exact Ortho-LoRA init over the real attention Linear shapes.

SDXL at rank 64: the 560 Linears the official code adapts (to_q, to_k, to_v, to_out.0 of attn1 and
attn2 in 70 transformer blocks). FLUX.1-dev at rank 32: the 266 attention projections, each
3072 x 3072 (double blocks: q, k, v, out for image and text; single blocks: q, k, v).

``fast`` is timed on every layer. ``exact`` (a full SVD per layer) would take minutes on a small CPU,
so it is timed on ``--exact-per-shape`` layers of each distinct shape and extrapolated by the shape
counts; the output says so. Results go to ``bench/results/bench_init.json`` (git-ignored).

    python bench/bench_init.py [--exact-per-shape N] [--threads 1] [--seed 0]

By default both modes run on 1 intra-op thread: the work per layer, and a stable figure on a shared
machine (with more threads than free cores, OpenMP stalls swamp both modes). The fast init's
tridiagonal bisection is single-threaded while the exact SVD uses every thread, so on an idle
many-core machine the wall-time ratio is lower; ``--threads 1,4`` measures both.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from tlora_core.init import OrthoFactors, ortho_init  # noqa: E402

log = logging.getLogger("bench_init")

SDXL_CONTEXT = 2048
# (LDM block holding a SpatialTransformer, width, transformer depth)
SDXL_BLOCKS = [("input_blocks.4.1", 640, 2), ("input_blocks.5.1", 640, 2),
               ("input_blocks.7.1", 1280, 10), ("input_blocks.8.1", 1280, 10),
               ("middle_block.1", 1280, 10),
               ("output_blocks.0.1", 1280, 10), ("output_blocks.1.1", 1280, 10),
               ("output_blocks.2.1", 1280, 10),
               ("output_blocks.3.1", 640, 2), ("output_blocks.4.1", 640, 2), ("output_blocks.5.1", 640, 2)]
FLUX_WIDTH, FLUX_DOUBLE, FLUX_SINGLE = 3072, 19, 38


def sdxl_layers() -> Iterator[tuple[str, int, int]]:
    """(name, out_features, in_features) of every adapted SDXL attention Linear."""
    for block, width, depth in SDXL_BLOCKS:
        for b in range(depth):
            for attn in ("attn1", "attn2"):
                for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                    cross = attn == "attn2" and proj in ("to_k", "to_v")
                    yield (f"{block}.transformer_blocks.{b}.{attn}.{proj}", width,
                           SDXL_CONTEXT if cross else width)


def flux_layers() -> Iterator[tuple[str, int, int]]:
    """(name, out_features, in_features) of FLUX.1-dev's attention projections (fused qkv split)."""
    w = FLUX_WIDTH
    for i in range(FLUX_DOUBLE):
        for stream in ("img_attn", "txt_attn"):
            for part in ("qkv.q", "qkv.k", "qkv.v", "proj"):
                yield f"double_blocks.{i}.{stream}.{part}", w, w
    for i in range(FLUX_SINGLE):
        for part in ("q", "k", "v"):
            yield f"single_blocks.{i}.linear1.{part}", w, w


def time_init(out: int, inn: int, rank: int, mode: str,
              generator: torch.Generator) -> tuple[float, OrthoFactors]:
    start = time.perf_counter()
    f = ortho_init(out, inn, rank, mode=mode, generator=generator)
    return time.perf_counter() - start, f


def bench_family(name: str, layers: list[tuple[str, int, int]], rank: int, exact_per_shape: int,
                 seed: int) -> dict:
    """Fast on every layer; exact right after the first ``exact_per_shape`` layers of each shape, so
    both modes see the same machine load."""
    counts = Counter((out, inn) for _, out, inn in layers)
    g = torch.Generator().manual_seed(seed)
    fast: dict[tuple[int, int], list[float]] = {s: [] for s in counts}
    exact: dict[tuple[int, int], list[float]] = {s: [] for s in counts}
    s_range: dict[tuple[int, int], dict[str, list[float]]] = {s: {} for s in counts}
    for _, out, inn in layers:
        shape = (out, inn)
        for mode, times in (("fast", fast), ("exact", exact)):
            if mode == "exact" and len(times[shape]) >= exact_per_shape:
                continue
            dt, f = time_init(out, inn, rank, mode, g)
            times[shape].append(dt)
            s_range[shape][mode] = [float(f.S[0]), float(f.S[-1])]
    shapes = []
    for shape, count in sorted(counts.items()):
        fast_mean, exact_mean = sum(fast[shape]) / count, sum(exact[shape]) / len(exact[shape])
        shapes.append({"out": shape[0], "in": shape[1], "count": count, "fast_mean_s": fast_mean,
                       "exact_mean_s": exact_mean, "exact_layers_timed": len(exact[shape]),
                       "ratio": exact_mean / fast_mean, "S_first_last": s_range[shape]})
        log.info("%s %5d x %-5d x%3d  fast %7.1f ms  exact %8.1f ms (mean of %d)  ratio %6.1f  "
                 "S[0], S[-1]: fast %.4g, %.4g / exact %.4g, %.4g", name, *shape, count,
                 1e3 * fast_mean, 1e3 * exact_mean, len(exact[shape]), exact_mean / fast_mean,
                 *s_range[shape]["fast"], *s_range[shape]["exact"])
    fast_total = sum(sum(t) for t in fast.values())
    exact_total = sum(s["count"] * s["exact_mean_s"] for s in shapes)
    log.info("%s: %d layers at rank %d: fast %.2f s (every layer timed), exact %.1f s (extrapolated "
             "from %d timed layer(s) per shape), exact / fast = %.1fx", name, len(layers), rank,
             fast_total, exact_total, exact_per_shape, exact_total / fast_total)
    return {"rank": rank, "layers": len(layers), "fast_total_s": fast_total,
            "exact_total_s_extrapolated": exact_total, "exact_layers_timed_per_shape": exact_per_shape,
            "ratio_exact_over_fast": exact_total / fast_total, "shapes": shapes}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exact-per-shape", type=int, default=None,
                        help="layers of each distinct shape timed with the exact (full SVD) init "
                             "(default: 2 for SDXL's four shapes, 1 for FLUX's single one)")
    parser.add_argument("--threads", default="1",
                        help="comma-separated torch intra-op thread counts to run the whole bench at")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "bench_init.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sdxl, flux = list(sdxl_layers()), list(flux_layers())
    if len(sdxl) != 560 or len(flux) != 266:
        raise RuntimeError(f"layer inventory is wrong: SDXL {len(sdxl)} (want 560), FLUX {len(flux)} (want 266)")
    for mode in ("fast", "exact"):  # warm-up: library loading and first-call costs are not the init's
        ortho_init(64, 64, 8, mode=mode)
    result = {"torch": torch.__version__, "cpu_count": os.cpu_count(), "machine": platform.machine(),
              "runs": []}
    for threads in sorted({int(t) for t in args.threads.split(",")}):
        torch.set_num_threads(threads)
        log.info("--- torch intra-op threads: %d", threads)
        run = {"threads": threads, "loadavg_before": os.getloadavg()}
        run["sdxl"] = bench_family("SDXL", sdxl, 64, args.exact_per_shape or 2, args.seed)
        run["flux"] = bench_family("FLUX.1-dev", flux, 32, args.exact_per_shape or 1, args.seed + 1)
        run["loadavg_after"] = os.getloadavg()
        result["runs"].append(run)
    for run in result["runs"]:
        log.info("threads %d: SDXL exact / fast = %.1fx, FLUX.1-dev exact / fast = %.1fx (load average "
                 "%.1f -> %.1f; the CPU is shared, so compare modes within a run)", run["threads"],
                 run["sdxl"]["ratio_exact_over_fast"], run["flux"]["ratio_exact_over_fast"],
                 run["loadavg_before"][0], run["loadavg_after"][0])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    log.info("wrote %s", args.out)
    return result


if __name__ == "__main__":
    main()
