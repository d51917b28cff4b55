"""The ``linescan`` command: train | calibrate | inspect | evaluate | serve | demo | report | ...

Every subcommand is a thin shell around a library function; errors the user can fix
(``LinescanError``) print one clear line and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from linescan import __version__
from linescan.errors import LinescanError

if TYPE_CHECKING:
    from linescan.config import Config
    from linescan.replay import EventSource

Handler = Callable[[argparse.Namespace], int]


def _resize_arg(text: str) -> tuple[int, int]:
    try:
        if "x" in text:
            w, h = text.lower().split("x", 1)
            return int(w), int(h)
        return int(text), int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--resize wants N or WxH, got {text!r}") from exc


def _scale_arg(text: str) -> int:
    """--scale 1/2 or 0.5 -> block factor 2; only 1/n factors stream exactly."""
    try:
        value = (
            float(text.split("/")[0]) / float(text.split("/")[1]) if "/" in text else float(text)
        )
    except (ValueError, ZeroDivisionError) as exc:
        raise argparse.ArgumentTypeError(
            f"--scale wants a factor like 1/2 or 0.25, got {text!r}"
        ) from exc
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"--scale must be in (0, 1], got {text!r}")
    n = round(1 / value)
    if abs(1 / n - value) > 1e-6:
        raise argparse.ArgumentTypeError(
            f"--scale must be 1/n for a whole number n (1, 1/2, 1/3, 1/4, ...), got {text!r}"
        )
    return n


# --------------------------------------------------------------------------- train


def cmd_train(a: argparse.Namespace) -> int:
    _configure_threads(a.threads, pipelined=False)  # first: before torch starts OpenMP
    from linescan.backends import create_backend
    from linescan.calibrate import calibrate, format_kinds, format_points, store
    from linescan.model.bundle import load_bundle
    from linescan.preprocess import InputSpec
    from linescan.ssim import SSIMParams
    from linescan.train import TrainConfig, train

    if a.scale is not None and a.resize is not None:
        raise LinescanError("give either --scale or --resize, not both")
    if a.scale is not None:
        spec = InputSpec(downscale=a.scale)
    elif a.resize is not None:
        spec = InputSpec(resize=a.resize)
    else:
        spec = InputSpec(resize=(256, 256))  # the paper's default
    cfg = TrainConfig(
        data=a.data,
        out=a.out,
        loss=a.loss,
        latent=a.latent,
        patch=a.patch,
        patches=a.patches,
        epochs=a.epochs,
        batch=a.batch,
        lr=a.lr,
        weight_decay=a.weight_decay,
        input=spec,
        bit_depth=a.bit_depth,
        ssim=SSIMParams(window=a.ssim_window, gaussian=not a.ssim_uniform),
        seed=a.seed,
        device=a.device,
        precision=a.precision,
        checkpoint_every=a.checkpoint_every,
        resume=a.resume,
        holdout=a.holdout,
        fm_weights=a.fm_weights,
        name=a.name,
        command=" ".join(shlex.quote(x) for x in ["linescan", *sys.argv[1:]]),
        patience=a.patience,
        min_improvement=a.min_improvement,
        time_budget_s=a.time_budget,
        opening_px=None if a.opening == "paper" else int(a.opening),
    )
    res = train(cfg)
    print(
        f"saved {res.bundle} ({res.meta.model_id}); {res.epochs} epochs ({res.stopped}), "
        f"weights of epoch {res.best_epoch}, final loss {res.final_loss:.5f}, {res.seconds:.0f} s"
    )
    bundle = load_bundle(res.bundle)
    calib = res.holdout_images
    if not calib:
        from linescan.data.images import training_images

        calib = training_images(a.data)
        print(
            "no held-out images (fewer than 5 training images): calibrating on the training "
            "images themselves, which flatters the model; run `linescan calibrate` on more "
            "defect-free images"
        )
    cal = calibrate(
        calib,
        bundle.meta,
        create_backend(bundle),
        statistics="keep",  # learned on the training images; judged on images never seen
        progress=_progress,
    )
    store(res.bundle, cal)
    print(format_points(cal.record["operating_points"], cal.threshold))
    print(format_kinds(cal.record))
    print(
        f"threshold {cal.threshold:.4g} on the {cal.residual} score ({_rule_text(cal.record)}, "
        f"{len(calib)} image(s)); `linescan calibrate --data DIR` on more defect-free images "
        "refines it; README: Thresholds"
    )
    return 0


def _progress(message: str) -> None:
    print(f"  {message} ...", file=sys.stderr, flush=True)


def _rule_text(record: dict[str, Any]) -> str:
    rule = record["rule"]
    if rule == "budget":
        text = f"false-alarm budget {record['budget_per_mpx']:g}/Mpx"
        if record.get("budget_per_metre") is not None:
            text += f" = {record['budget_per_metre']:.3g}/m"
        if record.get("extrapolated"):
            text += ", extrapolated from the alarm tail"
        return text
    return str(rule)


# --------------------------------------------------------------------------- calibrate


def cmd_calibrate(a: argparse.Namespace) -> int:
    from dataclasses import replace

    from linescan.backends import create_backend
    from linescan.calibrate import calibrate, format_kinds, format_points, store
    from linescan.data.images import read_grey, test_samples, training_images
    from linescan.errors import DataError
    from linescan.model.bundle import load_bundle
    from linescan.pipeline import Settings
    from linescan.train import opening_diameter

    bundle = load_bundle(a.model)
    meta = bundle.meta
    if a.opening is not None:
        opening = (
            4 if a.opening == "paper" else opening_diameter(int(a.opening), meta.input.downscale)
        )
        meta = replace(meta, opening=opening)
    paths = training_images(a.data)
    defects = [s for s in test_samples(a.defects) if s.mask is not None] if a.defects else []
    if a.defects and not defects:
        raise DataError(f"{a.defects}: no defect images with ground-truth masks under test/")
    budget = a.alarms_per_mpx
    if a.alarms_per_metre is not None:
        if a.lines_per_metre is None:
            raise DataError("--alarms-per-metre needs --lines-per-metre (camera lines per metre)")
        width = read_grey(paths[0]).shape[1]
        budget = a.alarms_per_metre / (a.lines_per_metre * width / 1e6)
    backend = create_backend(bundle, a.backend, a.precision)
    cal = calibrate(
        paths,
        meta,
        backend,
        a.rule,
        a.margin,
        a.quantile,
        Settings(stride=a.stride, min_area_px=a.min_area),
        budget_per_mpx=budget,
        max_alarms_per_mpx=a.max_alarms_per_mpx,
        defects=defects,
        plants=a.plants,
        residual=a.residual,
        statistics="keep" if a.keep_statistics else "refresh",
        lines_per_metre=a.lines_per_metre,
        progress=None if a.json else _progress,
    )
    if not a.dry_run:
        if meta.opening != bundle.meta.opening:
            from linescan.model.bundle import update_meta

            update_meta(a.model, opening=meta.opening)
        store(a.model, cal)
    if a.json:
        print(json.dumps({"threshold": cal.threshold, **cal.record}, indent=2))
        return 0
    print(format_points(cal.record["operating_points"], cal.threshold))
    print(format_kinds(cal.record))
    stored = "printed only (--dry-run)" if a.dry_run else f"stored in {a.model}/bundle.json"
    print(
        f"\nthreshold {cal.threshold:.6g} on the {cal.residual} score by rule "
        f"{_rule_text(cal.record)} on {len(paths)} defect-free image(s)"
        + (f" and {len(defects)} labelled defect image(s)" if defects else "")
        + f"; {stored}. `--json` prints the whole record."
    )
    return 0


# --------------------------------------------------------------------------- inspect


def cmd_inspect(a: argparse.Namespace) -> int:
    import cv2

    from linescan.backends import create_backend
    from linescan.data.images import read_grey
    from linescan.model.bundle import load_bundle
    from linescan.pipeline import Settings, inspect_image
    from linescan.render import full_mask, heat_map, overlay, to_display

    bundle = load_bundle(a.model)
    meta = bundle.meta
    backend = create_backend(bundle, a.backend, a.precision, batch=a.batch)
    a.out.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        threshold=a.threshold, stride=a.stride, max_batch=a.batch, min_area_px=a.min_area
    )
    total = 0
    for path in a.images:
        t0 = time.perf_counter()
        img = read_grey(path)
        res = inspect_image(img, meta, backend, settings)
        h, w = img.shape
        mask = full_mask(res.mask, h, w, meta.input)
        stem = path.stem
        cv2.imwrite(str(a.out / f"{stem}_mask.png"), mask)
        cv2.imwrite(
            str(a.out / f"{stem}_residual.png"),
            heat_map(res.score, res.threshold, h, w, meta.input),
        )
        cv2.imwrite(
            str(a.out / f"{stem}_overlay.png"), overlay(to_display(img, meta.input.bit_depth), mask)
        )
        seconds = time.perf_counter() - t0
        doc = {
            "image": str(path),
            "width": w,
            "height": h,
            "model": meta.model_id,
            "threshold": res.threshold,
            "residual": meta.residual,
            "score": meta.scoring().describe(res.score.shape[1]),
            "seconds": round(seconds, 3),
            "regions": [r.to_dict() for r in res.regions],
        }
        (a.out / f"{stem}_regions.json").write_text(json.dumps(doc, indent=2) + "\n")
        total += len(res.regions)
        print(f"{path}: {len(res.regions)} defect region(s) in {seconds:.2f} s")
    print(f"{total} region(s) in {len(a.images)} image(s); pictures and JSON in {a.out}")
    return 0


# --------------------------------------------------------------------------- evaluate


def cmd_evaluate(a: argparse.Namespace) -> int:
    from linescan.backends import create_backend
    from linescan.evaluation_run import run_evaluation
    from linescan.model.bundle import load_bundle
    from linescan.pipeline import Settings

    bundle = load_bundle(a.model)
    backend = create_backend(bundle, a.backend, a.precision)
    ev = run_evaluation(
        a.data,
        bundle.meta,
        backend,
        a.out,
        stride=a.stride,
        residual=a.residual,
        name=bundle.meta.name,
        settings=Settings(threshold=a.threshold, min_area_px=a.min_area),
    )
    print(json.dumps(ev, indent=2))
    return 0


# --------------------------------------------------------------------------- daemon


def _serve_config(a: argparse.Namespace) -> Config:
    from linescan.config import apply_overrides, load_config

    config = load_config(a.config)
    return apply_overrides(
        config,
        model=a.model,
        frames=a.frames,
        events=a.events,
        metrics=a.metrics,
        backend=getattr(a, "backend", None),
    )


def cmd_serve(a: argparse.Namespace) -> int:
    from linescan.log import configure_logging, get_logger

    config = _serve_config(a)
    configure_logging(config.log.format, config.log.level)
    log = get_logger("linescan.serve")
    # threads first: OpenMP reads its wait policy once, when torch is first imported
    plan = _configure_threads(config.engine.threads)
    log.info("threads", **plan)
    config = _journal_default(config, log)

    from linescan import sdnotify
    from linescan.backends import create_backend
    from linescan.demo import default_bundle_path
    from linescan.metrics import MetricsServer
    from linescan.model.bundle import load_bundle
    from linescan.service import Daemon

    bundle = load_bundle(config.model.bundle or default_bundle_path())
    # A first start on a GPU builds the TensorRT engine (minutes): keep systemd from timing out.
    with sdnotify.starting(
        f"loading {bundle.meta.name} on {config.engine.backend} (a first "
        "TensorRT start builds the engine: minutes)"
    ):
        backend = create_backend(
            bundle,
            config.engine.backend,
            config.engine.precision,
            config.engine.threads,
            batch=config.inspection.max_batch,
            device=config.engine.device,
        )
    daemon = Daemon(config, bundle.meta, backend)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = None
    if config.metrics.enabled:
        server = MetricsServer(
            daemon.registry,
            config.metrics.host,
            config.metrics.port,
            lambda: daemon.ready,
            app=daemon.view if config.metrics.page else None,
        )
        server.start()
        if config.metrics.page:
            from linescan.live import page_url

            log.info("live page", url=page_url(config.metrics.host, server.port))
    daemon.start()
    sdnotify.ready()
    choice = daemon.stride_choice
    sdnotify.status(
        f"inspecting frames from {daemon.frames_endpoint} at stride {daemon.grid.stride}"
        + ("" if choice is None else f" (auto: {choice.describe()})")
    )
    interval = sdnotify.watchdog_interval_s() or 1.0
    while not stop.wait(min(interval, 1.0)):
        if not daemon.alive():
            break  # a thread died: stop pinging, let systemd restart us
        sdnotify.watchdog()
    sdnotify.stopping()
    log.info("stopping: finishing frames in flight")
    daemon.stop()
    drained = daemon.join(60)
    if server is not None:
        server.stop()
    if daemon.errors or not drained:
        log.error("stopped with errors", errors=[str(e) for e in daemon.errors], drained=drained)
        return 1
    log.info("stopped", **{k: v for k, v in vars(daemon.totals).items() if isinstance(v, int)})
    return 0


def _journal_default(config: Config, log: Any) -> Config:
    """``serve`` journals to $STATE_DIRECTORY/journal.sqlite unless the config says otherwise."""
    from linescan.journal import default_journal_path

    jc = config.journal
    if not jc.enabled or jc.path is not None:
        if not jc.enabled:
            log.warning("event journal disabled: events cannot be replayed, seq restarts at 0")
        return config
    path = default_journal_path()
    if path is None:
        log.warning(
            "no event journal: set journal.path (systemd's StateDirectory= sets a default); "
            "events cannot be replayed and seq restarts at 0"
        )
        return config
    return config.with_overrides({"journal": {"path": path}})


def _configure_threads(threads: int | None, pipelined: bool = True) -> dict[str, object]:
    """Size the thread pools before torch starts its own (see ``linescan/threads.py``)."""
    from linescan.threads import configure_threads

    plan = configure_threads(threads, pipelined=pipelined)
    return dict(vars(plan)) if hasattr(plan, "__dict__") else {"plan": str(plan)}


def cmd_check_config(a: argparse.Namespace) -> int:
    from linescan.config import check_config

    errors = check_config(a.file)
    for e in errors:
        print(e)
    if errors:
        print(f"{a.file}: {len(errors)} error(s)", file=sys.stderr)
        return 1
    print(f"{a.file}: ok")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from linescan.config import apply_overrides, load_config
    from linescan.log import configure_logging

    config = apply_overrides(
        load_config(a.config),
        model=a.model,
        frames=a.frames,
        events=a.events,
        metrics=a.metrics,
    )
    configure_logging("console" if sys.stderr.isatty() else "json", "warning")
    _configure_threads(config.engine.threads)  # before torch is imported
    from linescan.demo import run_demo

    res = run_demo(
        config,
        lines=a.lines,
        width=a.width,
        frame_height=a.frame_height,
        defects=a.defects,
        line_rate_hz=a.line_rate,
        seed=a.seed,
        hold=a.hold,
    )
    ok = res.final_status is not None and len(res.found()) > 0
    return 0 if ok else 1


def cmd_report(a: argparse.Namespace) -> int:
    from linescan.report import load_report, write_report

    if a.since < 0:
        raise LinescanError("--since must be a defect seq >= 0")
    report = load_report(a.journal, a.since, a.camera)
    if not report.events:
        camera = f" of camera {a.camera}" if a.camera else ""
        report.notes.append(f"no defect events{camera} from seq {a.since} in {a.journal}")
    try:
        wrote = write_report(report, a.out)
    except OSError as exc:
        raise LinescanError(f"cannot write the report to {a.out}: {exc}") from exc
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    print(
        f"wrote {a.out / 'index.html'} ({wrote['html_entries']} defects, "
        f"{wrote['pictures']} pictures), {a.out / 'defects.csv'} ({wrote['csv_rows']} rows), "
        f"{a.out / 'rollmap.png'}"
    )
    return 0


def cmd_synth(a: argparse.Namespace) -> int:
    from linescan.data.synthetic import write_synthetic_dataset

    path = write_synthetic_dataset(
        a.out, a.kind, a.train, a.test_good, a.test_defect, a.size, a.seed
    )
    print(f"wrote {a.kind} dataset to {path}")
    return 0


def cmd_events(a: argparse.Namespace) -> int:
    from linescan.listen import listen

    endpoints = a.endpoint or [DEFAULT_EVENTS]
    if len(endpoints) > 1 or any(_named(e)[0] is not None for e in endpoints):
        return _events_many(a, endpoints)
    if a.since is not None or a.journal is not None or a.server_key is not None:
        return _events_replay(a)
    record = a.record.open("a", encoding="utf-8") if a.record else None
    topics = tuple(a.topic) if a.topic else ("defect", "status")

    on_event = _event_printer(a.quiet, record)

    try:
        tracker = listen(endpoints[0], on_event, topics, timeout_s=a.timeout)
    finally:
        if record is not None:
            record.close()
    print(f"lost defect events: {tracker.lost_defects} {tracker.gaps}", file=sys.stderr)
    return 1 if tracker.lost_defects else 0


DEFAULT_EVENTS = "tcp://127.0.0.1:5556"
DEFAULT_REPLAY = "tcp://127.0.0.1:5557"


def _named(text: str) -> tuple[str | None, str]:
    """``NAME=VALUE`` -> (NAME, VALUE); a plain ``VALUE`` -> (None, VALUE). A ZeroMQ endpoint
    never holds ``=`` before its ``://``, so the two cannot be confused."""
    name, sep, value = text.partition("=")
    if sep and "://" not in name and name:
        return name, value
    return None, text


