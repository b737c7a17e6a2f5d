"""Compare xLSTM placements (none, bot, enc) at equal budget and seeds on the DSB2018 test split.

    python benchmarks/placements.py --out runs/placements

Each (placement, seed) trains with ``training/configs/compare_small.yaml``
through ``training/train.py`` into ``OUT/<placement>_seed<N>/`` and is scored
on the test split of ``training/splits/dsb2018.csv`` (mean F1 at IoU 0.5,
post-processing tuned on the validation split). Finished runs are reused, so
the script can be stopped and started again. It prints a Markdown table and
writes ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "placements")
    parser.add_argument("--config", type=Path, default=REPO / "training" / "configs" / "compare_small.yaml")
    parser.add_argument("--placements", nargs="+", default=["none", "bot", "enc"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to train.py, e.g. --set train.threads=1")
    return parser.parse_args(argv)


def train_one(args, placement: str, seed: int) -> dict:
    run_dir = args.out / f"{placement}_seed{seed}"
    summary_path = run_dir / "eval" / "test_summary.json"
    if not summary_path.is_file():
        command = [sys.executable, str(REPO / "training" / "train.py"), "--config", str(args.config),
                   "--out", str(run_dir), "--xlstm", placement, "--seed", str(seed)]
        if (run_dir / "last.pt").is_file():
            command.append("--resume")
        for override in args.overrides:
            command += ["--set", override]
        print("$", " ".join(command), flush=True)
        start = time.time()
        with open(args.out / f"{placement}_seed{seed}.log", "a", encoding="utf-8") as log:
            subprocess.run(command, check=True, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        print(f"  {time.time() - start:.0f} s", flush=True)
    test = json.loads(summary_path.read_text())
    val = json.loads((run_dir / "eval" / "val_summary.json").read_text())
    rows = list(csv_rows(run_dir / "log.csv"))
    return {"placement": placement, "seed": seed, "test_f1": test["mean_f1"], "val_f1": val["mean_f1"],
            "seconds": float(rows[-1]["seconds"]) if rows else float("nan")}


def csv_rows(path: Path):
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        yield from csv.DictReader(handle)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    # Seeds outermost, so that a stopped run leaves every placement equally covered.
    for seed in args.seeds:
        for placement in args.placements:
            results.append(train_one(args, placement, seed))
            (args.out / "results.json").write_text(json.dumps(results, indent=2))

    print("\n| placement | seeds | test F1@0.5 mean | sd | min | max | per seed | val F1 mean | train s/run |")
    print("|---|---|---|---|---|---|---|---|---|")
    for placement in args.placements:
        rows = [r for r in results if r["placement"] == placement]
        f1 = [r["test_f1"] for r in rows]
        sd = statistics.stdev(f1) if len(f1) > 1 else float("nan")
        per_seed = ", ".join(f"{v:.3f}" for v in f1)
        print(f"| {placement} | {len(rows)} | {statistics.mean(f1):.3f} | {sd:.3f} | {min(f1):.3f} | "
              f"{max(f1):.3f} | {per_seed} | {statistics.mean(r['val_f1'] for r in rows):.3f} | "
              f"{statistics.mean(r['seconds'] for r in rows):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
