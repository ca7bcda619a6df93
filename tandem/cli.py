"""`tandem` command line: `serve` a cluster, or `generate` with one in-process engine."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from tandem.loadgen.cli import bench
from tandem.log import setup_logging
from tandem.sim.cli import profile_command, simulate_command

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Tandem: disaggregated LLM inference.")


@app.callback()
def _root(log_level: Annotated[str | None, typer.Option(
        help="Level of Tandem's logs (default INFO, or TANDEM_LOG_LEVEL).")] = None) -> None:
    setup_logging(log_level)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Prompt text.")],
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="0 disables top-k.")] = 0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the chat template.")] = False,
    model: Annotated[str | None, typer.Option(help="HF directory or .gguf file.")] = None,
    dtype: Annotated[str, typer.Option(help="bfloat16 | float32 | float16.")] = "bfloat16",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
) -> None:
    """Complete PROMPT with the model and print only the completion."""
    from tandem.engine.errors import EngineError
    from tandem.engine.llm import LLM
    from tandem.engine.sampling_params import SamplingParams

    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed)
        llm = LLM(model=model, dtype=dtype, num_threads=threads)
        if chat:
            out = llm.chat([{"role": "user", "content": prompt}], params)[0]
        else:
            out = llm.generate(prompt, params)[0]
    except (ValueError, EngineError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    sys.stdout.write(out.text + "\n")


@app.command("cachegen-profile")
def cachegen_profile(
    model: Annotated[str | None, typer.Option(help="HF directory or .gguf file.")] = None,
    text: Annotated[Path | None, typer.Option(
        help="Calibration text (natural prose, ~2K tokens); default: the shipped one.")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Where to write the profile; default: ~/.cache/tandem/cachegen/.")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
) -> None:
    """Measure a model's CacheGen profile (KV statistics and per-layer sensitivity), which the
    CacheGen codec needs for that model. Takes about a minute for the shipped model."""
    from tandem.engine.config import EngineConfig
    from tandem.engine.engine import LLMEngine
    from tandem.kv_store.codec.profile import SHIPPED, build_profile, cache_dir, profile_path

    engine = LLMEngine(EngineConfig(model=model, num_threads=threads, kv_cache_gb=0.5,
                                    enable_prefix_caching=False))
    tokens = engine.tokenizer.encode((text or SHIPPED / "calibration.txt").read_text())
    typer.echo(f"profiling {engine.fingerprint} on {len(tokens)} tokens", err=True)
    try:
        profile = build_profile(engine, tokens)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    path = out or profile_path(engine.fingerprint, cache_dir())
    profile.save(path)
    typer.echo(f"wrote {path} (profile {profile.id})")


@app.command()
def certs(
    directory: Annotated[Path, typer.Argument(help="Where to write the PEM files.")],
    host: Annotated[list[str] | None, typer.Option(
        help="Extra name or IP address for the node certificate; repeatable.")] = None,
) -> None:
    """Write a development CA and a node certificate (server and client use) into DIRECTORY:
    for the gateway's TLS and the cluster's mTLS. Production clusters bring their own."""
    from tandem.tls import make_dev_certs

    try:
        paths = make_dev_certs(directory, host or [])
    except FileExistsError as e:  # a new CA would orphan every certificate the old one signed
        typer.echo(f"error: {e}; remove it first to make a new CA", err=True)
        raise typer.Exit(2) from None
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")
    d = directory
    typer.echo(f"use: tandem serve --tls-cert {d / 'node.pem'} --tls-key {d / 'node.key'} "
               f"(gateway); --config YAML worker.tls: {{ca: {d / 'ca.pem'}, "
               f"cert: {d / 'node.pem'}, key: {d / 'node.key'}}} (cluster mTLS)")


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option(
        "--config", help="YAML file with any ServeConfig fields; flags override it.")] = None,
    prefill_workers: Annotated[int | None, typer.Option(help="Prefill pool size.")] = None,
    decode_workers: Annotated[int | None, typer.Option(help="Decode pool size.")] = None,
    attention_workers: Annotated[int | None, typer.Option(
        help="Attention pool size (Ray resource tandem_memory): they hold offloaded requests' "
        "KV and run their attention; 0 = no offload.")] = None,
    offload: Annotated[str | None, typer.Option(
        help="Which requests decode with offloaded attention: auto (long ones, or when the "
        "decode workers are full) | always | never.")] = None,
    colocated: Annotated[bool | None, typer.Option(
        "--colocated/--disaggregated",
        help="Workers that run both phases (the baseline), or separate pools.")] = None,
    grpc_host: Annotated[str | None, typer.Option(help="Gateway bind address.")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="Gateway port; 0 picks one.")] = None,
    http_port: Annotated[int | None, typer.Option(
        help="Port of the OpenAI-compatible HTTP API (default 8000; 0 picks one).")] = None,
    no_http: Annotated[bool, typer.Option(
        "--no-http", help="Serve gRPC only (no HTTP API, /metrics or /health).")] = False,
    cors_origin: Annotated[list[str] | None, typer.Option(
        help="An origin browsers may call the HTTP API from (repeatable).")] = None,
    kv_transport: Annotated[str | None, typer.Option(
        help="KV handoff: auto (NIXL where both ends have it, else gRPC) | nixl | grpc.")] = None,
    kv_streaming: Annotated[str | None, typer.Option(
        help="auto | layerwise (overlap with prefill) | onepiece (after prefill).")] = None,
    kv_codec: Annotated[str | None, typer.Option(
        help="gRPC KV handoff coding: raw | cachegen[:LEVEL] (0 near-lossless .. 4 compact).")
    ] = None,
    kv_store: Annotated[bool | None, typer.Option(
        "--kv-store/--no-kv-store", help="Reuse cached prefixes (tiered KV store).")] = None,
    kv_chunk_tokens: Annotated[int | None, typer.Option(
        help="Tokens per stored KV chunk.")] = None,
    kv_cpu_gb: Annotated[float | None, typer.Option(help="CPU tier per worker, GiB.")] = None,
    kv_gpu_gb: Annotated[float | None, typer.Option(
        help="GPU tier per worker, GiB (CUDA only).")] = None,
    kv_ssd_gb: Annotated[float | None, typer.Option(
        help="SSD tier per worker, GiB; 0 = none.")] = None,
    kv_ssd_dir: Annotated[Path | None, typer.Option(
        help="SSD tier directory (default ~/.cache/tandem/kv).")] = None,
    kv_redis_url: Annotated[str | None, typer.Option(
        help="redis:// or rediss:// URL of the shared tier (default: embedded redis-server "
        "if installed).")] = None,
    ray_address: Annotated[str | None, typer.Option(
        help="Join this Ray cluster instead of starting a local one.")] = None,
    model: Annotated[str | None, typer.Option(help="HF directory or .gguf file.")] = None,
    dtype: Annotated[str | None, typer.Option(help="bfloat16 | float32 | float16.")] = None,
    kv_cache_gb: Annotated[float | None, typer.Option(help="KV pool per worker, GiB.")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads per worker.")] = None,
    cuda_graphs: Annotated[bool | None, typer.Option(
        "--cuda-graphs/--no-cuda-graphs",
        help="Replay captured CUDA graphs for decode steps (decode workers, CUDA).")] = None,
    api_key: Annotated[list[str] | None, typer.Option(
        help="Require this API key ('authorization: Bearer KEY'); repeatable. Also "
        "TANDEM_API_KEY (comma-separated).")] = None,
    tls_cert: Annotated[Path | None, typer.Option(
        help="Serve the gateway over TLS with this PEM certificate (with --tls-key).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM key of --tls-cert.")] = None,
    tls_client_ca: Annotated[Path | None, typer.Option(
        help="Require client certificates signed by this CA (mTLS).")] = None,
    debug_routing: Annotated[bool | None, typer.Option(
        "--debug-routing", help="Honour x-tandem-prefill-worker routing hints.")] = None,
    kv_host: Annotated[str | None, typer.Option(
        help="Address the workers' KV receivers bind (default: loopback on a local Ray "
        "cluster, the node's address on a real one).")] = None,
    autoscale: Annotated[bool | None, typer.Option(
        "--autoscale/--no-autoscale", help="Resize the pools to the load and the SLOs "
        "(bounds: pools.<role>.{min,max} in --config).")] = None,
    autoscale_profile: Annotated[Path | None, typer.Option(
        help="Replica profile for --autoscale (written by `tandem profile`).")] = None,
) -> None:
    """Serve the model: Ray workers for prefill and decode behind a gRPC gateway.

    Prints `ready grpc=HOST:PORT http=HOST:PORT` once it serves; Ctrl-C shuts down cleanly.
    """
    from pydantic import ValidationError

    from tandem.cluster.config import ServeConfig

    flags = {
        "prefill_workers": prefill_workers, "decode_workers": decode_workers,
        "attention_workers": attention_workers, "worker.offload.mode": offload,
        "colocated": colocated, "gateway.host": grpc_host, "gateway.port": grpc_port,
        "worker.kv_transport": kv_transport, "worker.kv_streaming": kv_streaming,
        "worker.kv_codec": kv_codec, "worker.kv_store.enabled": kv_store,
        "worker.kv_store.chunk_tokens": kv_chunk_tokens,
        "worker.kv_store.cpu_gb": kv_cpu_gb, "worker.kv_store.gpu_gb": kv_gpu_gb,
        "worker.kv_store.ssd_gb": kv_ssd_gb, "worker.kv_store.ssd_dir": kv_ssd_dir,
        "worker.kv_store.redis.url": kv_redis_url,
        "ray.address": ray_address,
        "worker.engine.model": model, "worker.engine.dtype": dtype,
        "worker.engine.kv_cache_gb": kv_cache_gb, "worker.engine.num_threads": threads,
        "worker.engine.cuda_graphs": cuda_graphs, "autoscale.enabled": autoscale,
        "autoscale.profile": str(autoscale_profile) if autoscale_profile else None,
        "gateway.api_keys": api_key or _env_api_keys(),
        "worker.kv_store.redis.password": os.environ.get("TANDEM_REDIS_PASSWORD") or None,
        "gateway.tls.cert": tls_cert, "gateway.tls.key": tls_key,
        "gateway.tls.client_ca": tls_client_ca, "gateway.debug_routing": debug_routing,
        "worker.host": kv_host, "gateway.http_port": http_port,
        "gateway.cors_origins": cors_origin,
    }
    try:
        settings = ServeConfig.load(config, {k: v for k, v in flags.items() if v is not None})
    except (OSError, ValueError, ValidationError) as e:
        typer.echo(f"error: invalid configuration: {e}", err=True)
        raise typer.Exit(2) from None
    if no_http:
        settings = settings.model_copy(update={
            "gateway": settings.gateway.model_copy(update={"http_port": None})})
    if not settings.ray.address:  # the workers run here: check their transport up front
        from tandem.transfer import TransportNotUsable, available_transports

        try:
            available_transports(settings.worker.kv_transport, settings.worker.tls is not None)
        except TransportNotUsable as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
    asyncio.run(_serve(settings))


async def _serve(settings) -> None:
    from tandem.cluster.server import TandemServer
    from tandem.progress import StartupProgress

    server = TandemServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signals() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

    on_signals()
    try:
        with StartupProgress() as progress:
            server.progress = progress.update
            start = asyncio.ensure_future(server.start())
            await asyncio.wait({start, asyncio.ensure_future(stop.wait())},
                               return_when=asyncio.FIRST_COMPLETED)
        if start.done():
            address = start.result()
            on_signals()  # ray.init() installs its own SIGTERM handler: take it back
            ready = f"ready grpc={address}"
            if server.http_address:
                ready += f" http={server.http_address}"
            typer.echo(ready)
            sys.stdout.flush()
            await stop.wait()
        else:
            start.cancel()
        typer.echo("shutting down", err=True)
    finally:
        await server.stop()


@app.command()
def status(
    address: Annotated[str, typer.Option(help="Gateway HOST:PORT (gRPC).")] = "127.0.0.1:50051",
    api_key: Annotated[str | None, typer.Option(
        help="API key (default: TANDEM_API_KEY).", envvar="TANDEM_API_KEY")] = None,
    tls_ca: Annotated[Path | None, typer.Option(
        help="Connect over TLS, trusting this PEM CA.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Show the cluster's pools and workers (the Admin service's Status) as a table."""
    from tandem.client import Client, TandemError
    from tandem.status_table import print_status

    root = tls_ca.read_bytes() if tls_ca else None
    with Client(address, tls=tls_ca is not None, root_certificates=root,
                api_key=(api_key or "").split(",")[0].strip() or None, timeout=10) as client:
        try:
            response = client.status()
        except TandemError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
    print_status(response, json_output)