def event_sources(
    endpoints: Sequence[str],
    replays: Sequence[str] | None,
    server_keys: Sequence[Path] | None = None,
) -> list[EventSource]:
    """The daemons ``linescan events`` follows, from its repeated ``--endpoint [NAME=]EP``,
    ``--replay [NAME=]EP`` and ``--server-key FILE`` (raises ConfigError).

    A source is named by its ``NAME=`` or else by its endpoint. Replay endpoints go with
    sources by name, or else in the order given (one per endpoint); none at all means live
    only. One server key serves every source, or one is given per source, in order.
    """
    from linescan.errors import ConfigError
    from linescan.replay import EventSource
    from linescan.security import client_setup, load_public_key

    named = [_named(e) for e in endpoints]
    names = [n if n is not None else ep for n, ep in named]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"--endpoint: the source name(s) {dupes} are given twice")
    by_name: dict[str, str] = {}
    in_order: list[str] = []
    for r in replays or ():
        n, ep = _named(r)
        if n is None:
            in_order.append(ep)
        elif n not in names:
            raise ConfigError(f"--replay {r}: no --endpoint is named {n!r} (names: {names})")
        else:
            by_name[n] = ep
    unnamed = [n for n in names if n not in by_name]
    if in_order and len(in_order) != len(unnamed):
        raise ConfigError(
            f"{len(in_order)} unnamed --replay endpoint(s) for {len(unnamed)} source(s) without "
            "a named one: give one per --endpoint, in the same order, or name them "
            "(--endpoint cam1=tcp://... --replay cam1=tcp://...)"
        )
    by_name.update(zip(unnamed, in_order, strict=False))
    keys = list(server_keys or ())
    if len(keys) not in (0, 1, len(names)):
        raise ConfigError(
            f"{len(keys)} --server-key files for {len(names)} sources: give one for all, or "
            "one per --endpoint in the same order"
        )
    sources = []
    for i, (name, (_, ep)) in enumerate(zip(names, named, strict=True)):
        key = keys[0] if len(keys) == 1 else keys[i] if keys else None
        configure = None if key is None else client_setup(load_public_key(key, "--server-key"))
        sources.append(EventSource(name, ep, by_name.get(name), configure))
    return sources


