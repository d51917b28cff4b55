"""The score: the residual made comparable across the web, on the web only.

A single threshold on a raw residual is set by the worst place on the web and blind everywhere
else. Each camera column has its own gain, lighting and optics (line-scan vendors correct this
per column: flat-field, per-lane calibration); the web's edges raise the residual wherever they
wander; and the first and last lines of a segment are reconstructed by fewer overlapping tiles.
So the residual is normalised by how it behaves on defect-free material, there:

    score = (residual - centre) / spread

with centre the median and spread the distance from the median to the 99th percentile
(``QUANTILE``) of the residual on defect-free images, robust to the outliers a few good images
have. Score 1 is "as high as the top 1 % of good material at this place". The statistics come in
three layers, each learned from the one before:

* per **column** (model pixels), from the web's interior: lighting, gain, optics. They are
  smoothed over ``COLUMN_SMOOTH`` neighbouring columns (lighting varies smoothly; single columns
  have few samples). Images of another width than the training images (a dataset of varied
  sizes, not a web) are scored against whole-image statistics instead (``Scoring.describe``
  says so), except the ``BORDER`` columns at either side of the image, which keep the training
  images' own border columns (tiles reconstruct their borders worst);
* per **distance from the web's edge** (``ZONE`` columns into the web, ``ZONE_OUT`` beyond it,
  ``web.py``): the edge's own residual, whichever column it has wandered to, so a bite out of
  the edge or fibres sticking out of it stay findable. Further out, off the web, the
  score is 0: never an alarm, whatever the residual;
* per **distance from the segment's first and last row** (``ROW_DEPTH`` rows): the tile rows
  there overlap less. This layer only ever lowers a score (its centre is at least 0 and its
  spread at least 1): the ends of a segment are never more trustworthy than its middle, and
  training images of one tile row's height say little about a long web's middle. In the
  daemon the last rows of a segment are only final when the segment ends, so the distance to
  the end is known whenever it matters (``tracker.py``).

A residual made of several components (``combined``: 1 - SSIM and the smoothed absolute
difference) is normalised component by component and scored by the larger.

Streaming equals offline: every step is element-wise float32 arithmetic on a row with
statistics fixed per column, per edge distance and per row distance, and the edges of a block
are the same in both (``web.EdgeTracker``).

A bundle without statistics (trained before they existed) is scored by its raw residual, as
before; ``linescan calibrate`` adds them.
"""

from __future__ import annotations

import io
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from linescan.errors import ModelError
from linescan.residual import COMPONENTS, Component, ResidualKind
from linescan.web import SIDES, EdgeModel, Edges, EdgeTracker, Side, learn_edges

F32 = npt.NDArray[np.float32]
ROW_DEPTH = 16  # rows at a segment's top and bottom with statistics of their own
ZONE = 24  # model columns into the web scored against the edge's statistics
ZONE_OUT = 6  # ... and beyond the edge; further out is off the web, never scored
# No spread below these shares of the whole web's: a saturated backlight or a flat column has
# a tiny spread, which would turn any small change there into a huge score.
MIN_COLUMN_SPREAD = 0.25
MIN_ZONE_SPREAD = 0.5
BORDER = 16  # image border columns that keep their own statistics at any width
QUANTILE = 0.99
COLUMN_SMOOTH = 33  # running median of the column statistics over this many columns
MIN_SAMPLES = 64  # fewer samples: the next layer's statistics are used instead
MAX_SAMPLE_VALUES = 24_000_000  # per component: training maps are subsampled by rows above this
OFF_WEB = np.float32(0.0)
SCORE_FILE = "score.npz"
COMPONENT_NAMES: tuple[Component, ...] = ("dssim", "absdiff", "sqdiff", "vae")
End = Literal["top", "bottom"]


@dataclass(frozen=True, eq=False)
class Stats:
    """Robust centre and spread, one value per column (or zone distance, or row distance)."""

    center: F32
    scale: F32