def _env_api_keys() -> list[str] | None:
    keys = [k.strip() for k in os.environ.get("TANDEM_API_KEY", "").split(",") if k.strip()]
    return keys or None


@app.command()
def drain(
    worker_id: Annotated[str, typer.Argument(help="Worker id as `tandem status` shows it.")],
    address: Annotated[str, typer.Option(help="Gateway HOST:PORT (gRPC).")] = "127.0.0.1:50051",
    api_key: Annotated[str | None, typer.Option(
        help="API key (default: TANDEM_API_KEY).", envvar="TANDEM_API_KEY")] = None,
    tls_ca: Annotated[Path | None, typer.Option(
        help="Connect over TLS, trusting this PEM CA.")] = None,
) -> None:
    """Take a worker out of service: its running requests move to other workers (their
    streams go on), then it is removed."""
    from tandem.client import Client, TandemError

    root = tls_ca.read_bytes() if tls_ca else None
    with Client(address, tls=tls_ca is not None, root_certificates=root,
                api_key=(api_key or "").split(",")[0].strip() or None, timeout=300) as client:
        try:
            done = client.drain(worker_id)
        except TandemError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
    typer.echo(f"drained {done.worker_id}: {done.moved_requests} requests moved")


app.command("bench")(bench)  # `tandem bench`: its options live with the load generator


