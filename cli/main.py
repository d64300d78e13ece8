"""batchgen: submit and follow jobs, and run the service.

Using a running server (URL and key from --server/--key, BATCHGEN_SERVER/BATCHGEN_API_KEY, or the
local `make run` defaults):
    batchgen submit prompts.txt --model demo --wait
                                     submit a job (one prompt per line, or JSONL requests)
    batchgen status JOB [--wait]     a job's status and counts (with a progress bar while waiting)
    batchgen results JOB -o out.jsonl
                                     download its results
    batchgen cancel JOB              cancel what has not started
    batchgen jobs                    your jobs, newest first

Running the service:
    batchgen up                      everything on this machine (what `make run` runs)
    batchgen api                     the HTTP API (gunicorn)
    batchgen worker --model demo     one worker (same flags as `python -m worker`)
    batchgen migrate                 bring the database schema to the current revision
    batchgen build-model --preset demo
                                     build a small random-weight Llama model and register it
    batchgen convert meta-llama/Llama-2-7b-chat-hf --name meta-llama/Llama-2-7b-chat-hf
                                     convert a Hugging Face checkpoint to CTranslate2 int8
    batchgen models                  list registered models and whether they are installed
    batchgen tune --model demo       measure the model on this device: the curve, the batch limits
                                     a worker will use, and a plot of it
    batchgen keys create --owner alice
                                     create an API key (also: keys list, keys revoke KEY_ID)

`batchgen COMMAND --help` explains each, with examples.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from cli.client import CliError
from core.settings import Settings, SettingsError


def _settings(**overrides: object) -> Settings:
    try:
        return Settings.from_env(**overrides)
    except SettingsError as exc:
        raise SystemExit(f"batchgen: {exc}") from None


def cmd_up(args: argparse.Namespace) -> int:
    from cli.up import run_local

    return run_local(_settings(), workers=args.workers)


def cmd_api(args: argparse.Namespace) -> int:
    from cli.processes import gunicorn_argv

    settings = _settings(api_connections=args.connections)
    bind = args.bind or f"{settings.host}:{settings.port}"
    os.environ["BATCHGEN_API_CONNECTIONS"] = str(settings.api_connections)  # gunicorn and the app read it
    argv = gunicorn_argv(bind=bind, workers=args.workers, access_log=True)
    os.execv(argv[0], argv)
    return 0  # not reached


def cmd_migrate(args: argparse.Namespace) -> int:
    from core.db import upgrade

    settings = _settings()
    upgrade(settings.database_url)
    print(f"database at head: {settings.database_url.split('@')[-1]}")
    return 0


def cmd_build_model(args: argparse.Namespace) -> int:
    from core.logs import configure_logging
    from core.registry import ModelSpec, default_directory, register_model
    from worker.builder import build_model

    settings = _settings()
    configure_logging(settings.log_level, process="build")
    name = args.name or args.preset
    try:
        out = args.output or default_directory(settings.models_dir, name)
    except ValueError as exc:
        raise CliError(f"{exc} (--name)") from None
    if args.keep_if_present and (out / "model.bin").is_file():
        print(f"{name} is already built in {out}")
        return 0
    if out.exists() and not args.force:
        raise CliError(f"{out} exists; pass --force to replace it (or --keep-if-present to keep it)")
    build_model(out, preset=args.preset, seed=args.seed, quantization=args.quantization,
                keep_checkpoint=args.keep_checkpoint, force=args.force)
    if name != "demo":  # demo is built in; others are added to the registry file
        register_model(settings, ModelSpec(name=name, path=str(out.resolve()), chat=True,
                                           description=f"random-weight {args.preset} model"))
    print(f"built {name} in {out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from core.logs import configure_logging
    from core.registry import ModelSpec, check_model_name, default_directory, load_registry, register_model
    from worker.convert import CheckpointError, convert_checkpoint, read_checkpoint

    settings = _settings()
    configure_logging(settings.log_level, process="convert")
    if not Path(args.source).is_dir() and (args.source.startswith((".", "/", "~")) or args.source.count("/") != 1):
        raise CliError(f"no checkpoint directory {args.source!r} (give a directory, or an org/name hub id "
                       "where the hub is reachable)")
    name = args.name if args.name is not None else Path(args.source).resolve().name
    try:
        check_model_name(name)
    except ValueError as exc:
        raise CliError(f"{exc} (--name)") from None
    registry = load_registry(settings)
    try:
        known = registry.resolve(name)
    except Exception:
        known = None
    out = args.output or (registry.directory(known) if known else default_directory(settings.models_dir, name))
    if importlib.util.find_spec("torch") is None:  # make run installs what serving needs, not this
        raise CliError("converting a checkpoint needs PyTorch, which serving does not: "
                       "make install-dev, or .venv/bin/pip install 'torch==2.13.0' -e '.[convert]'")
    try:
        info = read_checkpoint(args.source)  # refuses what batchgen cannot serve, before converting
    except CheckpointError as exc:
        raise CliError(str(exc)) from None
    template = info["chat_template"]
    if template is not None and "<<SYS>>" in template and "[INST]" in template:
        template = None  # Llama-2's chat format: rendered by Meta's reference (core.prompts), not Jinja
    chat = info["chat"] or (known.chat if known else "chat" in name.lower())  # older Llama-2 chat: no template
    if args.chat is not None:
        chat = args.chat  # --chat without a template: Llama-2's format; --no-chat: a base model
    if chat and info["chat_template"] is None and info["family"] != "llama":
        raise CliError(f"{args.source} has no chat template, and Llama-2's chat format is only for Llama "
                       f"checkpoints, not {info['family']!r}: register it as a base model (--no-chat), or add "
                       "its chat template to its tokenizer_config.json")
    convert_checkpoint(args.source, out, quantization=args.quantization, force=args.force)
    spec = ModelSpec(
        name=name, path=str(Path(out).resolve()), chat=chat, chat_template=template if chat else None,
        context_length=args.context_length or info["context_length"],
        defaults=known.defaults if known else info["defaults"], aliases=known.aliases if known else (),
        source=str(args.source), family=info["family"], special_tokens=info["special_tokens"],
        add_bos=info["add_bos"], stop_token_ids=info["stop_token_ids"],
        system_prompt=info["system_prompt"] if template is not None and chat else True)
    path = register_model(settings, spec)
    kind = "chat, its own template" if spec.chat_template else "chat, Llama-2's format" if chat else "base"
    print(f"converted {args.source} -> {out} ({args.quantization}); registered {name!r} ({info['family']}, {kind}, "
          f"context {spec.context_length}, stops on {list(spec.stop_token_ids)}) in {path}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from core import auth
    from core.db import Database
    from core.errors import NotFoundError

    settings = _settings()
    db = Database(settings.database_url)
    try:
        if args.action == "create":
            with db.write() as session:
                key, token = auth.create_key(session=session, owner=args.owner, name=args.name or "",
                                             admin=args.admin)
            print(f"created {key.id} for owner {key.owner!r}{' (admin)' if key.admin else ''}; the key, shown "
                  f"only now:\n{token}")
        elif args.action == "list":
            with db.read() as session:
                for key in auth.list_keys(session=session):
                    state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
                    print(f"{key.id}  {key.owner:20} {'admin' if key.admin else '     '}  {state:24} {key.name}")
        else:
            try:
                with db.write() as session:
                    key = auth.revoke_key(session=session, key_id=args.key_id)
            except NotFoundError as exc:
                raise SystemExit(f"batchgen: {exc.message}") from None
            print(f"revoked {key.id} (owner {key.owner!r}); API processes stop accepting it within 10 s")
    finally:
        db.dispose()
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from core.registry import load_registry

    registry = load_registry(_settings())
    for spec in registry:
        state = "installed" if registry.is_installed(spec) else "not installed"
        kind = "chat" if spec.chat else "base"
        aliases = f" (aliases: {', '.join(spec.aliases)})" if spec.aliases else ""
        print(f"{spec.name:36} {spec.family:8} {kind:4} ctx={spec.context_length:<6} {state:13} "
              f"{registry.directory(spec)}{aliases}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from core.errors import UnknownModelError
    from core.registry import load_registry
    from worker import calibration as calibration_service
    from worker.device import pin_cuda_device

    settings = _settings(model=args.model, device=args.device, device_index=args.device_index,
                         compute_type=args.compute_type, inter_threads=args.inter_threads,
                         intra_threads=args.intra_threads)
    if settings.device == "cuda":
        pin_cuda_device(settings.device_index)
    registry = load_registry(settings)
    try:
        spec = registry.resolve(settings.model)
    except UnknownModelError as exc:
        raise CliError(exc.message) from None
    model_dir = registry.directory(spec)
    if not registry.is_installed(spec):
        raise CliError(f"model {spec.name} is not installed in {model_dir}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"measuring {spec.name} on {settings.device}:{settings.device_index} "
          f"(at most about {settings.calibration_budget_s:.0f} s) ...", file=sys.stderr, flush=True)
    result = calibration_service.for_worker(
        model=spec.name, model_dir=model_dir, device=settings.device, device_index=0,
        physical_index=settings.device_index, context_length=spec.context_length,
        compute_type=settings.compute_type, inter_threads=settings.inter_threads,
        intra_threads=settings.intra_threads, cache_dir=settings.calibration_dir,
        mode="auto" if args.cached else "force", budget_s=args.budget or settings.calibration_budget_s)
    print(result.table())
    print(f"cached in {calibration_service.cache_path(settings.calibration_dir, result.key)}: workers of "
          f"{spec.name} on this device start with these limits")
    out = args.plot or settings.calibration_dir / f"{calibration_service.cache_path(settings.calibration_dir, result.key).stem}.png"
    try:
        calibration_service.plot(result, out)
        print(f"plot: {out}")
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib, or the 'ops' extra)", file=sys.stderr)
    return 0


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def build_parser() -> argparse.ArgumentParser:
    from cli import client

    parser = argparse.ArgumentParser(prog="batchgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, examples: tuple[str, ...], description: str | None = None,
                **kwargs: object) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=description or help[0].upper() + help[1:] + ".",
                              epilog=_examples(*examples), formatter_class=argparse.RawDescriptionHelpFormatter,
                              **kwargs)

    # --- using a server ---
    remote = argparse.ArgumentParser(add_help=False)
    where = remote.add_argument_group("server")
    where.add_argument("--server", metavar="URL",
                       help="the batchgen API (default: BATCHGEN_SERVER, else http://BATCHGEN_HOST:BATCHGEN_PORT, "
                            f"i.e. {client.DEFAULT_SERVER})")
    where.add_argument("--key", metavar="KEY",
                       help="API key (default: BATCHGEN_API_KEY, else var/dev-api-key written by `make run`)")

    p = command("submit", "submit a job: prompts from a text file, or requests from a JSONL file", (
        "batchgen submit prompts.txt --model demo --wait",
        "batchgen submit requests.jsonl --model meta-llama/Llama-2-7b-chat-hf --param max_new_tokens=128 "
        "--param temperature=0.2",
        "batchgen submit - --model demo --system 'Answer briefly.' < prompts.txt",
        "batchgen submit prompts.txt --model demo --param 'stop=[\"\\n\\n\"]' --name nightly --priority 7",
    ), description="Submit a job. FILE holds one prompt per line (.txt, blank lines skipped) or one request "
                   "per line (.jsonl: a JSON object such as {\"custom_id\": \"a\", \"prompt\": \"...\"} or "
                   "{\"messages\": [{\"role\": \"user\", \"content\": \"...\"}]}, or a JSON string). The "
                   "job id is printed on stdout. With --wait, a progress bar is drawn on stderr until the job "
                   "ends, and the exit status is 1 unless it completed.", parents=[remote])
    p.add_argument("file", metavar="FILE", help="prompts.txt or requests.jsonl; - reads standard input")
    p.add_argument("--model", required=True, help="a registered model or alias (see GET /v1/models)")
    p.add_argument("--format", choices=["text", "jsonl"], help="how to read FILE (default: from its extension)")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="a generation parameter for every request: max_new_tokens, min_new_tokens, temperature, "
                        "top_p, top_k, repetition_penalty, stop, logprobs, top_logprobs, echo (VALUE is JSON where it "
                        "parses); repeatable")
    p.add_argument("--kind", choices=["generate", "score"],
                   help="score: the log probability and perplexity of each prompt (or of each request's "
                        "continuations), nothing generated (default generate)")
    p.add_argument("--system", help="system prompt (chat models)")
    p.add_argument("--priority", type=int, help="0-8, higher runs first (default 5; 9 is for synchronous calls)")
    p.add_argument("--name", help="a name for the job (stored as metadata.name)")
    p.add_argument("--metadata", action="append", metavar="KEY=VALUE", help="your own labels; repeatable")
    p.add_argument("--completion-window", dest="completion_window", metavar="WINDOW",
                   help="how long it may take before what is left expires, e.g. 1h, 24h (default 24h)")
    p.add_argument("--webhook", metavar="URL", help="a URL told, signed, when the job ends; its signing secret "
                   "is printed on stderr, once")
    p.add_argument("--webhook-secret", dest="webhook_secret_flag", help=argparse.SUPPRESS)  # refused, with why
    p.add_argument("--webhook-secret-file", dest="webhook_secret_file", metavar="PATH",
                   help="sign the webhook's events with the key of yours in this file (whsec_...) instead of a "
                   "new one; or set BATCHGEN_WEBHOOK_SECRET (never on the command line: `ps` shows it)")
    p.add_argument("--wait", action="store_true", help="follow the job with a progress bar until it ends")
    p.add_argument("--json", action="store_true", help="print the job as JSON")
    p.set_defaults(func=client.cmd_submit)

    p = command("status", "show a job's status, counts and tokens", (
        "batchgen status job_01j9...",
        "batchgen status job_01j9... --wait     # progress bar until it ends; exit 1 unless completed",
        "batchgen status job_01j9... --json | jq .counts",
    ), parents=[remote])
    p.add_argument("job", metavar="JOB", help="the job id (job_...)")
    p.add_argument("--wait", action="store_true", help="follow the job with a progress bar until it ends")
    p.add_argument("--json", action="store_true", help="print the job as JSON")
    p.set_defaults(func=client.cmd_status)

    p = command("results", "download a job's results as JSONL, one result per line in request order", (
        "batchgen results job_01j9... -o out.jsonl",
        "batchgen results job_01j9... --status failed          # to stdout",
        "batchgen results job_01j9... --wait -o out.jsonl       # when it has ended",
    ), parents=[remote])
    p.add_argument("job", metavar="JOB", help="the job id (job_...)")
    p.add_argument("-o", "--output", metavar="FILE", help="write here (default: standard output); the file "
                                                          "appears only when complete")
    p.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled", "expired"],
                   help="only results in this status")
    p.add_argument("--wait", action="store_true", help="wait for the job to end first")
    p.set_defaults(func=client.cmd_results)

    p = command("cancel", "cancel a job: what has not started is cancelled, what runs finishes", (
        "batchgen cancel job_01j9...",
    ), parents=[remote])
    p.add_argument("job", metavar="JOB", help="the job id (job_...)")
    p.add_argument("--json", action="store_true", help="print the job as JSON")
    p.set_defaults(func=client.cmd_cancel)

    p = command("jobs", "list your jobs, newest first", (
        "batchgen jobs",
        "batchgen jobs --status running --limit 50",
    ), parents=[remote])
    p.add_argument("--status", choices=["queued", "running", "cancelling", "completed", "failed", "cancelled",
                                        "expired"], help="only jobs in this status")
    p.add_argument("--limit", type=int, default=20, help="how many (1-100, default 20)")
    p.add_argument("--json", action="store_true", help="print the page as JSON")
    p.set_defaults(func=client.cmd_jobs)

    # --- running the service ---
    p = command("up", "run Redis (if needed), the API and workers on this machine", (
        "batchgen up                 # what `make run` runs: SQLite, embedded Redis, the demo model",
        "BATCHGEN_DATABASE_URL=postgresql://... BATCHGEN_REDIS_URL=redis://host:6379/0 batchgen up --workers 2",
    ))
    p.add_argument("--workers", type=int, default=1, help="worker processes for the model (default 1)")
    p.set_defaults(func=cmd_up)

    p = command("api", "serve the HTTP API with gunicorn", (
        "batchgen api --bind 0.0.0.0:8000 --workers 4",
    ))
    p.add_argument("--bind", help="host:port (default BATCHGEN_HOST:BATCHGEN_PORT)")
    p.add_argument("--workers", type=int, default=2, help="gunicorn processes (default 2)")
    p.add_argument("--connections", type=int, help="connections per process (default BATCHGEN_API_CONNECTIONS or 2000)")
    p.set_defaults(func=cmd_api)

    # Listed for --help; main() hands `batchgen worker ...` to the worker's own parser.
    sub.add_parser("worker", help="run one worker: one model on one device (`batchgen worker --help`)",
                   add_help=False)

    p = command("migrate", "migrate the database to the current schema", (
        "batchgen migrate                 # var/batchgen.db, the laptop default",
        "BATCHGEN_DATABASE_URL=postgresql://batchgen@db/batchgen batchgen migrate",
    ))
    p.set_defaults(func=cmd_migrate)

    p = command("build-model", "build a small random-weight Llama model (for trying things without weights)", (
        "batchgen build-model --preset demo",
        "batchgen build-model --preset llama-2-7b-shape --name shape-7b   # 7B shapes, random weights",
    ))
    p.add_argument("--preset", default="demo", choices=["tiny", "demo", "bench", "llama-2-7b-shape"],
                   help="model shape (default demo)")
    p.add_argument("--name", help="registry name (default: the preset)")
    p.add_argument("--output", type=Path, help="model directory (default: models dir / name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantization", default="int8")
    p.add_argument("--keep-checkpoint", type=Path, help="also keep the transformers checkpoint here")
    p.add_argument("--force", action="store_true", help="replace an existing model directory")
    p.add_argument("--keep-if-present", action="store_true", help="do nothing if the model is already built")
    p.set_defaults(func=cmd_build_model)

    p = command("convert", "convert a Hugging Face checkpoint (Llama, Mistral, Qwen, Gemma, Phi-3) to "
                "CTranslate2 and register it with its chat template, end-of-turn tokens and context", (
        "batchgen convert /data/Llama-2-7b-chat-hf --name meta-llama/Llama-2-7b-chat-hf",
        "batchgen convert /data/Qwen2.5-7B-Instruct --name Qwen/Qwen2.5-7B-Instruct",
        "batchgen convert ./my-finetune --name acme/llama-ft --chat --quantization int8_float16",
    ))
    p.add_argument("source", help="checkpoint directory, or a hub id where the hub is reachable")
    p.add_argument("--name", help="registry name (default: the directory name)")
    p.add_argument("--output", type=Path, help="model directory (default: from the registry)")
    p.add_argument("--quantization", default="int8")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="whether it is a chat model (default: it is when its tokenizer has a chat template)")
    p.add_argument("--context-length", type=int)
    p.add_argument("--force", action="store_true", help="replace an existing model directory")
    p.set_defaults(func=cmd_convert)

    p = command("keys", "create, list or revoke API keys", (
        "batchgen keys create --owner alice --name laptop",
        "batchgen keys list",
        "batchgen keys revoke key_01j9...",
    ), description="Create, list or revoke API keys. Keys are stored only as salted hashes: a new key is "
                   "shown once. Uses BATCHGEN_DATABASE_URL directly (no server needed).")
    keys = p.add_subparsers(dest="action", required=True)
    k = keys.add_parser("create", help="create a key for an owner (prints it once)",
                        epilog=_examples("batchgen keys create --owner alice", "batchgen keys create --owner ops --admin"),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    k.add_argument("--owner", required=True, help="whose jobs the key reaches")
    k.add_argument("--name", help="a label, e.g. who or what uses it")
    k.add_argument("--admin", action="store_true", help="may see every owner's jobs")
    keys.add_parser("list", help="list keys (never the secrets)", epilog=_examples("batchgen keys list"),
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    k = keys.add_parser("revoke", help="revoke a key by its id (key_...)",
                        epilog=_examples("batchgen keys revoke key_01j9..."),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    k.add_argument("key_id")
    p.set_defaults(func=cmd_keys)

    p = command("models", "list registered models, and whether each is installed on this machine", (
        "batchgen models",
    ))
    p.set_defaults(func=cmd_models)

    p = command("tune", "measure a model on this device and show the batch limits a worker will use", (
        "batchgen tune --model demo                          # CPU: thread layouts, compute types, batch sizes",
        "batchgen tune --model meta-llama/Llama-2-7b-chat-hf --device cuda --device-index 1",
        "batchgen tune --model demo --cached                 # show what is cached, measure only if nothing is",
    ), description="Measure output tokens/s of a model on this device over batch sizes and prompt lengths "
                   "(on CPU also thread layouts; every int8 compute type the device supports), print the curve "
                   "as a table, plot it, and cache the choice so workers on this device start with it.")
    p.add_argument("--model", help="registered model name or alias (default: BATCHGEN_MODEL or demo)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: BATCHGEN_DEVICE or cpu")
    p.add_argument("--device-index", type=int, help="GPU index on this machine (default 0)")
    p.add_argument("--compute-type", help="measure only this compute type")
    p.add_argument("--inter-threads", type=int, help="measure only this many replicas")
    p.add_argument("--intra-threads", type=int, help="measure only this many threads per replica")
    p.add_argument("--budget", type=float, help="seconds to spend (default BATCHGEN_CALIBRATION_BUDGET_S or 30)")
    p.add_argument("--cached", action="store_true", help="use a cached calibration if there is one")
    p.add_argument("--plot", type=Path, help="PNG to write (default: next to the cached calibration)")
    p.set_defaults(func=cmd_tune)
    return parser


def one_line(exc: BaseException) -> str:
    """What went wrong, in one line: the database or a file by name, else the exception's message."""
    from sqlalchemy.exc import DBAPIError

    if isinstance(exc, DBAPIError):
        reason = str(exc.orig or exc).strip().splitlines()[0]
        if "no such table" in reason or ("relation" in reason and "does not exist" in reason):
            reason += "; run `batchgen migrate` first"
        return f"the database ({_settings().database_url.split('@')[-1]}) failed: {reason}"
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or exc}: {exc.filename}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else 'no details'}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``batchgen`` command: errors are one line on stderr and exit 1."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:  # every flag, --help too, is the worker's own
        from worker.main import main as worker_main

        return worker_main(argv[1:], prog="batchgen worker")
    traceback = "--traceback" in argv
    args = build_parser().parse_args([a for a in argv if a != "--traceback"])
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"batchgen: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - an operator command failed: one line, not a traceback
        if traceback:
            raise
        print(f"batchgen: {one_line(exc)} (--traceback shows where)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbatchgen: interrupted" + (f"; the job goes on on the server ({args.job})"
                                             if getattr(args, "job", None) else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