def _events_many(a: argparse.Namespace, endpoints: list[str]) -> int:
    """``events --endpoint A --endpoint B ...``: several daemons at once, each event tagged
    with its source; with ``--since``, each source replays and fills its gaps from its own
    journal."""
    from linescan.errors import ConfigError
    from linescan.replay import follow_many

    if a.journal is not None:
        raise ConfigError("--journal reads one daemon's file; it does not go with --endpoint")
    sources = event_sources(endpoints, a.replay, a.server_key)
    since: dict[str, int | None] = {}
    for s in sources:
        want = _since_for(a.since, s.name)
        if want is not None and s.replay is None:
            raise ConfigError(
                f"--since for {s.name}: replaying needs its replay endpoint (--replay "
                f"{s.name}=tcp://HOST:PORT, the daemon's journal.replay_endpoint)"
            )
        since[s.name] = want
    record = a.record.open("a", encoding="utf-8") if a.record else None
    topics = tuple(a.topic) if a.topic else ("defect", "status")
    printer = _event_printer(a.quiet, record)

    def on_event(source: str, topic: str, body: dict[str, object]) -> bool:
        return printer(topic, {"source": source, **body})

    # Ctrl-C or SIGTERM ends the subscription, and the loss summary below is still printed.
    stop = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    in_main = threading.current_thread() is threading.main_thread()
    try:
        if in_main:
            for sig in previous:
                signal.signal(sig, lambda _n, _f: stop.set())
        if a.replay_only:
            for s in sources:
                events = _replay_source(s, since[s.name] or 0)
                for body in events:
                    on_event(s.name, "defect", body)
                print(f"{s.name}: replayed {len(events)} defect event(s)", file=sys.stderr)
            return 0
        stats = follow_many(
            sources, on_event, since, topics=topics, timeout_s=a.timeout, should_stop=stop.is_set
        )
    finally:
        if in_main:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if record is not None:
            record.close()
    for name, st in stats.items():
        print(
            f"{name}: defect events: {st.replayed} replayed, {st.live} live; lost: "
            f"{st.lost_events} {st.lost}",
            file=sys.stderr,
        )
    return 1 if any(st.lost_events for st in stats.values()) else 0


