"""Command line: `python -m server serve | models fetch | models build-offline | db upgrade | bench`."""

import argparse
import logging
import sys
from pathlib import Path

from server.core.config import get_settings


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    settings = get_settings()
    uvicorn.run("server.main:app", host=args.host or settings.host, port=args.port or settings.port,
                log_level=settings.log_level.lower(), proxy_headers=True,
                forwarded_allow_ips=settings.forwarded_allow_ips)


def fetch_models(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    settings = get_settings()
    for model_id, model_class in ((settings.generator_model, AutoModelForCausalLM),
                                  (settings.sentiment_model, AutoModelForSequenceClassification)):
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


def worker(args: argparse.Namespace) -> None:
    """The batch worker and local runner without HTTP, until SIGTERM or SIGINT."""
    import asyncio
    import signal

    from server.services.runtime import open_runtime

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

    from server.services.runtime import open_runtime

    async def run() -> dict:
        async with open_runtime(get_settings().model_copy(update={"batch_worker": "off"})) as runtime:
            return asdict(await runtime.batch.run_once())

    print(json.dumps(asyncio.run(run()), indent=2))


def bench(args: argparse.Namespace) -> None:
    from server.bench.run import main

    main(args)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the HTTP server (settings from the environment / .env)")
    serve_cmd.add_argument("--host")
    serve_cmd.add_argument("--port", type=int)
    serve_cmd.set_defaults(run=serve)

    models = commands.add_parser("models", help="model files").add_subparsers(dest="action", required=True)
    models.add_parser("fetch", help="download GENERATOR_MODEL and SENTIMENT_MODEL into the cache").set_defaults(
        run=fetch_models)
    offline = models.add_parser("build-offline", help="write the random-weight stand-in models (no network)")
    offline.add_argument("--dir", type=Path, help="default: MODELS_CACHE_DIR/offline")
    offline.set_defaults(run=build_offline)

    db = commands.add_parser("db", help="database").add_subparsers(dest="action", required=True)
    db.add_parser("upgrade", help="apply Alembic migrations").set_defaults(run=upgrade_db)

    commands.add_parser("worker", help="run the batch worker (and local batch items) without HTTP").set_defaults(
        run=worker)
    batch_cmd = commands.add_parser("batch", help="batch offload").add_subparsers(dest="action", required=True)
    batch_cmd.add_parser("run-once", help="submit due jobs, poll, fetch results, run local items, then exit "
                                          "(for cron)").set_defaults(run=batch_run_once)

    from server.bench.run import add_arguments

    add_arguments(commands.add_parser("bench", help="throughput and latency benchmark (see README)"))
    commands.choices["bench"].set_defaults(run=bench)
    return root


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    sys.exit(main())
