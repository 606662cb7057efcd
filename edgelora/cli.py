"""The ``edgelora`` command, on top of every layer below it.

The device-side layers (format, runtime, checks) are imported here at the top. The host-side commands
(``export``, ``add-adapter``, ``train``, ``demo``) import the exporters, training and the demo inside the
command instead: those load torch, which takes seconds and is not installed with ``pip install edgelora``
alone, and ``edgelora generate``, ``check`` or ``--help`` on a device must neither wait for torch nor need it.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import click

from .adapter_specs import parse_generate_adapters
from .checks import report
from .checks.budget import LatencySettings
from .checks.measure import cold_load_ms, compare, hot_swap_us, peak_rss_bytes
from .checks.run import run_check
from .errors import EXIT_BAD_INPUT, EdgeLoraError
from .format.codec import DTYPES
from .format.manifest import load_manifest
from .runtime import EdgeModel
from .units import human_bytes

# click >= 8.2 raises this usage error, whose message is the help text, for a bare group or command
NoArgsIsHelp = getattr(click.exceptions, "NoArgsIsHelpError", ())


class Group(click.Group):
    """Every bad input becomes one line on stderr and exit code 2, never a traceback.

    That covers our own errors, click's usage errors (which would print the usage block too) and
    the operating system's (a folder that cannot be written, a full disk), which name their file.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelp as e:  # a bare command prints its help, as click does
            click.echo(e.format_message(), err=True)
            sys.exit(e.exit_code)
        except click.UsageError as e:
            command = f"{e.ctx.command_path}: " if e.ctx is not None else ""
            fail(f"{command}{e.format_message()}", e.exit_code)
        except click.ClickException as e:
            fail(e.format_message(), e.exit_code)
        except click.Abort:
            fail("aborted", 1)
        except EdgeLoraError as e:
            fail(str(e), e.exit_code)
        except OSError as e:
            fail(EdgeLoraError(f"{e.filename}: {e.strerror}" if e.filename else str(e)), EXIT_BAD_INPUT)
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


def fail(message, code: int):
    click.echo(f"edgelora: error: {message}", err=True)
    sys.exit(code)


def parse_adapter_spec(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise EdgeLoraError(f"--adapter {spec!r}: expected NAME=PEFT_DIR")
    return name, path


def parse_probe_specs(specs: tuple[str, ...], adapters: dict[str, str]) -> dict[str, str]:
    """``NAME=FILE`` for one adapter; ``FILE`` (even with a "=" in it) for the base and the other adapters."""
    probes: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or name not in adapters and Path(spec).is_file():
            name, path = "", spec
        if name in probes:
            raise EdgeLoraError(f"--probe-data {spec!r}: a second file for "
                                + (f"adapter {name}" if name else "the base and the other adapters"))
        probes[name] = path
    return probes


@click.group(cls=Group)
@click.version_option(package_name="edgelora")
def main():
    """Hugging Face base + PEFT LoRA adapters -> an ONNX package with swappable adapters, and its runtime."""


@main.command()
@click.argument("base_dir", type=click.Path(path_type=Path))
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PEFT_DIR",
              help="A PEFT LoRA adapter folder to package; repeat for several.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Package directory to write.")
@click.option("--adapter-dtype", type=click.Choice(DTYPES), default="fp32", show_default=True,
              help="How adapter factors are stored (and kept in memory); dequantized inside the graph.")
@click.option("--block-size", type=click.Choice(["32", "64"]), default="32", show_default=True,
              help="Block along the reduction axis for int4 factors and int4/int8 base weights.")
@click.option("--quantize", type=click.Choice(["none", "int8", "int4"]), default="none", show_default=True,
              help="Base weights as MatMulNBits (LM head included, LoRA slots never).")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=None,
              help="MatMulNBits accuracy level (4: int8 compute, fastest on CPU).")
@click.option("--fp32-embedding", is_flag=True,
              help="With --quantize int4, keep the token embedding table in fp32 (a larger package) instead of int4.")
