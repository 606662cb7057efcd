"""The web page against the Python runtime, token for token, on the demo's package and held-out prompts.

usage: .venv/bin/python examples/web/test/parity.py DEMO_OUT [--per-tenant N] [--screenshot PNG]

DEMO_OUT is what ``edgelora demo --out DEMO_OUT`` wrote (package/ and data/*.test.jsonl). The Python runtime
answers every prompt first; then ``edgelora web`` serves the package on loopback and drive.mjs has headless
Chromium ask the page the same prompts, tenants interleaved so every request switches adapter. Both run
onnxruntime on one thread, so their decode ms/token, printed at the end, are measured alike in one run.
Exits 1 when an answer differs, the page fails, or the adapters change no answer (a page that ignored them
would then pass).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from edgelora.exporters.examples import read_examples
from edgelora.runtime import EdgeModel

HERE = Path(__file__).resolve().parent
EDGELORA = Path(sys.executable).with_name("edgelora")
SERVER_EXIT_S = 60
BROWSER_TIMEOUT_S = 600


def held_out_cases(model: EdgeModel, data: Path, per_tenant: int) -> list[dict]:
    """The first prompts of each tenant's held-out file, interleaved: tenant A, B, C, D, A, B, ..."""
    examples = {name: read_examples(data / f"{name}.test.jsonl")[:per_tenant] for name in model.adapters}
    longest = max(len(ex.completion) for chosen in examples.values() for ex in chosen)
    return [{"tenant": name, "prompt": chosen[i].prompt, "maxNewTokens": longest + 1}  # a token per character, EOS
            for i in range(per_tenant) for name, chosen in examples.items() if i < len(chosen)]


def python_answers(model: EdgeModel, cases: list[dict]) -> list[dict]:
    answers = []
    for case in cases:
        r = model.generate(case["prompt"], adapter=case["tenant"], max_new_tokens=case["maxNewTokens"])
        base = model.generate(case["prompt"], max_new_tokens=case["maxNewTokens"])
        answers.append({"text": r.text, "tokenIds": r.token_ids, "msPerToken": r.decode_ms_per_token,
                        "baseTokenIds": base.token_ids})
    return answers


def page_answers(package: Path, cases: list[dict], screenshot: Path) -> dict:
    """Serve the package with ``edgelora web`` on a free loopback port and drive the page through the cases."""
    server = subprocess.Popen([str(EDGELORA), "web", str(package), "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()  # "serving PKG at URL (Ctrl-C to stop)"
        if " at http://127.0.0.1:" not in line:
            raise SystemExit(f"edgelora web did not start: {line!r}")
        url = line.split(" at ", 1)[1].split()[0]
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            json.dump(cases, f)
            f.flush()
            run = subprocess.run(["node", str(HERE / "drive.mjs"), url, f.name, str(screenshot)], capture_output=True,
                                 text=True, timeout=BROWSER_TIMEOUT_S)
        if run.returncode != 0:
            raise SystemExit(f"the browser run failed:\n{run.stderr.strip()}")
        return json.loads(run.stdout)
    finally:
        server.terminate()
        server.wait(timeout=SERVER_EXIT_S)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo_out", type=Path)
    parser.add_argument("--per-tenant", type=int, default=8)
    parser.add_argument("--screenshot", type=Path, default=HERE.parent / "test-artifacts" / "page.png")
    args = parser.parse_args()
    package = args.demo_out / "package"
    model = EdgeModel.open(package, intra_op_threads=1)
    cases = held_out_cases(model, args.demo_out / "data", args.per_tenant)
    expected = python_answers(model, cases)
    args.screenshot.parent.mkdir(parents=True, exist_ok=True)
    page = page_answers(package, cases, args.screenshot)
    print(f"page: {page['status']}")

    passed = failed = 0
    for case, want, got in zip(cases, expected, page["results"], strict=True):
        same = got["tokenIds"] == want["tokenIds"] and got["text"] == want["text"]
        passed, failed = passed + same, failed + (not same)
        if not same:
            print(f"DIFFERENT {case['tenant']} {case['prompt']!r}: page {got['tokenIds']} {got['text']!r}, "
                  f"python {want['tokenIds']} {want['text']!r}")
    for tenant in model.adapters:
        rows = [(w, g) for c, w, g in zip(cases, expected, page["results"]) if c["tenant"] == tenant]
        print(f"{tenant:<8} {sum(w['tokenIds'] == g['tokenIds'] for w, g in rows)}/{len(rows)} answers equal, "
              f"e.g. {rows[0][1]['prompt']!r} -> {rows[0][1]['text']!r}")
    changed = sum(w["tokenIds"] != w["baseTokenIds"] for w in expected)
    print(f"the adapters change {changed} of {len(cases)} answers from the base's")
    if changed == 0:
        print("the adapters change no answer: this package cannot tell a page that ignores them")
        failed += 1
    browser = statistics.median(g["msPerToken"] for g in page["results"])
    python = statistics.median(w["msPerToken"] for w in expected)
    print(f"decode ms/token, median of {len(cases)} requests, one thread each: browser (onnxruntime-web, WebAssembly) "
          f"{browser:.3f}, Python runtime (onnxruntime CPU) {python:.3f}")
    print(f"screenshot: {args.screenshot}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