def _replay_source(source: EventSource, since: int) -> list[dict[str, Any]]:
    from linescan.errors import ConfigError
    from linescan.replay import fetch_all

    if source.replay is None:
        raise ConfigError(f"--replay-only: {source.name} has no --replay endpoint")
    return fetch_all(source.replay, since, configure=source.configure)


def _since_for(values: Sequence[str] | None, name: str) -> int | None:
    """The ``--since`` that applies to source ``name``: its own ``NAME=SEQ``, else a plain
    ``SEQ``, else None (live only)."""
    plain: int | None = None
    for v in values or ():
        n, seq = _named(v)
        if n == name:
            return _seq(seq)
        if n is None:
            plain = _seq(seq)
    return plain


def _seq(text: str) -> int:
    from linescan.errors import ConfigError

    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"--since wants SEQ or NAME=SEQ with SEQ >= 0, got {text!r}") from None
    if value < 0:
        raise ConfigError(f"--since wants SEQ >= 0, got {value}")
    return value


def _event_printer(quiet: bool, record: TextIO | None) -> Callable[[str, dict[str, object]], bool]:
    """Print each event as a JSON line (unless quiet) and append it to ``record``."""

    def on_event(topic: str, body: dict[str, object]) -> bool:
        line = json.dumps({"topic": topic, **body}, separators=(",", ":"))
        if not quiet:
            print(line, flush=True)
        if record is not None:
            record.write(line + "\n")
            record.flush()
        return False

    return on_event