@click.option("--mode", type=click.Choice(["separate", "merged"]), default="separate", show_default=True,
              help="merged: one graph per adapter with the delta folded in before quantization.")
@click.option("--probe-data", "probes", multiple=True, metavar="[NAME=]FILE",
              help="Prompt/completion JSONL (as `train` reads) to measure top-1 agreement on, over the "
                   "completion tokens; NAME=FILE for one adapter, FILE for the base and the rest. "
                   "Default: random ids.")
@click.option("--overwrite", is_flag=True, help="Replace an existing package at --out.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def export(base_dir, adapters, out, adapter_dtype, block_size, quantize, accuracy_level, fp32_embedding, mode, probes,
           overwrite, quiet):
    """Export BASE_DIR (a Hugging Face causal LM or BERT-family encoder) with one LoRA slot per targeted module."""
    from .exporters.export import ExportOptions, export_package

    specs = dict(parse_adapter_spec(s) for s in adapters)
    if len(specs) != len(adapters):
        raise EdgeLoraError("--adapter: the same name is given twice")
    options = ExportOptions(adapter_dtype=adapter_dtype, block_size=int(block_size), quantize=quantize,
                            accuracy_level=accuracy_level, quantize_embedding=not fp32_embedding, mode=mode,
                            probe_data=parse_probe_specs(probes, specs), overwrite=overwrite, progress=not quiet)
    export_package(base_dir, specs, out, options)


@main.command("add-adapter")
@click.argument("package", type=click.Path(path_type=Path))
@click.argument("spec", metavar="NAME=PEFT_DIR")
@click.option("--adapter-dtype", type=click.Choice(DTYPES), default=None,
              help="Defaults to the codec of the package's slots (the only one its graph takes).")
@click.option("--base", "base_dir", type=click.Path(path_type=Path), default=None,
              help="The fp32 base folder, to measure the adapter's top-1 agreement  "
                   "[default: the folder the package was exported from, if its weights are unchanged]")
