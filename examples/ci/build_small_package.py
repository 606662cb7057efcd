"""Build a tiny random-weight base and two PEFT LoRA adapters for CI to export and check.

Usage: python examples/ci/build_small_package.py OUT_DIR
writes OUT_DIR/base (a save_pretrained folder) and OUT_DIR/adapters/{legal,support} (PEFT folders);
then: edgelora export OUT_DIR/base --adapter legal=OUT_DIR/adapters/legal ... --out OUT_DIR/pkg
"""

import sys
from pathlib import Path

from edgelora.demo.tiny_models import build_causal_lm, random_peft_adapter


def main(out: Path) -> None:
    base = build_causal_lm(out / "base", family="llama", size="tiny", seed=0)
    random_peft_adapter(base, out / "adapters" / "legal", seed=1, r=8, alpha=16, targets=("q_proj", "v_proj"))
    random_peft_adapter(base, out / "adapters" / "support", seed=2, r=4, alpha=8,
                        targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    print(f"built {out}/base and adapters legal, support")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[2])
    main(Path(sys.argv[1]))
