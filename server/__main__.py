"""Command line: `python -m server serve | models fetch | models build-offline | db upgrade | db replay-spill |
bench`."""

import argparse
import socket
import sys
from pathlib import Path

from server.core.config import get_settings
from server.core.logging import configure as configure_logging
from server.core.logging import log_config


def _check_free(host: str, port: int) -> None:
    """Fail at once, with one line, when the address is taken: uvicorn would first load the models and migrate the
    database (seconds to minutes), then fail."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is not "taken"
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise SystemExit(
                f"cannot listen on {host}:{port}: {exc.strerror or exc} (another server running? set PORT or --port)"
            ) from None


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from server.ml.device import DeviceRefused, placements

    settings = get_settings()
    try:
        # Here as well as at startup: uvicorn would print the refusal inside a traceback.
        placements(settings)
    except DeviceRefused as refused:
        raise SystemExit(str(refused)) from None
    host, port = args.host or settings.host, args.port or settings.port
    _check_free(host, port)
    uvicorn.run(
        "server.main:app",
        host=host,
        port=port,
        log_config=log_config(settings.log_level, settings.log_format),
        log_level=settings.log_level,
        access_log=False,
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        # A backstop: the app cuts what is still open at SHUTDOWN_TIMEOUT_S, with a JSON 503 (api/drain.py).
        timeout_graceful_shutdown=settings.shutdown_timeout_s + 1,  # type: ignore[arg-type]  # a float works
        timeout_keep_alive=settings.keep_alive_timeout_s,
        limit_concurrency=settings.max_connections,
        http=settings.http_parser,
        h11_max_incomplete_event_size=settings.max_header_bytes,
    )


def fetch_models(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    settings = get_settings()
    for model_id, model_class in (
        (settings.generator_model, AutoModelForCausalLM),
        (settings.sentiment_model, AutoModelForSequenceClassification),
    ):
        print(f"fetching {model_id} into {settings.models_cache_dir}")
        try:
            AutoTokenizer.from_pretrained(model_id, cache_dir=settings.models_cache_dir)
            model_class.from_pretrained(model_id, cache_dir=settings.models_cache_dir)
        except OSError as exc:
            raise SystemExit(f"could not fetch {model_id}: {exc}") from None


def build_offline(args: argparse.Namespace) -> None:
    from server.ml.offline import build_standins

    settings = get_settings()
    root = args.dir or settings.models_cache_dir / "offline"
    generator, classifier = build_standins(root, settings.generator_model, settings.sentiment_model)
    print(f"stand-in generator: {generator}\nstand-in classifier: {classifier}")


def upgrade_db(args: argparse.Namespace) -> None:
    from server.db.migrate import upgrade

    upgrade(get_settings().database_url)
    print("database at the latest revision")


def replay_spill(args: argparse.Namespace) -> None:
    """Replay RECORD_SPILL_DIR's files of this database, one line per file; exit status 1 if the database failed."""
    import asyncio

    from server.services.records.replay import replay_now

    settings = get_settings()
    reports = asyncio.run(replay_now(settings, kinds=("records", "rejected") if args.rejected else ("records",)))
    for report in reports:
        print(report)
    if not reports:
        print(f"no spill files in {settings.record_spill_dir}")
    if any(report.failed for report in reports):
        raise SystemExit(1)


def worker(args: argparse.Namespace) -> None:
    """The batch worker and local runner without HTTP, until SIGTERM or SIGINT."""
    import asyncio
    import signal

    from server.runtime import open_runtime

    async def run() -> None:
        async with open_runtime(get_settings().model_copy(update={"batch_worker": "in-process"})):
            stop = asyncio.Event()
            for signum in (signal.SIGTERM, signal.SIGINT):
                asyncio.get_running_loop().add_signal_handler(signum, stop.set)
            await stop.wait()

    asyncio.run(run())