@click.option("--probe-data", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="Prompt/completion JSONL to measure that agreement on, as for export.")
@click.option("--overwrite", is_flag=True, help="Replace an adapter of the same name.")
def add_adapter_cmd(package, spec, adapter_dtype, base_dir, probe_data, overwrite):
    """Add a PEFT adapter to an existing package without re-exporting the base."""
    from .exporters.add_adapter import add_adapter

    t0 = time.perf_counter()
    name, path = parse_adapter_spec(spec)
    entry = add_adapter(package, name, path, overwrite=overwrite, adapter_dtype=adapter_dtype, base_dir=base_dir,
                        probe_data=probe_data, progress=True)
    click.echo(f"added {name}: {entry.file}, {entry.dtype}, rank {entry.rank}, {human_bytes(entry.bytes)} "
               f"in {time.perf_counter() - t0:.1f}s")


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
def inspect(package):
    """Show what a package holds: graph, slots, adapters and their sizes."""
    m = load_manifest(package)
    base_bytes = m.base_bytes
    g = m.graph
    click.echo(f"package     {package}  (format {m.format_version}, {m.created_by})")
    click.echo(f"model       {m.architecture} ({m.family}, {m.task}), {g['num_layers']} layers, "
               f"vocab {g['vocab_size']}")
    click.echo(f"base        {human_bytes(base_bytes)}, quantization {m.base_quantization}, "
               f"{m.base_fingerprint[:23]}…")
    grouped = f" ({len(m.slot_groups)} slot groups)" if m.slot_groups else ""
    kinds = ", ".join(sorted({s.name.rsplit(".", 1)[-1] for s in m.slots}))
    click.echo(f"slots       {len(m.slots)}{grouped}: {kinds}")
    click.echo(f"tokenizer   {m.tokenizer or 'none'}")
    click.echo(f"mode        {m.mode}" + ("" if m.mode == "merged" else f", adapter codec {m.adapter_dtype}"))
    click.echo(f"adapters    {len(m.adapters)}")
    if m.adapters:
        click.echo(f"  {'name':<16} {'rank':>4} {'dtype':<6} {'modules':>7} {'bytes':>10} {'PEFT bytes':>10} "
                   f"{'ratio':>6} {'Δ rel.err':>9} {'top-1':>6}")
        for name, a in sorted(m.adapters.items()):
            q = m.quality.get(name)
            err = "-" if q is None or q.delta_rel_error is None else f"{q.delta_rel_error:.1e}"
            top1 = "-" if q is None or q.top1_agreement is None else f"{q.top1_agreement:.1%}"
            ratio = f"{a.bytes / a.source_bytes:.1%}" if a.source_bytes else "-"
            click.echo(f"  {name:<16} {a.rank:>4} {a.dtype:<6} {len(a.modules):>7} {human_bytes(a.bytes):>10} "
                       f"{human_bytes(a.source_bytes):>10} {ratio:>6} {err:>9} {top1:>6}")
        probes = {name: q.probe for name, q in sorted(m.quality.items()) if q.probe}
        if probes:
            click.echo("probes      " + "; ".join(f"{name or '(base)'}: {p}" for name, p in probes.items()))
        total = m.base_bytes + sum(a.bytes for a in m.adapters.values())
        click.echo(f"total       {human_bytes(total)} (base + adapters)")


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME[:WEIGHT]",
              help="Adapter name, with an optional strength; repeat to compose several (none: the base model).")
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 means greedy.")
@click.option("--top-k", default=0, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--seed", default=None, type=int)
@click.option("--stop", multiple=True, help="Stop when this text appears; repeatable.")
@click.option("--truncate", is_flag=True,
              help="Drop the prompt's oldest tokens where it and --max-new-tokens would pass the model's context.")
@click.option("--stats", is_flag=True, help="Print prefill and decode timings to stderr.")
def generate(package, prompt, adapters, max_new_tokens, temperature, top_k, top_p, seed, stop, truncate, stats):
    """Generate text from PACKAGE with the chosen adapter, streaming to stdout."""
    adapter = parse_generate_adapters(adapters)
    model = EdgeModel.open(package)
    pieces = model.stream(prompt, adapter=adapter, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, seed=seed, stop=list(stop), truncate=truncate)
    for piece in pieces:
        click.echo(piece, nl=False)
    click.echo()
    if pieces.result.prompt_tokens_dropped:
        click.echo(f"note: the prompt's first {pieces.result.prompt_tokens_dropped} tokens were dropped to fit the "
                   "model's context", err=True)
    if stats:
        r = pieces.result
        click.echo(f"prompt {r.prompt_tokens} tokens, prefill {r.prefill_ms:.1f} ms, {len(r.token_ids)} new tokens, "
                   f"decode {r.decode_ms_per_token:.2f} ms/token, finish: {r.finish_reason}", err=True)


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--text", "texts", multiple=True, required=True, help="A text to classify; repeat for a batch.")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME[:WEIGHT]",
              help="Adapter name, with an optional strength; repeat to compose several (none: the base model).")
def classify(package, texts, adapters):
    """Classify each --text with a sequence-classification PACKAGE: label, probability and text per line."""
    result = EdgeModel.open(package).classify(list(texts), adapter=parse_generate_adapters(adapters))
    for text, label, probabilities in zip(texts, result.labels, result.probabilities):
        click.echo(f"{label}\t{probabilities.max():.4f}\t{text}")


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--text", "texts", multiple=True, required=True, help="A text to embed; repeat for a batch.")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME[:WEIGHT]",
              help="Adapter name, with an optional strength; repeat to compose several (none: the base model).")
@click.option("--normalize", is_flag=True, help="Scale each embedding to unit length.")
def embed(package, texts, adapters, normalize):
    """Embed each --text with a feature-extraction PACKAGE: one JSON array (mean-pooled embedding) per line."""
    model = EdgeModel.open(package)
    for vector in model.embed(list(texts), adapter=parse_generate_adapters(adapters), normalize=normalize):
        click.echo(json.dumps([float(x) for x in vector]))


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--budget", "budget_file", required=True, type=click.Path(path_type=Path),
              help="TOML file of size, latency, relative and quality budgets (see docs/checks.md).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
