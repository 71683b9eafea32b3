"""Token clustering at the probe sizes users run: time and peak memory against the token
count, to show they grow about linearly (no tokens x tokens matrix).

Synthetic per-token vectors (``--components`` components, 40 planted clusters plus noise)
at each ``--tokens`` size; each size is measured in a fresh child process (peak RSS over a
baseline child that builds the same matrix). Printed side by side: wall time and peak
memory of ``TokenClusters("graph")`` (the default, eigengap count), the ARI against the
planted clusters, and the memory a dense tokens x tokens float64 matrix would take.

    python benchmarks/bench_clusters.py [--tokens 5000 20000 50000] [--components 144]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench.memory import mib, peak_rss_bytes  # noqa: E402

PLANTED = 40


def vectors(tokens: int, components: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(PLANTED, components))
    truth = rng.integers(0, PLANTED, tokens)
    return (centres[truth] + 0.6 * rng.normal(size=(tokens, components))).T, truth


def child(spec: dict) -> dict:
    from sklearn.metrics import adjusted_rand_score

    from susc_callback import SGLDConfig, SusceptibilityResult
    from susc_callback.clusters import TokenClusters

    chi, truth = vectors(spec["tokens"], spec["components"])
    tokens, components = spec["tokens"], spec["components"]
    result = SusceptibilityResult(
        component_names=[f"h{i}" for i in range(components)], chi=chi,
        dataset_names=["probe"], dataset_chi=np.zeros((components, 1)),
        rllc=np.ones(components), llc_full=1.0, mean_phi=np.ones(components),
        anchor_loss=np.ones(components), loss_traces=np.ones((components, 1, 2)),
        full_loss_trace=np.ones((1, 2)), token_sequence=np.zeros(tokens, np.int64),
        token_position=np.arange(tokens), probe_input_ids=np.zeros((1, tokens + 1), np.int64),
        probe_attention_mask=np.ones((1, tokens + 1), np.int64), sequence_datasets=["probe"],
        config=SGLDConfig().to_dict())
    if spec["job"] == "baseline":
        return {"peak_rss": peak_rss_bytes()}
    start = time.perf_counter()
    fit = TokenClusters("graph", max_clusters=60).fit(result)
    return {"time_s": time.perf_counter() - start, "peak_rss": peak_rss_bytes(),
            "clusters": fit.n_clusters_, "ari": adjusted_rand_score(truth, fit.labels_)}


def spawn(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--job", json.dumps(spec)],
                          capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT_JSON "):
            return json.loads(line[len("RESULT_JSON "):])
    sys.stderr.write(proc.stderr[-4000:])
    raise RuntimeError(f"child {spec} failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, nargs="+", default=[5000, 20000, 50000])
    parser.add_argument("--components", type=int, default=144)
    args = parser.parse_args()
    if args.job:
        print("RESULT_JSON " + json.dumps(child(json.loads(args.job))), flush=True)
        return
    print(f"{'tokens':>8}{'wall s':>9}{'peak memory':>14}{'dense P x P':>14}{'clusters':>10}"
          f"{'ARI':>7}")
    for tokens in args.tokens:
        spec = {"tokens": tokens, "components": args.components}
        base = spawn({**spec, "job": "baseline"})["peak_rss"]
        run = spawn({**spec, "job": "fit"})
        print(f"{tokens:>8}{run['time_s']:>9.1f}{mib(run['peak_rss'] - base):>14}"
              f"{mib(8 * tokens ** 2):>14}{run['clusters']:>10}{run['ari']:>7.3f}", flush=True)


if __name__ == "__main__":
    main()