def _stats(center: npt.ArrayLike, upper: npt.ArrayLike, min_spread: float = 0.0) -> Stats:
    c = np.asarray(center, dtype=np.float32)
    s = np.asarray(upper, dtype=np.float32) - c
    floor = np.float32(max(min_spread, 1e-6))
    return Stats(c, np.maximum(s, floor).astype(np.float32))


def _robust(values: npt.NDArray[np.floating[Any]]) -> tuple[float, float]:
    if values.size == 0:
        return 0.0, 1.0
    med, hi = np.quantile(values, [0.5, QUANTILE])
    return float(med), float(hi)


@dataclass(frozen=True, eq=False)
class ScoreModel:
    """Statistics of each residual component on defect-free material, and the web's edges."""

    width: int  # model columns of the images they were learned on
    columns: dict[Component, Stats]
    whole: dict[Component, tuple[float, float]]  # whole-image (centre, 99th percentile)
    zones: dict[tuple[Component, Side], Stats] = field(default_factory=dict)
    rows: dict[tuple[Component, End], Stats] = field(default_factory=dict)
    edges: EdgeModel | None = None
    zone: int = ZONE
    zone_out: int = ZONE_OUT
    row_depth: int = ROW_DEPTH
    learned: dict[str, Any] = field(default_factory=dict)

    def supports(self, kind: ResidualKind) -> bool:
        return all(c in self.columns for c in COMPONENTS[kind])

    # ---------------------------------------------------------------- storage

    def to_json(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "components": list(self.columns),
            "quantile": QUANTILE,
            "zone": self.zone,
            "zone_out": self.zone_out,
            "row_depth": self.row_depth,
            "edges": None if self.edges is None else self.edges.to_json(),
            "whole": {c: list(v) for c, v in self.whole.items()},
            "learned": self.learned,
        }

    def arrays(self) -> dict[str, F32]:
        out: dict[str, F32] = {}
        for comp, st in self.columns.items():
            out[f"columns.{comp}.center"], out[f"columns.{comp}.scale"] = st.center, st.scale
        for (comp, side), st in self.zones.items():
            out[f"zones.{comp}.{side}.center"] = st.center
            out[f"zones.{comp}.{side}.scale"] = st.scale
        for (comp, end), st in self.rows.items():
            out[f"rows.{comp}.{end}.center"], out[f"rows.{comp}.{end}.scale"] = st.center, st.scale
        return out


def score_to_bytes(model: ScoreModel) -> bytes:
    """The statistics as an ``.npz`` archive (plain float32 arrays: loads without pickle)."""
    buf = io.BytesIO()
    savez: Any = np.savez  # numpy's stub types **arrays as its allow_pickle flag
    savez(buf, **model.arrays())
    return buf.getvalue()


