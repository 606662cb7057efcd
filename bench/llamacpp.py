"""llama.cpp as a peer of the decode bench: built from the sources vendored in the PyPI sdist of llama-cpp-python,
the base and the PEFT adapter converted with its own scripts, served by its ``llama-server`` with the adapter
applied per request (the ``lora`` field), prompts given as token ids.

The build (``llama-bench``, ``llama-server``, ``llama-quantize``) is cached in ``--llamacpp-cache``; every model
folder gets its GGUF files in ``WORK/llamacpp/``. The default weight repacking (llama.cpp's fastest Q4_0 path) has
crashed on some CPUs, so each run first tries it once per base type and falls back to ``--no-repack`` where the
server dies; ``setup.json`` records what was used.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"
TARGETS = ("llama-bench", "llama-server", "llama-quantize")
BASES = ("q4_0", "q8_0")
LORAS = ("f32", "q8_0")
CONTEXT = 2048
START_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 600


@dataclass(frozen=True)
class System:
    """One llama.cpp row: the base's weight type, the adapter's (None: no adapter loaded), the scale every request
    applies it at, and whether to force ``--no-repack`` (else the run's probe decides)."""

    base: str
    lora: str | None = None
    scale: float = 1.0
    force_no_repack: bool = False


SYSTEMS = {
    "llamacpp-q4_0": System("q4_0"),
    "llamacpp-q4_0-lora-f32": System("q4_0", "f32"),
    "llamacpp-q4_0-lora-f32-scale0": System("q4_0", "f32", 0.0),
    "llamacpp-q4_0-lora-q8_0": System("q4_0", "q8_0"),
    "llamacpp-q4_0-lora-f32-norepack": System("q4_0", "f32", force_no_repack=True),
    "llamacpp-q8_0-lora-f32": System("q8_0", "f32"),
    "llamacpp-q8_0-lora-f32-scale0": System("q8_0", "f32", 0.0),
    "llamacpp-q8_0-lora-q8_0": System("q8_0", "q8_0"),
}
LABELS = {
    "llamacpp-q4_0": "llama.cpp Q4_0, no adapter loaded",
    "llamacpp-q4_0-lora-f32": "llama.cpp Q4_0 + f32 LoRA",
    "llamacpp-q4_0-lora-f32-scale0": "llama.cpp Q4_0 + f32 LoRA at scale 0",
    "llamacpp-q4_0-lora-q8_0": "llama.cpp Q4_0 + q8_0 LoRA",
    "llamacpp-q4_0-lora-f32-norepack": "llama.cpp Q4_0 + f32 LoRA, `--no-repack`",
    "llamacpp-q8_0-lora-f32": "llama.cpp Q8_0 + f32 LoRA",
    "llamacpp-q8_0-lora-f32-scale0": "llama.cpp Q8_0 + f32 LoRA at scale 0",
    "llamacpp-q8_0-lora-q8_0": "llama.cpp Q8_0 + q8_0 LoRA",
}


def source_dir(cache: Path) -> Path:
    name, version = SDIST.split("==")
    return cache / f"{name.replace('-', '_')}-{version}" / "vendor/llama.cpp"


def build_llamacpp(cache: Path) -> Path:
    """The folder of the built binaries: the sdist fetched with pip (from PyPI, as every other package here), its
    vendored llama.cpp built once with cmake at low priority, both kept in ``cache`` for later runs."""
    bin_dir = cache / "build/bin"
    if all((bin_dir / target).exists() for target in TARGETS):
        return bin_dir
    cache.mkdir(parents=True, exist_ok=True)
    src = source_dir(cache)
    if not src.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", SDIST,
                        "-d", str(cache)], check=True)
        sdist = next(cache.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(cache, filter="data")
    print(f"building llama.cpp in {cache / 'build'} (long: tens of minutes on 2 cores) ...", file=sys.stderr,
          flush=True)
    nice = ["nice", "-n", "15"]
    subprocess.run([*nice, "cmake", "-S", str(src), "-B", str(cache / "build"), "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DCMAKE_BUILD_TYPE=Release",
                    "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON"], check=True, capture_output=True)
    subprocess.run([*nice, "cmake", "--build", str(cache / "build"), "-j2", "--target", *TARGETS], check=True)
    return bin_dir


def write_token_list(base: Path, out: Path) -> None:
    """A copy of the base folder (weights linked) whose tokenizer is a plain list of ``vocab_size`` tokens.

    The converter detects a vocabulary by the hash of how it splits a test text, and rejects the made-up character
    tokenizer; a Llama-style byte-fallback BPE with no merges is one it reads as a plain list of token strings. The
    bench feeds token ids, so the strings are never used.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((base / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config))
    for weights in base.glob("*.safetensors*"):
        target = out / weights.name
        if not target.exists():
            target.symlink_to(weights.resolve())
    vocab = {f"<0x{i:02X}>": i for i in range(256)}
    vocab.update({f"t{i}": i for i in range(256, config["vocab_size"])})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(out)


def converted(work: Path, bin_dir: Path, cache: Path, adapter: str = "a") -> dict[str, dict]:
    """The GGUF files of this model folder, made once: the base at f16, then Q4_0 and Q8_0 from it with
    ``llama-quantize``; adapter ``adapter`` at f32 and q8_0. Per file, its build seconds and peak RSS."""
    from decode import build

    out = work / "llamacpp"
    out.mkdir(parents=True, exist_ok=True)
    record = out / "converts.json"
    done = json.loads(record.read_text()) if record.exists() else {}
    src = source_dir(cache)
    hf = out / "hf"
    if not (hf / "tokenizer.json").exists():
        write_token_list(work / "base", hf)
    jobs = {}
    if not all((out / f"base-{base}.gguf").exists() for base in BASES):
        jobs["base-f16.gguf"] = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf), "--outtype", "f16",
                                 "--outfile", str(out / "base-f16.gguf")]
    for base in BASES:
        jobs[f"base-{base}.gguf"] = [str(bin_dir / "llama-quantize"), str(out / "base-f16.gguf"),
                                     str(out / f"base-{base}.gguf"), base.upper()]
    for lora in LORAS:
        jobs[f"lora-{lora}.gguf"] = [sys.executable, str(src / "convert_lora_to_gguf.py"), "--base", str(hf),
                                     "--outtype", lora, "--outfile", str(out / f"lora-{lora}.gguf"),
                                     str(work / "peft" / adapter)]
    for name, cmd in jobs.items():
        if not (out / name).exists():
            print(f"converting {name} in {work} ...", file=sys.stderr, flush=True)
            done[name] = build(cmd)
            record.write_text(json.dumps(done))
    return done


def prepare(work: Path, cache: Path, probe: bool = True) -> dict:
    """Build, convert, and (``probe``) try the default repacking once per base type; writes ``setup.json``, which
    the workers read."""
    bin_dir = build_llamacpp(cache)
    converts = converted(work, bin_dir, cache)
    setup_file = work / "llamacpp/setup.json"
    setup = json.loads(setup_file.read_text()) if setup_file.exists() else {}
    setup.update(bin_dir=str(bin_dir), converts=converts)
    if probe or "repack" not in setup:
        setup["repack"] = {base: repack_runs(work, bin_dir, base) for base in BASES}
    setup_file.write_text(json.dumps(setup, indent=1))
    return setup


def repack_runs(work: Path, bin_dir: Path, base: str) -> bool:
    """Whether the server with llama.cpp's default weight repacking answers a short request without dying."""
    try:
        with Server(bin_dir, work / "llamacpp" / f"base-{base}.gguf", None, repack=True,
                    log=work / "llamacpp" / f"probe-{base}.log") as server:
            server.complete([5, 6, 7, 8], 2, None)
        return True
    except ServerError as e:
        print(f"llama.cpp {base} with default repacking failed ({e}); using --no-repack", file=sys.stderr)
        return False


class ServerError(RuntimeError):
    pass


class Server:
    """A ``llama-server`` on 127.0.0.1 for the duration of a ``with`` block; every request bounded in time."""

    def __init__(self, bin_dir: Path, model: Path, lora: Path | None, repack: bool, log: Path, threads: int = 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.cmd = [str(bin_dir / "llama-server"), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                    "-t", str(threads), "-tb", str(threads), "-c", str(CONTEXT), "-np", "1", "--no-webui"]
        if lora is not None:
            self.cmd += ["--lora", str(lora), "--lora-init-without-apply"]
        if not repack:
            self.cmd.append("--no-repack")
        self.log = log
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        self.log_file = open(self.log, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"llama-server exited with {self.proc.returncode} at start; {self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise ServerError(f"llama-server not ready within {START_TIMEOUT_S} s; {self.tail()}")

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()

    def tail(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines()
        return "log: " + " | ".join(lines[-3:])

    def peak_rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024

    def complete(self, ids: list[int], new_tokens: int, scale: float | None) -> dict:
        """One greedy completion of ``ids``; the prompt is never served from the server's cache."""
        body = {"prompt": ids, "n_predict": new_tokens, "ignore_eos": True, "temperature": 0.0, "top_k": 1,
                "cache_prompt": False, "return_tokens": True}
        if scale is not None:
            body["lora"] = [{"id": 0, "scale": scale}]
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            state = "died" if self.proc.poll() is not None else "alive"
            raise ServerError(f"request failed ({e}); server {state}; {self.tail()}") from None


def worker(work: Path, systems: list[System], reps: int, long_prompt: int = 0) -> list[dict]:
    """The decode worker's results for llama.cpp rows that one server serves (the same base, adapter and repack
    setting; scales may differ), their requests taking turns; RSS is the server's."""
    from decode import NEW_TOKENS, THREADS, prompt_ids, read_through

    system = systems[0]
    if any((s.base, s.lora, s.force_no_repack) != (system.base, system.lora, system.force_no_repack) for s in systems):
        sys.exit("llama.cpp rows share a server only with the same base, adapter and repack setting")
    setup = json.loads((work / "llamacpp/setup.json").read_text())
    repack = setup["repack"][system.base] and not system.force_no_repack
    lora = None if system.lora is None else work / "llamacpp" / f"lora-{system.lora}.gguf"
    scales = [None if lora is None else s.scale for s in systems]
    log = work / "llamacpp" / "server.log"
    base = work / "llamacpp" / f"base-{system.base}.gguf"
    read_through(base, *([lora] if lora else []))
    with Server(Path(setup["bin_dir"]), base, lora, repack, log, THREADS) as server:
        def turns(prompt: list[int], new_tokens: int) -> list[list[dict]]:
            runs = [[] for _ in scales]
            for _ in range(reps):
                for i, scale in enumerate(scales):
                    runs[i].append(server.complete(prompt, new_tokens, scale))
            return runs

        ids = prompt_ids()
        for scale in scales:
            server.complete(ids, 4, scale)
        results = [{"prefill_ms": [r["timings"]["prompt_ms"] for r in runs],
                    "decode_ms": [r["timings"]["predicted_per_token_ms"] for r in runs],
                    "tokens": runs[0].get("tokens", []), "repack": repack} for runs in turns(ids, NEW_TOKENS)]
        if long_prompt:
            for result, runs in zip(results, turns(prompt_ids(long_prompt), 1)):
                result["prefill_long_ms"] = [r["timings"]["prompt_ms"] for r in runs]
        for result in results:
            result["rss_mb"] = server.peak_rss_mb()
    return results
