"""``edgelora train``: a PEFT LoRA adapter from prompt/completion pairs, the loss on the completion only.

The output is the folder PEFT's own ``save_pretrained`` writes, so ``export``, ``add-adapter`` and
``PeftModel.from_pretrained`` read it like any other adapter. The training loop is plain PyTorch (AdamW,
transformers' linear schedule): the demo's base is pretrained with the same loop, and it stays deterministic
under a seed on CPU. Prompts and completions are tokenized separately, exactly as generation will see the
prompt, so the model never learns from a token that straddles the boundary.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from edgelora.errors import EdgeLoraError
from edgelora.exporters.base_model import check_base_dir, load_base
from edgelora.exporters.examples import IGNORE, Example, encode, load_tokenizer, read_examples
from edgelora.format.fileio import atomic_dir


@dataclass
class TrainResult:
    steps: int
    train_loss: float  # mean over the last tenth of the steps
    seconds: float
    eval_loss: float | None = None
    exact_match: float | None = None


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    import torch

    width = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (x, y) in enumerate(pairs):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def fit(model, tokenizer, examples: list[Example], steps: int, lr: float, batch_size: int, seed: int,
        progress: bool = True, desc: str = "training") -> list[float]:
    """Train the model's trainable parameters for ``steps`` batches, reshuffling the data every epoch; the losses."""
    import torch
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    encoded = [encode(tokenizer, ex) for ex in examples]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, min(100, steps // 10), steps)
    order = torch.Generator().manual_seed(seed)
    batches = (len(encoded) + batch_size - 1) // batch_size
    losses = []
    model.train()
    with tqdm(total=steps, desc=desc, disable=not progress, unit="step", dynamic_ncols=True) as bar:
        while len(losses) < steps:
            perm = torch.randperm(len(encoded), generator=order).tolist()
            for b in range(min(batches, steps - len(losses))):
                batch = collate([encoded[i] for i in perm[b * batch_size: (b + 1) * batch_size]], pad_id(tokenizer))
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
                bar.update()
    model.eval()
    return losses


def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy continuations of each prompt, up to its first EOS (left-padded batches, as generation expects)."""
    import torch

    eos = tokenizer.eos_token_id
    out = []
    for start in range(0, len(prompts), batch_size):
        rows = [tokenizer(p)["input_ids"] for p in prompts[start: start + batch_size]]
        width = max(map(len, rows))
        ids = torch.tensor([[pad_id(tokenizer)] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        with torch.no_grad():
            generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                       do_sample=False, eos_token_id=eos, pad_token_id=pad_id(tokenizer))
        for new in generated[:, width:].tolist():
            new = new[: new.index(eos)] if eos in new else new
            out.append(tokenizer.decode(new, skip_special_tokens=True))
    return out


@dataclass
class Evaluation:
    loss: float  # per completion token
    exact_match: float
    answers: list[str]


def evaluate(model, tokenizer, examples: list[Example], batch_size: int = 64) -> Evaluation:
    """Loss on the completions, and how many greedy answers equal them exactly.

    Generation stops one token past the longest reference (its EOS): a longer answer cannot match.
    """
    import torch

    encoded = [encode(tokenizer, ex) for ex in examples]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = collate(encoded[start: start + batch_size], pad_id(tokenizer))
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            total += float(model(**batch).loss) * n
            count += n
    longest = max(len(y) - y.count(IGNORE) for _, y in encoded)
    answers = greedy_completions(model, tokenizer, [ex.prompt for ex in examples], longest, batch_size)
    matches = sum(a == ex.completion for a, ex in zip(answers, examples))
    return Evaluation(total / count, matches / len(examples), answers)


def parse_targets(targets: str) -> str | list[str]:
    """``all-linear`` (PEFT's own shorthand: every linear layer but the output head) or comma-separated names."""
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise EdgeLoraError(f"--targets {targets!r}: expected all-linear or module names such as q_proj,v_proj")
    return "all-linear" if names == ["all-linear"] else names


def train_adapter(base_dir: str | Path, data: str | Path, out: str | Path, rank: int = 8, alpha: float = 16.0,
                  targets: str = "all-linear", epochs: int = 1, max_steps: int | None = None, lr: float = 2e-3,
                  batch_size: int = 16, seed: int = 0, eval_data: str | Path | None = None, overwrite: bool = False,
                  progress: bool = True) -> TrainResult:
    """Train one LoRA adapter on ``data`` and save it as a PEFT folder at ``out``; ``max_steps`` overrides
    ``epochs``. With ``eval_data``, measure its loss and greedy exact-match at the end."""
    import time

    import torch
    from peft import LoraConfig, get_peft_model

    base_dir, out = Path(base_dir), Path(out)
    for name, value in (("--rank", rank), ("--epochs", epochs), ("--batch-size", batch_size)):
        if value < 1:
            raise EdgeLoraError(f"{name} {value}: must be at least 1")
    if max_steps is not None and max_steps < 1:
        raise EdgeLoraError(f"--max-steps {max_steps}: must be at least 1")
    for name, value in (("--alpha", alpha), ("--lr", lr)):
        if not math.isfinite(value) or value <= 0:
            raise EdgeLoraError(f"{name} {value}: must be a positive number")
    if out.exists() and not overwrite:
        raise EdgeLoraError(f"{out}: already exists (pass --overwrite to replace it)")
    examples = read_examples(data)
    held_out = read_examples(eval_data) if eval_data is not None else None
    check_base_dir(base_dir)
    tokenizer = load_tokenizer(base_dir)
    base = load_base(base_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=parse_targets(targets), lora_dropout=0.0,
                        task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notes inside PEFT
        try:
            model = get_peft_model(base, config)
        except ValueError as e:
            raise EdgeLoraError(f"--targets {targets}: {str(e).splitlines()[0]}") from None
    steps = max_steps or epochs * math.ceil(len(examples) / batch_size)
    t0 = time.perf_counter()
    losses = fit(model, tokenizer, examples, steps, lr, batch_size, seed, progress, desc=f"training {out.name}")
    tail = losses[-max(1, steps // 10):]
    result = TrainResult(steps=steps, train_loss=sum(tail) / len(tail), seconds=time.perf_counter() - t0)
    if held_out is not None:
        scores = evaluate(model, tokenizer, held_out)
        result.eval_loss, result.exact_match = scores.loss, scores.exact_match
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
    return result