def _events_replay(a: argparse.Namespace) -> int:
    """``events --since N`` / ``--journal FILE``: journaled events first, then live, no gaps."""
    from linescan.errors import ConfigError
    from linescan.journal import read_journal
    from linescan.replay import fetch_all, follow
    from linescan.security import client_setup, load_public_key

    record = a.record.open("a", encoding="utf-8") if a.record else None
    topics = tuple(a.topic) if a.topic else ("defect", "status")
    configure = None
    if a.server_key:
        if len(a.server_key) > 1:
            raise ConfigError("one daemon, one --server-key")
        configure = client_setup(load_public_key(a.server_key[0], "--server-key"))
    if a.replay and len(a.replay) > 1:
        raise ConfigError("one daemon, one --replay endpoint")
    replay_endpoint = a.replay[0] if a.replay else DEFAULT_REPLAY
    endpoint = a.endpoint[0] if a.endpoint else DEFAULT_EVENTS
    given = [_seq(v) for v in a.since or ()]
    if len(given) > 1:
        raise ConfigError("one daemon, one --since")

    on_event = _event_printer(a.quiet, record)

    try:
        since = given[0] if given else 0
        if a.journal is not None or a.replay_only:
            events = (
                read_journal(a.journal, since)
                if a.journal is not None
                else fetch_all(replay_endpoint, since, configure=configure)
            )
            for body in events:
                on_event("defect", body)
            print(f"replayed {len(events)} defect event(s) from seq {since}", file=sys.stderr)
            return 0
        stats = follow(
            endpoint,
            replay_endpoint,
            on_event,
            given[0] if given else None,
            topics=topics,
            timeout_s=a.timeout,
            configure=configure,
        )
    finally:
        if record is not None:
            record.close()
    print(
        f"defect events: {stats.replayed} replayed, {stats.live} live; "
        f"lost (not in the journal either): {stats.lost_events} {stats.lost}",
        file=sys.stderr,
    )
    return 1 if stats.lost_events else 0