@click.option("--junit", type=click.Path(path_type=Path), help="Also write a JUnit XML file, one testcase per budget.")
@click.option("--baseline", type=click.Path(path_type=Path),
              help="Saved measurements the [relative] budgets compare with.")
@click.option("--save-baseline", type=click.Path(path_type=Path), help="Save this run's latency measurements here.")
def check(package, budget_file, as_json, junit, baseline, save_baseline):
    """Judge PACKAGE against a budget file: exit 0 if every budget holds, 1 if one fails, 2 on bad input."""
    run = run_check(package, budget_file, baseline, save_baseline)
    click.echo(report.to_json(run.results, run.metrics) if as_json else report.table(run.results), nl=False)
    if junit:
        report.write_junit(junit, run.results, str(package))
    if save_baseline:
        click.echo(f"saved baseline to {save_baseline}", err=True)
    if not run.passed:
        sys.exit(1)


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--adapter", "adapters", multiple=True, metavar="NAME[:WEIGHT]",
              help="Adapter (or NAME:WEIGHT) to measure beside the base; repeatable (default: every adapter).")
@click.option("--runs", default=5, show_default=True, help="Measured runs per target, after one warm-up.")
@click.option("--prompt-tokens", default=32, show_default=True)
@click.option("--decode-tokens", default=32, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as JSON.")
def bench(package, adapters, runs, prompt_tokens, decode_tokens, as_json):
    """Measure PACKAGE on this machine: prefill and decode per adapter against the base, swap and load costs."""
    model = EdgeModel.open(package)
    targets = [None] + [parse_generate_adapters((spec,)) for spec in adapters or model.adapters]
    if runs < 1:
        raise EdgeLoraError(f"--runs {runs}: need at least 1")
    settings = LatencySettings(runs=runs, warmup=1, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens)
    rows = compare(model, targets, settings)
    resident = [n for n in model.adapters if n in model.stats()["resident"]]
    extra = {}
    if resident and model.manifest.mode != "merged":
        extra = {"hot_swap_us": hot_swap_us(model, resident), "cold_load_ms": cold_load_ms(model, resident[0], runs)}
    extra["peak_rss"] = peak_rss_bytes()
    if as_json:
        click.echo(json.dumps({"targets": rows, **extra, "settings": asdict(settings)}, indent=2))
        return
    # an encoder's forward pass is its prefill; it decodes nothing, so its overhead is on the forward pass
    key = "decode_ms_per_token" if model.manifest.task == "causal-lm" else "prefill_ms"
    base = rows["(base)"][key]
    decode_header = f" {'decode ms/token':>15}" if key == "decode_ms_per_token" else ""
    click.echo(f"{'target':<24} {'prefill ms':>10}{decode_header} {'vs base':>8}")
    for label, r in rows.items():
        overhead = "-" if label == "(base)" else f"{r[key] / base - 1:+.1%}"
        decode = f" {r['decode_ms_per_token']:>15.3f}" if decode_header else ""
        click.echo(f"{label:<24} {r['prefill_ms']:>10.2f}{decode} {overhead:>8}")
    if "hot_swap_us" in extra:
        click.echo(f"hot swap {extra['hot_swap_us']:.1f} µs, "
                   f"cold load of {resident[0]} {extra['cold_load_ms']:.2f} ms")
    work = f"{prompt_tokens}-token prompt" + (f", {decode_tokens} new tokens" if decode_header else "")
    click.echo(f"peak RSS {human_bytes(extra['peak_rss'])}; {work}, median of {runs} interleaved runs")


@main.command()
@click.argument("base_dir", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help='JSONL training data, one {"prompt": ..., "completion": ...} per line.')
@click.option("--out", required=True, type=click.Path(path_type=Path), help="PEFT adapter folder to write.")
@click.option("--rank", default=8, show_default=True, help="LoRA rank.")
@click.option("--alpha", default=16.0, show_default=True, help="LoRA alpha (scale = alpha / rank).")
@click.option("--targets", default="all-linear", show_default=True,
              help="Comma-separated module names (q_proj,v_proj), or all-linear.")
@click.option("--epochs", default=1, show_default=True, help="Passes over --data (unless --max-steps).")
@click.option("--max-steps", default=None, type=int, help="Optimizer steps; overrides --epochs.")
@click.option("--lr", default=2e-3, show_default=True, help="Peak learning rate (linear warmup and decay).")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--seed", default=0, show_default=True, help="Same seed, data and settings: the same adapter.")
@click.option("--eval-data", type=click.Path(path_type=Path),
              help="Held-out JSONL: report its loss and greedy exact-match accuracy at the end.")
@click.option("--overwrite", is_flag=True, help="Replace an existing adapter folder at --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(base_dir, data, out, rank, alpha, targets, epochs, max_steps, lr, batch_size, seed, eval_data, overwrite,
          quiet):
    """Train a PEFT LoRA adapter for BASE_DIR on prompt/completion pairs (loss on the completion only)."""
    from .training.trainer import train_adapter

    r = train_adapter(base_dir, data, out, rank=rank, alpha=alpha, targets=targets, epochs=epochs,
                      max_steps=max_steps, lr=lr, batch_size=batch_size, seed=seed, eval_data=eval_data,
                      overwrite=overwrite, progress=not quiet)
    click.echo(f"wrote {out}: {r.steps} steps in {r.seconds:.1f}s, final train loss {r.train_loss:.4f}")
    if r.eval_loss is not None:
        click.echo(f"eval {eval_data}: loss {r.eval_loss:.4f}, exact match {r.exact_match:.1%}")


@main.command()
@click.option("--out", default="demo-out", show_default=True, type=click.Path(path_type=Path),
              help="Working folder for the tenants' data and the package.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Where trained tenant adapters are kept and reused  [default: ~/.cache/edgelora/demo]")
@click.option("--no-cache", is_flag=True, help="Train every tenant adapter again.")
@click.option("--quantize", type=click.Choice(["int8", "int4"]), default="int8", show_default=True,
              help="Base weight quantization of the package.")
@click.option("--adapter-dtype", type=click.Choice(DTYPES), default="int8", show_default=True,
              help="How the package stores the tenants' adapters.")
@click.option("--quick", is_flag=True, help="A few training steps on small sets: checks the pipeline, not the skills.")
def demo(out, cache_dir, no_cache, quantize, adapter_dtype, quick):
    """Train tenant adapters on the shipped base, export one package, and serve the tenants per request."""
    from .demo.run import run_demo

    run_demo(out, cache_dir=cache_dir, use_cache=not no_cache, quantize=quantize, quick=quick,
             adapter_dtype=adapter_dtype)


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--port", default=8000, show_default=True, help="Port on 127.0.0.1 (0: any free port).")
@click.option("--page", type=click.Path(path_type=Path), default=None,
              help="The page's folder, with its node_modules  [default: examples/web of this clone]")
def web(package, port, page):
    """Serve the example web page and PACKAGE on loopback: the package runs in the browser (onnxruntime-web)."""
    from .web import PAGE, open_server

    server = open_server(package, port, page or PAGE)
    click.echo(f"serving {package} at {server.url} (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; other than loopback only with --keys.")
@click.option("--port", default=8000, show_default=True)
@click.option("--keys", type=click.Path(path_type=Path), default=None,
              help="TOML file of API keys (sha256), tenants and the adapters each may use (see docs/serve.md).")
@click.option("--adapter-memory-mb", type=float, default=None, help="Cap on resident adapter memory (LRU eviction).")
@click.option("--adapter-dir", type=click.Path(path_type=Path), default=None,
              help="Where uploaded adapters are kept  [default: PACKAGE/served-adapters]")
@click.option("--model-name", default=None, help="The base model's name in requests  [default: the package folder's]")
@click.option("--max-tokens", default=4096, show_default=True, help="The largest max_tokens a request may ask for.")
@click.option("--max-body-mb", default=1.0, show_default=True, help="Largest request body (uploads excepted).")
@click.option("--max-upload-mb", default=256.0, show_default=True, help="Largest adapter upload.")
@click.option("--grace", default=30.0, show_default=True, help="Seconds running requests get to finish on SIGTERM.")
@click.option("--max-batch", default=8, show_default=True, help="Requests that decode together in one step.")
@click.option("--max-queue", default=64, show_default=True, help="Requests that wait for a row; past them: 429.")
@click.option("--ray", "on_ray", is_flag=True,
              help="Serve from Ray Serve replicas, each adapter routed to where it is warm (needs edgelora[ray]).")
@click.option("--replicas", default=2, show_default=True, help="With --ray: replicas of the model.")
@click.option("--adapters-per-replica", default=4, show_default=True,
              help="With --ray: adapters (or compositions) kept warm per replica.")
@click.option("--replica-memory-mb", type=float, default=None, help="With --ray: each replica's adapter memory cap.")
@click.option("--replica-cpus", default=1.0, show_default=True, help="With --ray: Ray CPUs per replica.")
@click.option("--routing", type=click.Choice(["adapter", "load"]), default="adapter", show_default=True,
              help="With --ray: to a replica where the request's adapter is warm, or Ray's default (the less busy "
                   "of two replicas, for comparison).")
@click.option("--ray-address", default=None,
              help="With --ray: a running Ray cluster (auto, ray://HOST:10001)  [default: start one here]")
def serve(package, host, port, keys, adapter_memory_mb, adapter_dir, model_name, max_tokens, max_body_mb,
          max_upload_mb, grace, max_batch, max_queue, on_ray, replicas, adapters_per_replica, replica_memory_mb,
          replica_cpus, routing, ray_address):
    """Serve PACKAGE over OpenAI's HTTP API; each request picks its adapter through `model` (needs edgelora[serve])."""
    try:
        from .server.run import serve as run_server
        from .server.settings import MIB, Settings
    except ImportError as e:
        raise EdgeLoraError(f"edgelora serve needs the serve extra: pip install 'edgelora[serve]' ({e})") from None
    settings = Settings(host=host, port=port, keys=keys, adapter_dir=adapter_dir, model_name=model_name,
                        max_tokens=max_tokens, max_body_bytes=int(max_body_mb * MIB),
                        max_upload_bytes=int(max_upload_mb * MIB), grace_s=grace)
    if on_ray and adapter_memory_mb is not None:
        raise EdgeLoraError("--adapter-memory-mb: with --ray, each replica's cap is --replica-memory-mb")
    if on_ray:
        serve_on_ray(package, settings, replicas, adapters_per_replica, replica_memory_mb, replica_cpus,
                     routing == "adapter", ray_address, max_batch, max_queue)
    else:
        run_server(package, settings, adapter_memory_mb=adapter_memory_mb, max_batch=max_batch, max_queue=max_queue)


def serve_on_ray(package, settings, replicas, adapters_per_replica, replica_memory_mb, replica_cpus,
                 route_by_adapter, address, max_batch, max_queue) -> None:
    """``edgelora serve --ray``: the same settings, the model's replicas on Ray (see docs/ray.md)."""
    try:
        from .server.ray_app import RayOptions, serve_on_ray as run_on_ray
    except ImportError as e:
        raise EdgeLoraError(f"edgelora serve --ray needs the ray extra: pip install 'edgelora[serve,ray]' ({e})") \
            from None
    run_on_ray(package, settings, RayOptions(replicas=replicas, adapters_per_replica=adapters_per_replica,
                                             replica_memory_mb=replica_memory_mb, replica_cpus=replica_cpus,
                                             max_batch=max_batch, max_queue=max_queue,
                                             route_by_adapter=route_by_adapter, address=address))


if __name__ == "__main__":
    main()
