"""The ``edgelora`` command. Host-side commands import the exporters (torch) only when they run."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from .errors import EdgeLoraError


class Group(click.Group):
    """Every EdgeLoraError becomes one line on stderr and exit code 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeLoraError as e:
            click.echo(f"edgelora: error: {e}", err=True)
            sys.exit(e.exit_code)


def parse_adapter_spec(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise EdgeLoraError(f"--adapter {spec!r}: expected NAME=PEFT_DIR")
    return name, path


def parse_generate_adapters(specs: tuple[str, ...]):
    """``NAME`` -> the adapter; ``NAME:WEIGHT`` -> its strength; several -> their composition."""
    if not specs:
        return None
    if len(specs) == 1 and ":" not in specs[0]:
        return specs[0]
    weights: dict[str, float] = {}
    for spec in specs:
        name, sep, weight = spec.partition(":")
        try:
            value = float(weight) if sep else 1.0
        except ValueError:
            raise EdgeLoraError(f"--adapter {spec!r}: expected NAME or NAME:WEIGHT with a number") from None
        if not name or name in weights:
            raise EdgeLoraError(f"--adapter {spec!r}: " + ("the same name is given twice" if name else "no name"))
        weights[name] = value
    return weights


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@click.group(cls=Group)
@click.version_option(package_name="edgelora")
def main():
    """Hugging Face base + PEFT LoRA adapters -> an ONNX package with swappable adapters, and its runtime."""


@main.command()
@click.argument("base_dir", type=click.Path(path_type=Path))
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PEFT_DIR",
              help="A PEFT LoRA adapter folder to package; repeat for several.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Package directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing package at --out.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def export(base_dir, adapters, out, overwrite, quiet):
    """Export BASE_DIR (a Hugging Face causal LM folder) with one LoRA slot per targeted module."""
    from .exporters.package_writer import export_package

    specs = dict(parse_adapter_spec(s) for s in adapters)
    if len(specs) != len(adapters):
        raise EdgeLoraError("--adapter: the same name is given twice")
    export_package(base_dir, specs, out, overwrite=overwrite, progress=not quiet)


@main.command("add-adapter")
@click.argument("package", type=click.Path(path_type=Path))
@click.argument("spec", metavar="NAME=PEFT_DIR")
@click.option("--overwrite", is_flag=True, help="Replace an adapter of the same name.")
def add_adapter_cmd(package, spec, overwrite):
    """Add a PEFT adapter to an existing package without re-exporting the base."""
    from .exporters.package_writer import add_adapter

    t0 = time.perf_counter()
    name, path = parse_adapter_spec(spec)
    entry = add_adapter(package, name, path, overwrite=overwrite)
    click.echo(f"added {name}: {entry.file}, rank {entry.rank}, {human_bytes(entry.bytes)} "
               f"in {time.perf_counter() - t0:.1f}s")


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
def inspect(package):
    """Show what a package holds: graph, slots, adapters and their sizes."""
    from .manifest import load_manifest

    m = load_manifest(package)
    graph = package / m.graph["file"]
    data = package / (m.graph["file"] + ".data")
    base_bytes = graph.stat().st_size + (data.stat().st_size if data.exists() else 0) if graph.exists() else 0
    g = m.graph
    click.echo(f"package     {package}  (format {m.format_version}, {m.created_by})")
    click.echo(f"model       {m.architecture} ({m.family}, {m.task}), {g['num_layers']} layers, vocab {g['vocab_size']}")
    click.echo(f"base        {human_bytes(base_bytes)}, quantization {m.base_quantization}, {m.base_fingerprint[:23]}…")
    click.echo(f"slots       {len(m.slots)}: {', '.join(sorted({s.name.rsplit('.', 1)[-1] for s in m.slots}))}")
    click.echo(f"tokenizer   {m.tokenizer or 'none'}")
    click.echo(f"adapters    {len(m.adapters)}")
    if m.adapters:
        click.echo(f"  {'name':<20} {'rank':>4} {'dtype':<5} {'modules':>7} {'bytes':>10} {'PEFT bytes':>10}")
        for name, a in sorted(m.adapters.items()):
            click.echo(f"  {name:<20} {a.rank:>4} {a.dtype:<5} {len(a.modules):>7} {human_bytes(a.bytes):>10} "
                       f"{human_bytes(a.source_bytes):>10}")


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
@click.option("--stats", is_flag=True, help="Print prefill and decode timings to stderr.")
def generate(package, prompt, adapters, max_new_tokens, temperature, top_k, top_p, seed, stop, stats):
    """Generate text from PACKAGE with the chosen adapter, streaming to stdout."""
    from .runtime import EdgeModel

    adapter = parse_generate_adapters(adapters)
    model = EdgeModel.open(package)
    pieces = model.stream(prompt, adapter=adapter, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, seed=seed, stop=list(stop))
    for piece in pieces:
        click.echo(piece, nl=False)
    click.echo()
    if stats:
        r = pieces.result
        click.echo(f"prompt {r.prompt_tokens} tokens, prefill {r.prefill_ms:.1f} ms, {len(r.token_ids)} new tokens, "
                   f"decode {r.decode_ms_per_token:.2f} ms/token, finish: {r.finish_reason}", err=True)


@main.command()
@click.option("--out", default="demo-out", show_default=True, type=click.Path(path_type=Path),
              help="Working folder for the demo's base model, adapters and package.")
def demo(out):
    """Build a small base and adapters, export them, and run the runtime swapping adapters per request."""
    from .exporters.demo import run_demo

    run_demo(out)


if __name__ == "__main__":
    main()
