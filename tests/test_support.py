"""The README's support table, generated from the parametrization of the parity and error tests.

Every family named in a cell is one whose package passes ``test_parity.py`` with that variant's
adapter; every "no" is an error tested below. Regenerate with ``python tests/test_support.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FAMILY_ADAPTERS, MERGED_ADAPTERS, make_adapter

# variant, the parity fixtures' adapters that use it, and in separate mode the refused feature's label
VARIANTS = [
    ("`target_modules` as a list", ("plain", "rs", "layers", "embedding", "dora", "extras"), None),
    ("`target_modules` as a regex string", ("regex",), None),
    ('`target_modules="all-linear"`', ("all-linear",), None),
    ("`layers_to_transform`", ("layers",), None),
    ("rsLoRA (`use_rslora`)", ("rs",), None),
    ("`rank_pattern` / `alpha_pattern`", ("patterns",), None),
    ("LoRA on embeddings (`lora_embedding_A/B`)", ("embedding", "dora"), None),
    ("older PEFT: `adapter_model.bin`, adapter name in keys", ("legacy",), None),
    ("DoRA (`use_dora`)", ("dora",), "DoRA"),
    ("`modules_to_save`", ("saved", "extras"), "modules_to_save"),
    ('`bias="lora_only"` or `"all"`', ("bias", "extras"), "bias='all'"),
    ("`lora_bias`", ("lora-bias", "extras"), "lora_bias"),
]
README = Path(__file__).resolve().parents[1] / "README.md"


def families_with(adapters: tuple[str, ...], table: dict[str, list[str]]) -> str:
    return ", ".join(f for f, names in table.items() if set(adapters) & set(names))


def support_table() -> str:
    rows = ["| PEFT variant | separate mode (swappable slots) | merged mode |", "|---|---|---|"]
    for label, adapters, refused in VARIANTS:
        separate = "no: refused, naming `--mode merged`" if refused else families_with(adapters, FAMILY_ADAPTERS)
        merged = families_with(adapters, MERGED_ADAPTERS) or "not tested"
        rows.append(f"| {label} | {separate} | {merged} |")
    return "\n".join(rows)


def test_readme_has_the_generated_support_table():
    assert support_table() in README.read_text(), "README's support table is stale: run python tests/test_support.py"


def test_every_yes_cell_has_its_adapter_in_a_parity_fixture():
    """A variant listed with no family at all in separate mode would be a silent gap in the table."""
    for label, adapters, refused in VARIANTS:
        assert refused or families_with(adapters, FAMILY_ADAPTERS), label
        assert not refused or families_with(adapters, MERGED_ADAPTERS), label


@pytest.fixture(scope="module")
def qwen2_base(tmp_path_factory):
    """Qwen2 has biases on q/k/v, so bias variants save real tensors."""
    from edgelora.demo.tiny_models import build_causal_lm

    return build_causal_lm(tmp_path_factory.mktemp("qwen2-base") / "base", family="qwen2", with_tokenizer=False)


@pytest.mark.parametrize("adapter, feature", [(a[0], r) for _, a, r in VARIANTS if r])
def test_separate_mode_refuses_merge_only_variants_naming_merged_mode(qwen2_base, tmp_path, adapter, feature):
    from edgelora.errors import EdgeLoraError
    from edgelora.exporters.peft_ingest import ingest_peft

    make_adapter(qwen2_base, tmp_path / adapter, adapter, seed=7, family="qwen2")
    with pytest.raises(EdgeLoraError) as e:
        ingest_peft(tmp_path / adapter)
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(tmp_path / adapter))
    assert feature in message and "export this adapter with --mode merged" in message
    assert ingest_peft(tmp_path / adapter, merged=True).extra["merge_only"] == [feature]


def test_merged_mode_refuses_embedding_lora_on_tied_embeddings(tmp_path):
    """GPT-2 ties wte to lm_head: merging would change the output layer, which PEFT's forward does not."""
    from edgelora.demo.tiny_models import build_causal_lm
    from edgelora.errors import EdgeLoraError
    from edgelora.exporters.merge import merged_copy
    from edgelora.exporters.peft_ingest import ingest_peft

    base = build_causal_lm(tmp_path / "base", family="gpt2", with_tokenizer=False)
    make_adapter(base, tmp_path / "a", "embedding", seed=3, family="gpt2")
    with pytest.raises(EdgeLoraError, match=r"LoRA on transformer\.wte, which the base ties to its output layer.*"
                                            "export it in separate mode"):
        merged_copy(base, ingest_peft(tmp_path / "a", merged=True), "a")


if __name__ == "__main__":
    print(support_table())