def batch_run_once(args: argparse.Namespace) -> None:
    """One worker tick (submit due jobs, poll, fetch, run local items), then exit: for cron."""
    import asyncio
    import json
    from dataclasses import asdict

    from server.runtime import open_runtime

    async def run() -> dict:
        async with open_runtime(get_settings().model_copy(update={"batch_worker": "off"})) as runtime:
            return asdict(await runtime.batch.run_once())

    print(json.dumps(asyncio.run(run()), indent=2))


def bench(args: argparse.Namespace) -> None:
    from server.bench.against import Unusable
    from server.bench.run import main

    try:
        main(args)
    except Unusable as exc:
        print(f"bench --against: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def bench_analytics(args: argparse.Namespace) -> None:
    from server.bench.analytics import main

    main(args)


def config_docs(args: argparse.Namespace) -> None:
    from server.core.config_docs import write

    changed = write(check=args.check)
    for path in changed:
        print(f"{'out of date' if args.check else 'wrote'}: {path}")
    if args.check and changed:
        raise SystemExit("run `python -m server config docs` to regenerate them")


def parser(argv: list[str]) -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the HTTP server (settings from the environment / .env)")
    serve_cmd.add_argument("--host")
    serve_cmd.add_argument("--port", type=int)
    serve_cmd.set_defaults(run=serve)

    models = commands.add_parser("models", help="model files").add_subparsers(dest="action", required=True)
    models.add_parser("fetch", help="download GENERATOR_MODEL and SENTIMENT_MODEL into the cache").set_defaults(
        run=fetch_models
    )
    offline = models.add_parser("build-offline", help="write the random-weight stand-in models (no network)")
    offline.add_argument("--dir", type=Path, help="default: MODELS_CACHE_DIR/offline")
    offline.set_defaults(run=build_offline)

    db = commands.add_parser("db", help="database").add_subparsers(dest="action", required=True)
    db.add_parser("upgrade", help="apply Alembic migrations").set_defaults(run=upgrade_db)
    replay = db.add_parser(
        "replay-spill",
        help="write the records spilled to RECORD_SPILL_DIR to the database (each once) and remove what was written",
    )
    replay.add_argument("--rejected", action="store_true", help="also retry the rows the database rejected before")
    replay.set_defaults(run=replay_spill)

    commands.add_parser("worker", help="run the batch worker (and local batch items) without HTTP").set_defaults(
        run=worker
    )
    batch_cmd = commands.add_parser("batch", help="batch offload").add_subparsers(dest="action", required=True)
    batch_cmd.add_parser(
        "run-once", help="submit due jobs, poll, fetch results, run local items, then exit (for cron)"
    ).set_defaults(run=batch_run_once)

    config_cmd = commands.add_parser("config", help="settings").add_subparsers(dest="action", required=True)
    config_docs_cmd = config_cmd.add_parser(
        "docs", help="regenerate docs/configuration.md and .env.example from the settings' descriptions"
    )
    config_docs_cmd.add_argument("--check", action="store_true", help="only say whether they are out of date")
    config_docs_cmd.set_defaults(run=config_docs)

    bench_cmd = commands.add_parser("bench", help="throughput and latency benchmark (see docs/performance.md)")
    bench_cmd.set_defaults(run=bench)
    if argv[:1] == ["bench"]:
        # The bench's options live with the bench, which imports torch (seconds): only for `bench` itself, so that
        # every other command and `--help` parse at once.
        from server.bench.run import add_arguments

        add_arguments(bench_cmd)
    analytics_cmd = commands.add_parser(
        "bench-analytics",
        help="time POST /metrics/aggregated over a month of records (see docs/analytics-and-dashboard.md)",
    )
    analytics_cmd.set_defaults(run=bench_analytics)
    if argv[:1] == ["bench-analytics"]:
        from server.bench.analytics import add_arguments as add_analytics_arguments

        add_analytics_arguments(analytics_cmd)
    return root


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parser(argv).parse_args(argv)
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    args.run(args)


if __name__ == "__main__":
    main()