@app.command()
def node(
    role: Annotated[str, typer.Option(help="The pool: prefill, decode or attention.")],
    head: Annotated[str, typer.Option(help="The Ray head, HOST:PORT.")],
    health_port: Annotated[int, typer.Option(help="Port of /health.")] = 8080,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs this node offers Ray.")] = None,
) -> None:
    """A pool pod on Kubernetes: join the head's Ray cluster as one node of ROLE's pool (the
    head starts a worker on it) and serve /health."""
    from tandem.cluster.node_agent import run_node

    try:
        code = run_node(role, head, health_port, num_cpus)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    raise typer.Exit(code)


@app.command()
def operator(
    namespace: Annotated[list[str] | None, typer.Option(
        help="Namespaces to watch (repeatable); default: the operator's own (POD_NAMESPACE), "
        "else every namespace.")] = None,
    gateway_http: Annotated[str | None, typer.Option(
        help="Reach every cluster's gateway HTTP API here instead of through its Service "
        "(an operator run outside the cluster).")] = None,
    gateway_grpc: Annotated[str | None, typer.Option(
        help="Likewise for its gRPC Admin API, HOST:PORT.")] = None,
) -> None:
    """The Kubernetes operator: keeps each TandemCluster's objects and sizes its pools."""
    from tandem.operator.main import run_operator
    from tandem.operator.settings import OperatorSettings

    watched = namespace or ([os.environ["POD_NAMESPACE"]] if os.environ.get("POD_NAMESPACE")
                            else [])
    run_operator(OperatorSettings(namespaces=watched, gateway_http=gateway_http,
                                  gateway_grpc=gateway_grpc))


app.command("simulate")(simulate_command)
app.command("profile")(profile_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