def score_from_bytes(data: bytes, record: Mapping[str, Any], where: str) -> ScoreModel:
    """Statistics from ``score.npz`` bytes (already checked against their checksum) and the
    ``score`` record of ``bundle.json``; ModelError naming what is wrong."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: np.asarray(npz[k], dtype=np.float32) for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{where}: {SCORE_FILE} is unreadable: {exc}") from exc
    try:
        width = int(record["width"])
        comps: list[Component] = [c for c in COMPONENT_NAMES if c in record["components"]]
        if len(comps) != len(record["components"]) or not comps:
            raise ValueError(f"unknown components {record['components']}")
        zone = int(record["zone"])
        zone_out = int(record.get("zone_out", zone))
        row_depth = int(record["row_depth"])
        edges = None if record.get("edges") is None else EdgeModel.from_json(record["edges"], where)

        def get(key: str, n: int) -> F32:
            a = arrays[key]
            if a.shape != (n,) or not np.isfinite(a).all():
                raise ValueError(f"{key} has shape {a.shape} (expected ({n},)) or is not finite")
            return a

        def stats(prefix: str, n: int) -> Stats:
            return Stats(get(f"{prefix}.center", n), get(f"{prefix}.scale", n))

        columns = {c: stats(f"columns.{c}", width) for c in comps}
        zones: dict[tuple[Component, Side], Stats] = {
            (c, side): stats(f"zones.{c}.{side}", 2 * zone + 1)
            for c in comps
            for side in SIDES
            if f"zones.{c}.{side}.center" in arrays
        }
        ends: tuple[End, ...] = ("top", "bottom")
        rows: dict[tuple[Component, End], Stats] = {
            (c, end): stats(f"rows.{c}.{end}", row_depth)
            for c in comps
            for end in ends
            if f"rows.{c}.{end}.center" in arrays
        }
        whole = {c: (float(record["whole"][c][0]), float(record["whole"][c][1])) for c in comps}
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{where}: {SCORE_FILE} or its record is malformed: {exc}") from exc
    return ScoreModel(
        width=width,
        columns=columns,
        whole=whole,
        zones=zones,
        rows=rows,
        edges=edges,
        zone=zone,
        zone_out=zone_out,
        row_depth=row_depth,
        learned=dict(record.get("learned") or {}),
    )


# -------------------------------------------------------------------- scoring


@dataclass(frozen=True, eq=False)
class Scoring:
    """How one bundle turns residual components into a score, at inspection."""

    kind: ResidualKind
    model: ScoreModel | None = None
    fixed_columns: tuple[int | None, int | None] | None = None  # model pixels, from the config

    def __post_init__(self) -> None:
        if self.model is None and self.kind == "combined":
            raise ModelError("the combined residual needs score statistics in the bundle")
        if self.model is not None and not self.model.supports(self.kind):
            raise ModelError(
                f"the bundle's score statistics cover {sorted(self.model.columns)}, not the "
                f"{self.kind} residual's components {list(COMPONENTS[self.kind])}"
            )

    @property
    def normalised(self) -> bool:
        return self.model is not None

    def per_column(self, width: int) -> bool:
        return self.model is not None and self.model.width == width

    def describe(self, width: int) -> str:
        """One line on how images of this width are scored."""
        if self.model is None:
            return f"raw {self.kind} residual (the bundle has no score statistics)"
        cols = (
            "per-column statistics"
            if self.per_column(width)
            else f"whole-image statistics (width {width} differs from the training width "
            f"{self.model.width}: no per-column statistics apply)"
        )
        edges = (
            f"web edges {', '.join(self.model.edges.sides)} tracked"
            if self.model.edges is not None and self.per_column(width)
            else "no web edges"
        )
        if self.fixed_columns is not None:
            edges = f"web columns fixed at {self.fixed_columns} (model px)"
        return f"normalised {self.kind} score, {cols}, {edges}"

    def edge_tracker(self, width: int) -> EdgeTracker:
        model = None
        if self.model is not None and self.per_column(width):
            model = self.model.edges
        return EdgeTracker(model, width, self.fixed_columns)

    def score(
        self,
        comps: Mapping[Component, F32],
        runs: Sequence[tuple[int, int, Edges]],
        row0: int,
        total_rows: int | None,
    ) -> F32:
        """Score rows [row0, row0 + n) of a segment from their component maps.

        ``runs`` gives the edges of every row (``EdgeTracker.edges_for``); ``total_rows`` is the
        segment's length when known (its end has been seen), for the last rows' statistics.
        """
        names = COMPONENTS[self.kind]
        first = comps[names[0]]
        n, width = first.shape
        if self.model is None:
            out: F32 = first.astype(np.float32, copy=True)
            if self.fixed_columns is not None:
                for a, b, edges in runs:
                    off = _off_web(width, edges)
                    out[a - row0 : b - row0, off] = OFF_WEB
            return out
        m = self.model
        out = np.empty((n, width), dtype=np.float32)
        for a, b, edges in runs:
            i, j = a - row0, b - row0
            best: F32 | None = None
            off = np.zeros(width, dtype=bool)
            for comp in names:
                center, scale, off = _layout(m, comp, width, edges, self.per_column(width))
                z = np.subtract(comps[comp][i:j], center[None, :], dtype=np.float32)
                np.divide(z, scale[None, :], out=z)
                self._rows(z, comp, a, total_rows)
                best = z if best is None else np.maximum(best, z, out=best)
            if best is None:  # pragma: no cover - every kind has a component
                raise RuntimeError("no components")
            if self.fixed_columns is not None:  # configured columns: nothing outside them
                off |= _off_web(width, edges)
            best[:, off] = OFF_WEB
            out[i:j] = best
        return out

    def _rows(self, z: F32, comp: Component, row0: int, total_rows: int | None) -> None:
        """The first and last ``row_depth`` rows of a segment against their own statistics."""
        m = self.model
        if m is None:  # pragma: no cover - callers check
            return
        n, depth = z.shape[0], m.row_depth
        rows = set(range(row0, min(row0 + n, depth)))
        if total_rows is not None:
            rows |= set(range(max(row0, total_rows - depth), min(row0 + n, total_rows)))
        for row in sorted(rows):
            picked = _row_stats(m, comp, row, total_rows)
            if picked is not None:
                st, d = picked
                np.subtract(z[row - row0], st.center[d], out=z[row - row0])
                np.divide(z[row - row0], st.scale[d], out=z[row - row0])


def _row_stats(
    m: ScoreModel, comp: Component, row: int, total_rows: int | None
) -> tuple[Stats, int] | None:
    """The statistics for a row near the segment's top or bottom (the nearer end), if any."""
    top = m.rows.get((comp, "top"))
    bottom = m.rows.get((comp, "bottom"))
    dist_bottom = None if total_rows is None else total_rows - 1 - row
    if (
        bottom is not None
        and dist_bottom is not None
        and dist_bottom < m.row_depth
        and (top is None or dist_bottom < row)
    ):
        return bottom, dist_bottom
    if top is not None and row < m.row_depth:
        return top, row
    return None