def cmd_keygen(a: argparse.Namespace) -> int:
    from linescan.security import create_keys

    for name in a.names:
        public, secret = create_keys(a.dir, name)
        print(f"{name}: public key {public} (share it), secret key {secret} (keep it, mode 600)")
    print(
        "daemon: frames.curve_server_secret_key_file / events.curve_server_secret_key_file = "
        "a server's .key_secret; copy each camera's .key into frames.curve_authorized_keys_dir"
    )
    return 0


def _patch_arg(text: str) -> int:
    if text == "auto":
        return 0
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--patch wants auto or a number, got {text!r}") from exc
    if value < 16 or value % 16:
        raise argparse.ArgumentTypeError(f"--patch must be a multiple of 16, got {text!r}")
    return value


def _duration_arg(text: str) -> float:
    """45m, 2h, 900s or 900 -> seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    try:
        scale = units.get(text[-1:], 1.0)
        value = float(text[:-1] if text[-1:] in units else text) * scale
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"a duration like 45m, 2h or 900s, got {text!r}") from exc
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a positive duration, got {text!r}")
    return value


def _size_arg(text: str) -> tuple[int, int]:
    """HxW (or N for a square) -> (height, width)."""
    return _resize_arg(text)


# --------------------------------------------------------------------------- parser


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="torch", help="torch (default), onnxruntime, tensorrt")
    p.add_argument("--precision", default="auto", help="auto (bf16 where native), fp32, bf16")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="linescan",
        description="Streaming unsupervised defect inspection for line-scan cameras.",
    )
    ap.add_argument("--version", action="version", version=f"linescan {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train an autoencoder on defect-free images")
    t.add_argument(
        "--data",
        type=Path,
        required=True,
        help="MVTec-layout category (train/good/*.png) or a folder of images",
    )
    t.add_argument("--out", type=Path, required=True, help="model bundle directory to write")
    t.add_argument("--loss", choices=["ssim", "l2", "vae", "fm"], default="ssim")
    t.add_argument("--latent", type=int, default=100, help="latent size d (paper: 100)")
    t.add_argument(
        "--patch",
        type=_patch_arg,
        default=0,
        help="patch size (multiple of 16); default auto: the paper's 128, or 64/32 where the "
        "images are shorter than two 128-px patches at the model's scale",
    )
    t.add_argument("--patches", type=int, default=10_000, help="random crops (paper: 10,000)")
    t.add_argument(
        "--epochs",
        type=int,
        default=200,
        help="most epochs (paper: 200); training stops earlier when the held-out loss stops "
        "improving (--patience)",
    )
    t.add_argument(
        "--patience",
        type=int,
        default=5,
        help="stop after this many epochs without a held-out improvement (0: train --epochs)",
    )
    t.add_argument(
        "--min-improvement",
        type=float,
        default=0.01,
        help="relative improvement of the held-out loss that resets the patience (0.01 = 1 %%)",
    )
    t.add_argument(
        "--time-budget",
        type=_duration_arg,
        default=None,
        help="stop after this long (e.g. 45m, 2h, 900s), keeping the best weights so far",
    )
    t.add_argument(
        "--opening",
        default="4",
        help="opening disk diameter in camera pixels (default 4: a 4-px scratch survives any "
        "scale), or 'paper' for the paper's 4 model pixels",
    )
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--weight-decay", type=float, default=1e-5)
    t.add_argument(
        "--resize",
        type=_resize_arg,
        default=None,
        help="resize every image to N or WxH (default 256x256, the paper's)",
    )
    t.add_argument(
        "--scale",
        type=_scale_arg,
        default=None,
        help="down-scale by 1/n instead (keeps the aspect ratio; streamable)",
    )
    t.add_argument(
        "--bit-depth",
        type=int,
        default=None,
        help="significant bits of 16-bit images (default: 8 or 16 from the files)",
    )
    t.add_argument("--ssim-window", type=int, default=11, help="SSIM window K (odd)")
    t.add_argument("--ssim-uniform", action="store_true", help="uniform instead of Gaussian window")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: every core this process may use; on a busy machine 1 "
        "thread per process is often faster than oversubscribing)",
    )
    t.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    t.add_argument("--precision", default="auto", help="auto, fp32 or bf16 (CPU autocast)")
    t.add_argument("--checkpoint-every", type=int, default=10, help="epochs between checkpoints")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    t.add_argument(
        "--holdout",
        type=float,
        default=0.1,
        help="fraction of images kept out of training to calibrate the threshold",
    )
    t.add_argument(
        "--fm-weights", type=Path, default=None, help="AlexNet conv1-3 weights file for --loss fm"
    )
    t.add_argument("--name", default=None, help="model name (default: the bundle folder name)")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("calibrate", help="set a bundle's threshold from defect-free images")
    c.add_argument("--model", type=Path, required=True)
    c.add_argument(
        "--data",
        type=Path,
        required=True,
        help="defect-free images (MVTec layout: train/good) or a folder",
    )
    c.add_argument(
        "--rule",
        choices=["budget", "max-opened", "quantile", "alarm-rate"],
        default="budget",
        help="budget (default): the lowest threshold within a false-alarm budget",
    )
    c.add_argument(
        "--alarms-per-mpx",
        type=float,
        default=0.05,
        help="false-alarm budget per megapixel of defect-free web (default 0.05)",
    )
    c.add_argument(
        "--alarms-per-metre",
        type=float,
        default=None,
        help="the budget per metre of web instead (with --lines-per-metre)",
    )
    c.add_argument(
        "--lines-per-metre", type=float, default=None, help="camera lines per metre of web"
    )
    c.add_argument(
        "--plants",
        type=int,
        default=2,
        help="copies of each image with synthetic defects planted, to measure what each "
        "threshold finds (0: none)",
    )
    c.add_argument(
        "--residual",
        choices=["auto", "keep", "ssim", "l2", "combined"],
        default="auto",
        help="auto (default): the residual that finds the most synthetic defects",
    )
    c.add_argument(
        "--keep-statistics",
        action="store_true",
        help="keep the bundle's score statistics (default: learn them from these images)",
    )
    c.add_argument(
        "--opening",
        default=None,
        help="opening disk diameter in camera pixels, or 'paper' (default: the bundle's)",
    )
    c.add_argument("--margin", type=float, default=1.1, help="factor on the max-opened value")
    c.add_argument(
        "--quantile", type=float, default=0.999, help="pixel quantile for --rule quantile"
    )
    c.add_argument(
        "--max-alarms-per-mpx",
        type=float,
        default=0.1,
        help="false alarms per megapixel of defect-free web allowed by --rule alarm-rate",
    )
    c.add_argument(
        "--defects",
        type=Path,
        default=None,
        help="labelled defect images (MVTec layout: test/<type>, ground_truth/<type>): the "
        "table then shows how many defects each threshold finds",
    )
    c.add_argument(
        "--min-area", type=int, default=0, help="ignore regions under this many camera pixels"
    )
    c.add_argument("--stride", type=int, default=None)
    c.add_argument("--dry-run", action="store_true", help="print, do not store in the bundle")
    c.add_argument("--json", action="store_true", help="print the whole record as JSON")
    _add_engine_args(c)
    c.set_defaults(func=cmd_calibrate)

    i = sub.add_parser(
        "inspect", help="inspect images offline; write mask, heat map, overlay, JSON"
    )
    i.add_argument("--model", type=Path, required=True)
    i.add_argument("images", type=Path, nargs="+")
    i.add_argument("--out", type=Path, required=True)
    i.add_argument("--threshold", type=float, default=None, help="override the bundle's")
    i.add_argument("--stride", type=int, default=None, help="tile stride (bundle default: 30)")
    i.add_argument("--batch", type=int, default=64)
    i.add_argument("--min-area", type=int, default=0, help="drop regions smaller than this (px)")
    _add_engine_args(i)
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("evaluate", help="pixel ROC/AUC, PRO and region overlap on a test set")
    e.add_argument("--model", type=Path, required=True)
    e.add_argument("--data", type=Path, required=True, help="MVTec-layout category")
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--stride", type=int, default=None)
    e.add_argument(
        "--residual",
        choices=["ssim", "l2", "vae", "combined"],
        default=None,
        help="score with another residual than the bundle's (cross terms)",
    )
    e.add_argument("--threshold", type=float, default=None, help="override the bundle's")
    e.add_argument(
        "--min-area", type=int, default=0, help="ignore regions under this many camera pixels"
    )
    _add_engine_args(e)
    e.set_defaults(func=cmd_evaluate)
    for name, helptext in (
        ("serve", "run the inspection daemon"),
        ("demo", "the daemon with the bundled model, fed a simulated web"),
    ):
        d = sub.add_parser(name, help=helptext)
        d.add_argument("--config", type=Path, default=None, help="TOML file (default: built-in)")
        d.add_argument("--model", type=Path, default=None, help="model bundle directory")
        d.add_argument("--frames", default=None, help="frame endpoint (tcp://127.0.0.1:5555)")
        d.add_argument("--events", default=None, help="event endpoint (tcp://127.0.0.1:5556)")
        d.add_argument("--metrics", default=None, help="metrics ADDR:PORT (127.0.0.1:9108)")
        if name == "serve":
            d.add_argument("--backend", default=None, help="override engine.backend")
            d.set_defaults(func=cmd_serve)
        else:
            d.add_argument("--lines", type=int, default=24_000, help="web length in lines")
            d.add_argument("--width", type=int, default=2048, help="pixels per line")
            d.add_argument("--frame-height", type=int, default=256)
            d.add_argument("--defects", type=int, default=8, help="defects to plant")
            d.add_argument(
                "--line-rate",
                type=float,
                default=None,
                help="lines per second (default: 60%% of the capacity measured at start; "
                "0: as fast as the daemon takes them)",
            )
            d.add_argument("--seed", type=int, default=7)
            d.add_argument(
                "--hold",
                action="store_true",
                help="keep the live page up after the summary, until Ctrl-C",
            )
            d.set_defaults(func=cmd_demo)

    cc = sub.add_parser("check-config", help="validate a config file; print every error")
    cc.add_argument("file", type=Path)
    cc.set_defaults(func=cmd_check_config)

    sy = sub.add_parser("synth", help="write a synthetic MVTec-layout dataset (toy or woven)")
    sy.add_argument("--kind", choices=["toy", "woven"], default="woven")
    sy.add_argument("--out", type=Path, required=True)
    sy.add_argument("--train", type=int, default=40)
    sy.add_argument("--test-good", type=int, default=4)
    sy.add_argument("--test-defect", type=int, default=8)
    sy.add_argument("--size", type=_size_arg, default=(512, 1024), help="HxW (default 512x1024)")
    sy.add_argument("--seed", type=int, default=0)
    sy.set_defaults(func=cmd_synth)

    ev = sub.add_parser(
        "events",
        help="subscribe to one or several daemons' events; print or record them",
        description="Print or record defect and status events as JSON lines. Several daemons "
        "at once: repeat --endpoint (and --replay, in the same order or by NAME=); every line "
        "then carries the event's source, and each source replays and fills gaps from its own "
        "journal.",
    )
    ev.add_argument(
        "--endpoint",
        action="append",
        default=None,
        metavar="[NAME=]EP",
        help=f"a daemon's event endpoint (default {DEFAULT_EVENTS}); repeat for several "
        "daemons; NAME tags its events (default: the endpoint)",
    )
    ev.add_argument("--topic", action="append", choices=["defect", "status"], default=None)
    ev.add_argument("--record", type=Path, default=None, help="append events as JSON lines")
    ev.add_argument("--timeout", type=float, default=None, help="stop after S idle seconds")
    ev.add_argument("--quiet", action="store_true")
    ev.add_argument(
        "--since",
        action="append",
        default=None,
        metavar="[NAME=]SEQ",
        help="first replay defect events from SEQ on out of the daemon's journal, then follow "
        "live events, filling any gap from the journal; NAME=SEQ for one source of several",
    )
    ev.add_argument(
        "--replay",
        action="append",
        default=None,
        metavar="[NAME=]EP",
        help=f"the daemon's replay endpoint (default {DEFAULT_REPLAY} for one daemon); with "
        "several --endpoint, one per endpoint in the same order, or NAME=EP",
    )
    ev.add_argument(
        "--journal",
        type=Path,
        default=None,
        help="read this journal file directly instead (prints events from --since, exits)",
    )
    ev.add_argument("--replay-only", action="store_true", help="exit after the replay")
    ev.add_argument(
        "--server-key",
        type=Path,
        action="append",
        default=None,
        help="CurveZMQ public key file of the daemon's event socket (one for all sources, or "
        "one per --endpoint in the same order)",
    )
    ev.set_defaults(func=cmd_events)

    rp = sub.add_parser(
        "report", help="a roll report from the event journal: index.html, defects.csv, rollmap.png"
    )
    rp.add_argument("--journal", type=Path, required=True, help="the daemon's journal file")
    rp.add_argument("--since", type=int, default=0, metavar="SEQ", help="from this event on")
    rp.add_argument("--camera", default=None, help="only this camera's defects")
    rp.add_argument("--out", type=Path, required=True, help="directory to write the report in")
    rp.set_defaults(func=cmd_report)

    kg = sub.add_parser("keygen", help="write CurveZMQ key pairs (NAME.key, NAME.key_secret)")
    kg.add_argument("dir", type=Path, help="directory to write the keys in")
    kg.add_argument("names", nargs="*", default=["server"], help="key pair names (server)")
    kg.set_defaults(func=cmd_keygen)

    from linescan.cli_gpu import add_parsers as add_gpu_parsers

    add_gpu_parsers(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Handler = args.func
    try:
        return func(args)
    except LinescanError as exc:
        print(f"linescan {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"linescan {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
