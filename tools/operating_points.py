"""Detection at the calibrated threshold, for several bundles on several datasets, in one table.

For every dataset (MVTec layout) and every bundle label, runs ``linescan evaluate``'s
evaluation (``linescan.evaluation_run.run_evaluation``: counted exactly as the daemon
publishes) and prints one markdown row: the residual and threshold the bundle ships, false
alarms per defect-free test image and per Mpx, the share of ground-truth regions and of defect
images found, the best the score could do at 0.5 false alarms per good image (a threshold
chosen on the test set itself: an upper bound, not an operating point), and the pixel AUROC of
the score and of the raw residual.

    python tools/operating_points.py --root runs/i11 --labels before,after \\
        ../shared/datasets/aitex/fabric_00 ../shared/datasets/mvtec_grid

reads the bundles ``runs/i11/before/fabric_00``, ``runs/i11/after/fabric_00``, ... (a bundle
per label and dataset name) and writes each evaluation under ``ROOT/eval/LABEL/NAME`` and the
table's data to ``ROOT/operating_points.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from linescan.backends import create_backend  # noqa: E402
from linescan.evaluation_run import run_evaluation  # noqa: E402
from linescan.model.bundle import load_bundle  # noqa: E402

AIM = 0.5  # false alarms per defect-free test image: the aim


def evaluate(bundle_path: Path, data: Path, out: Path) -> dict[str, Any]:
    bundle = load_bundle(bundle_path)
    meta = bundle.meta
    doc = run_evaluation(data, meta, create_backend(bundle), out, name=meta.name)
    op = doc["operating_point"] or {}
    froc = json.loads((out / "metrics.json").read_text())["froc"]
    within = [
        q
        for q in froc
        if q["false_alarms_per_image"] is not None and q["false_alarms_per_image"] <= AIM
    ]
    best = max(within, key=lambda q: (q["region_recall"] or 0, q["image_recall"] or 0), default={})
    cal = meta.calibration or {}
    return {
        "bundle": str(bundle_path),
        "residual": meta.residual,
        "score": doc["score"],
        "threshold": op.get("threshold"),
        "rule": cal.get("rule"),
        "epochs": meta.training.get("epochs"),
        "stopped": meta.training.get("stopped"),
        "opening": meta.opening,
        **{
            k: op.get(k)
            for k in (
                "false_alarms_per_image",
                "false_alarms_per_mpx",
                "region_recall",
                "image_recall",
                "good_images",
                "defect_images",
                "defect_regions",
            )
        },
        "aim_region_recall": best.get("region_recall"),
        "aim_image_recall": best.get("image_recall"),
        "aim_threshold": best.get("threshold"),
        "pixel_auroc": doc["pixel_auroc"],
        "pixel_auroc_residual": doc["pixel_auroc_residual"],
    }


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f} %"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| dataset | model | epochs | residual | threshold | false alarms / good image | "
        "false alarms / Mpx | regions found | defect images found | regions / images found at "
        "<= 0.5 false alarms per good image (threshold chosen on the test set) | pixel AUROC "
        "score (residual) |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        regions = r["defect_regions"] or 0
        images = r["defect_images"] or 0
        found_r = round((r["region_recall"] or 0) * regions)
        found_i = round((r["image_recall"] or 0) * images)
        lines.append(
            f"| {r['dataset']} | {r['label']} | {r['epochs']} | {r['residual']} | "
            f"{r['threshold']:.4g} ({r['rule']}) | {r['false_alarms_per_image']:.2f} "
            f"(of {r['good_images']}) | {r['false_alarms_per_mpx']:.2f} | "
            f"{_pct(r['region_recall'])} ({found_r}/{regions}) | "
            f"{_pct(r['image_recall'])} ({found_i}/{images}) | "
            f"{_pct(r.get('aim_region_recall'))} / {_pct(r.get('aim_image_recall'))} | "
            f"{r['pixel_auroc']:.3f} ({r['pixel_auroc_residual']:.3f}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("datasets", type=Path, nargs="+", help="MVTec-layout dataset folders")
    ap.add_argument("--root", type=Path, required=True, help="folder with LABEL/NAME bundles")
    ap.add_argument("--labels", default="before,after", help="comma-separated bundle labels")
    a = ap.parse_args(argv)
    rows = []
    for data in a.datasets:
        for label in a.labels.split(","):
            bundle = a.root / label / data.name
            if not (bundle / "bundle.json").is_file():
                print(f"skipping {bundle}: no bundle", file=sys.stderr)
                continue
            row = evaluate(bundle, data, a.root / "eval" / label / data.name)
            row.update(dataset=data.name, label=label)
            rows.append(row)
            print(table([row]).splitlines()[-1], file=sys.stderr, flush=True)
    (a.root / "operating_points.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