def _layout(
    m: ScoreModel, comp: Component, width: int, edges: Edges, per_column: bool
) -> tuple[F32, F32, npt.NDArray[np.bool_]]:
    """Centre and spread for every column of a block, and which columns are off the web."""
    if per_column:
        center = m.columns[comp].center.copy()
        scale = m.columns[comp].scale.copy()
    else:
        c, hi = m.whole[comp]
        center = np.full(width, c, np.float32)
        scale = np.full(width, max(hi - c, 1e-6), np.float32)
        cols_stats = m.columns[comp]
        k = min(BORDER, width // 2, cols_stats.center.size // 2)
        if k:  # the image's border columns as the training images' border columns
            center[:k], scale[:k] = cols_stats.center[:k], cols_stats.scale[:k]
            center[width - k :] = cols_stats.center[-k:]
            scale[width - k :] = cols_stats.scale[-k:]
    off = np.zeros(width, dtype=bool)
    cols = np.arange(width)
    z = m.zone
    for side in SIDES:
        e = getattr(edges, side)
        if e is None:
            continue
        # d: signed distance into the web from its first (left) or last (right) column
        d = cols - e if side == "left" else (e - 1) - cols
        off |= d < -m.zone_out
        stats = m.zones.get((comp, side))
        if stats is not None:
            inzone = (d >= -m.zone_out) & (d <= z)
            center[inzone] = stats.center[d[inzone] + z]
            scale[inzone] = stats.scale[d[inzone] + z]
    return center, scale, off


def _off_web(width: int, edges: Edges) -> npt.NDArray[np.bool_]:
    cols = np.arange(width)
    off = np.zeros(width, dtype=bool)
    if edges.left is not None:
        off |= cols < edges.left
    if edges.right is not None:
        off |= cols >= edges.right
    return off


def score_image(
    scoring: Scoring, comps: Mapping[Component, F32], x: F32
) -> tuple[F32, list[tuple[int, int, Edges]]]:
    """Offline: the score of a whole image (one segment) and the edges of its blocks."""
    h, w = x.shape
    edges = scoring.edge_tracker(w)
    edges.push(x)
    edges.finish()
    runs = edges.edges_for(0, h)
    return scoring.score(comps, runs, 0, h), runs


# -------------------------------------------------------------------- learning


def learn_score(
    inputs: Sequence[F32],
    maps: Sequence[Mapping[Component, F32]],
    *,
    edges: bool = True,
    learned: Mapping[str, Any] | None = None,
) -> ScoreModel:
    """Statistics of each component map on defect-free images (model scale), and their edges.

    ``inputs`` are the model inputs (for the edges), ``maps`` their component maps. Images of
    several widths give whole-image statistics only (``width`` 0: never per column).
    """
    if not inputs or len(inputs) != len(maps):
        raise ValueError("learn_score needs one map set per input image, and at least one")
    comps: list[Component] = [c for c in COMPONENT_NAMES if c in maps[0]]
    widths = {x.shape[1] for x in inputs}
    width = widths.pop() if len(widths) == 1 else 0
    edge_model = learn_edges(list(inputs)) if edges and width else None
    runs: list[list[tuple[int, int, Edges]]] = []
    for x in inputs:
        tr = EdgeTracker(edge_model, x.shape[1])
        tr.push(x)
        tr.finish()
        runs.append(tr.edges_for(0, x.shape[0]))
    # Rows kept per image: every k-th, so the samples stay within MAX_SAMPLE_VALUES.
    total = sum(x.size for x in inputs)
    step = max(1, int(np.ceil(total / MAX_SAMPLE_VALUES)))
    columns: dict[Component, Stats] = {}
    whole: dict[Component, tuple[float, float]] = {}
    zones: dict[tuple[Component, Side], Stats] = {}
    for comp in comps:
        interior: list[F32] = []
        # edge-zone samples: values and their zone index (distance + ZONE), per side
        zone_vals: dict[Side, list[F32]] = {s: [] for s in SIDES}
        zone_idx: dict[Side, list[npt.NDArray[np.intp]]] = {s: [] for s in SIDES}
        for x_maps, img_runs in zip(maps, runs, strict=True):
            r = x_maps[comp]
            cols = np.arange(r.shape[1])
            for a, b, e in img_runs:
                rows = r[a:b][::step] if step > 1 else r[a:b]
                kind = _column_kinds(r.shape[1], e)
                interior.append(np.where(kind[None, :] == INTERIOR, rows, np.float32(np.nan)))
                for side in SIDES:
                    pos = getattr(e, side)
                    if pos is None or edge_model is None:
                        continue
                    d = cols - pos if side == "left" else (pos - 1) - cols
                    inzone = np.abs(d) <= ZONE
                    if inzone.any():
                        zone_vals[side].append(rows[:, inzone].ravel())
                        zone_idx[side].append(np.tile(d[inzone] + ZONE, rows.shape[0]))
        inner = np.concatenate(interior) if width else None
        flat = (
            np.concatenate([m[comp][::step].ravel() for m in maps])
            if inner is None
            else inner[np.isfinite(inner)]
        )
        if flat.size > 4_000_000:
            flat = flat[:: int(np.ceil(flat.size / 4_000_000))]
        med, hi = _robust(flat)
        whole[comp] = (med, hi)
        if inner is not None:
            counts = np.isfinite(inner).sum(axis=0)
            with warnings.catch_warnings():  # all-NaN columns (off the web) are expected
                warnings.simplefilter("ignore", RuntimeWarning)
                qs = np.nanquantile(inner, [0.5, QUANTILE], axis=0)
            center = _running_median(np.where(counts >= MIN_SAMPLES, qs[0], med))
            upper = _running_median(np.where(counts >= MIN_SAMPLES, qs[1], hi))
            columns[comp] = _stats(center, upper, MIN_COLUMN_SPREAD * (hi - med))
        else:
            columns[comp] = _stats(np.empty(0), np.empty(0))
        if edge_model is not None:
            for side in edge_model.sides:
                cs, us = [], []
                vals = np.concatenate(zone_vals[side]) if zone_vals[side] else np.empty(0)
                idx = np.concatenate(zone_idx[side]) if zone_idx[side] else np.empty(0, np.intp)
                order = np.argsort(idx, kind="stable")
                bounds = np.searchsorted(idx[order], np.arange(2 * ZONE + 2))
                for k in range(2 * ZONE + 1):
                    v = vals[order[bounds[k] : bounds[k + 1]]]
                    m_, h_ = _robust(v) if v.size >= MIN_SAMPLES else (med, hi)
                    cs.append(m_)
                    us.append(h_)
                zones[(comp, side)] = _stats(cs, us, MIN_ZONE_SPREAD * (hi - med))
    model = ScoreModel(
        width=width or 0,
        columns=columns,
        whole=whole,
        zones=zones,
        edges=edge_model,
        learned=dict(learned or {}),
    )
    return _with_rows(model, inputs, maps, runs)


INTERIOR, ZONE_COL, OFF_COL = 2, 1, 0


def _column_kinds(width: int, edges: Edges) -> npt.NDArray[np.int8]:
    """For every column: interior web, edge zone or off the web."""
    kinds = np.full(width, INTERIOR, dtype=np.int8)
    cols = np.arange(width)
    for side in SIDES:
        e = getattr(edges, side)
        if e is None:
            continue
        d = cols - e if side == "left" else (e - 1) - cols
        inzone = (d >= -ZONE_OUT) & (d <= ZONE)
        kinds[inzone] = np.minimum(kinds[inzone], ZONE_COL)
        kinds[d < -ZONE_OUT] = OFF_COL
    return kinds


def _running_median(v: npt.ArrayLike, k: int = COLUMN_SMOOTH) -> F32:
    a = np.asarray(v, dtype=np.float64)
    if a.size < k:
        return a.astype(np.float32)
    pad = k // 2
    padded = np.pad(a, pad, mode="edge")
    win = np.lib.stride_tricks.sliding_window_view(padded, k)
    out: F32 = np.median(win, axis=1).astype(np.float32)
    return out


def _with_rows(
    model: ScoreModel,
    inputs: Sequence[F32],
    maps: Sequence[Mapping[Component, F32]],
    runs: Sequence[Sequence[tuple[int, int, Edges]]],
) -> ScoreModel:
    """Add the first and last rows' statistics, learned from the scores so far."""
    depth = model.row_depth
    tall = [i for i, x in enumerate(inputs) if x.shape[0] >= 2 * depth]
    if not tall:
        return model
    rows: dict[tuple[Component, End], Stats] = {}
    for comp in model.columns:
        top: list[list[F32]] = [[] for _ in range(depth)]
        bottom: list[list[F32]] = [[] for _ in range(depth)]
        for i in tall:
            x = inputs[i]
            h = x.shape[0]
            z = _z_learning(model, comp, maps[i][comp], runs[i])
            for d in range(depth):
                top[d].append(z[d][np.isfinite(z[d])])
                bottom[d].append(z[h - 1 - d][np.isfinite(z[h - 1 - d])])
        for end, samples in (("top", top), ("bottom", bottom)):
            cs, scales = [], []
            for s in samples:
                v = np.concatenate(s)
                m_, h_ = _robust(v) if v.size >= MIN_SAMPLES else (0.0, 1.0)
                # never raise a score: centre >= 0, spread >= 1 (see the module doc)
                cs.append(max(m_, 0.0))
                scales.append(max(h_ - m_, 1.0))
            rows[(comp, end)] = Stats(  # type: ignore[index]
                np.asarray(cs, np.float32), np.asarray(scales, np.float32)
            )
    return ScoreModel(
        width=model.width,
        columns=model.columns,
        whole=model.whole,
        zones=model.zones,
        rows=rows,
        edges=model.edges,
        zone=model.zone,
        row_depth=model.row_depth,
        learned=model.learned,
    )


def _z_learning(
    model: ScoreModel, comp: Component, r: F32, runs: Sequence[tuple[int, int, Edges]]
) -> F32:
    """One component normalised by columns and edge zones, off-web pixels NaN (for learning)."""
    out = np.empty(r.shape, dtype=np.float32)
    for a, b, e in runs:
        center, scale, off = _layout(model, comp, r.shape[1], e, model.width == r.shape[1])
        z = (r[a:b] - center[None, :]) / scale[None, :]
        z[:, off] = np.nan
        out[a:b] = z
    return out
