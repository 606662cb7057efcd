"""Nothing on the load path unpickles: a pickle can run any code, and packages and adapters come from tenants.

Two checks: the sources call no unpickling API (``torch.load`` only with ``weights_only=True``), and a
device-side run (open a package, load a blob from a path, logits, generate) triggers no ``pickle.find_class``
audit event. The corpus in test_bad_inputs.py feeds pickle payloads to the host side and checks they never run.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = re.compile(r"\bimport pickle\b|\bfrom pickle\b|\bcloudpickle\b|\bdill\b|\bjoblib\b|\bshelve\b|"
                       r"allow_pickle\s*=\s*True|\bmarshal\.loads?\b|trust_remote_code\s*=\s*True")


def calls(text: str, name: str):
    """The argument text of every call ``name(...)``, nested parentheses included."""
    for m in re.finditer(re.escape(name) + r"\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        yield text[m.end(): i - 1]


def sources():
    return [p for folder in ("edgelora", "runtime", "exporters") for p in sorted((ROOT / folder).rglob("*.py"))]


def test_sources_call_no_unpickling_api():
    found = []
    for path in sources():
        text = path.read_text()
        found += [f"{path.relative_to(ROOT)}: {m[0]}" for m in FORBIDDEN.finditer(text)]
        found += [f"{path.relative_to(ROOT)}: torch.load({args})" for args in calls(text, "torch.load")
                  if "weights_only=True" not in args]
    assert not found, found
    assert any("torch.load(" in p.read_text() for p in sources())  # the legacy .bin reader is still scanned


RUN = """
import sys
events = []
sys.addaudithook(lambda event, args: events.append(args[:2]) if event == "pickle.find_class" else None)
from edgelora.runtime import EdgeModel
model = EdgeModel.open(sys.argv[1], adapter_memory_mb=1)
model.load_adapter(sys.argv[2], name="copied")
model.logits([1, 2, 3], adapter="plain")
model.generate([1, 2, 3], adapter={"copied": 0.5, "rs": 0.5}, max_new_tokens=3)
assert "torch" not in sys.modules
print(events)
"""


def test_runtime_never_unpickles(llama, tmp_path):
    import shutil

    blob = tmp_path / "copied.onnx_adapter"
    shutil.copy(llama.package / "adapters/plain.onnx_adapter", blob)
    result = subprocess.run([sys.executable, "-c", RUN, str(llama.package), str(blob)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
