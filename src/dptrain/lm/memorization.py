"""The memorisation experiment: does a fine-tuned language model repeat a customer's secret, with and without DP?

1. Generate the synthetic support-chat corpus (``dptrain.lm.corpus``): users with several conversations, canary
   users whose 6-digit pin occurs in 1, 4 and 16 of their conversations, held-out validation users.
2. Pre-train one small GPT-2 on *public* conversations (other made-up users, no canary): the base model. The
   tokenizer's vocabulary also comes from public text only.
3. Fine-tune copies of the base with LoRA adapters on the private corpus: non-privately, and with user-level
   DP-SGD at each target epsilon (users Poisson-sampled, each user's summed gradient clipped as one unit).
4. Evaluate every model (the base too): validation perplexity, each canary's exposure (Carlini et al. 2019) among
   all 10^6 pins, and greedy extraction (does the prompt "customer: hi, this is <name>. ... my pin is" make the
   model write the pin?).

**Budget.** Each DP run is charged to its own user-level budget for the corpus in a ``BudgetLedger`` (cap = the
run's epsilon): fine-tuning takes ``1 - eval_share`` of the cap (the engine reserves the planned steps, then
settles), and the validation perplexity is released with user-level DP in what is left
(:func:`dptrain.lm.evaluation.private_validation_perplexity`), so the ledger shows the split. Canary exposure and
extraction are computed from the released model and the experimenter's own planted canaries: post-processing,
free. The non-private run is a reference that a deployment would not release; it is charged nowhere.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dptrain.accounting import StepRecord, composed_epsilon, smallest_noise_multiplier
from dptrain.budget import LEDGER_PLD_DISCRETIZATION, BudgetLedger
from dptrain.lm.corpus import public_support_chats, support_chat_corpus, vocabulary_text
from dptrain.lm.data import lm_dataset
from dptrain.lm.evaluation import canary_report, private_validation_perplexity, validation_perplexity
from dptrain.lm.generation import generate
from dptrain.lm.models import add_lora, count_parameters, tiny_gpt2
from dptrain.lm.tokenizer import SimpleTokenizer
from dptrain.lm.training import PrivacySettings, train_causal_lm
from dptrain.rundir import json_number


#: The prompt of the text sample shown for every model (sampling from a DP model is free post-processing).
SAMPLE_PROMPT = "customer: hi, this is ada costa.\nagent:"


@dataclass(frozen=True)
class MemorizationConfig:
    """Every setting of the experiment (fixed in advance: nothing is tuned on the private corpus)."""

    # Corpus
    num_users: int = 1000
    validation_users: int = 1000
    conversations_per_user: tuple[int, int] = (1, 4)
    canary_repeats: tuple[int, ...] = (1, 4, 16)
    canaries_per_level: int = 3
    # Model and public pre-training
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    max_length: int = 96
    public_conversations: int = 4000
    pretrain_epochs: int = 3
    pretrain_lr: float = 3e-3
    # Fine-tuning (every parameter; lora_rank > 0 trains LoRA adapters of that rank instead)
    lora_rank: int = 0
    lora_alpha: float = 32.0
    epochs: int = 12
    lr: float = 3e-3
    batch_size: int = 32
    # DP
    epsilons: tuple[float, ...] = (8.0, 3.0)
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    user_reduction: str = "sum"
    users_per_step: float = 250.0
    dp_lr: float = 3e-4
    eval_share: float = 0.1
    loss_bound: float = 2.0
    # Evaluation
    exposure_samples: int = 10_000
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: The result's fields computed from the private corpus (training or validation users) without noise.
OUTSIDE_THE_GUARANTEE = {
    "runs[].validation_perplexity": "exact perplexity of the validation users (released_validation_perplexity is "
    "the DP release of it)",
    "corpus": "conversation counts of the synthetic corpus (public here: generated from the config's seed)",
}

#: ``--quick``: a smaller corpus (400 training users), less public text, fewer sampled exposure candidates; about
#: 2 minutes on 2 CPU cores.
QUICK = MemorizationConfig(
    num_users=400,
    validation_users=500,
    public_conversations=2000,
    users_per_step=100.0,
    exposure_samples=2000,
)


def _eval_noise_multiplier(train_records: list[StepRecord], cap: float, delta: float) -> float:
    """The smallest Gaussian noise multiplier (to 0.1 % of the cap) for one release of sensitivity 1 that, composed with the
    recorded fine-tuning, keeps the ledger's total within ``cap``, computed with the ledger's own arithmetic."""

    def epsilon(sigma: float) -> float:
        return composed_epsilon([*train_records, StepRecord(1.0, sigma, 1)], delta, LEDGER_PLD_DISCRETIZATION)

    try:
        return smallest_noise_multiplier(epsilon, cap, tolerance=1e-3)
    except ValueError as err:
        raise ValueError("the fine-tuning run left no budget for the evaluation release") from err


def _ledger_view(ledger: BudgetLedger, name: str) -> dict[str, Any]:
    summary = ledger.summary(name)
    budget = summary.budget
    entries = []
    for e in ledger.history(name):
        alone = composed_epsilon([e.record()], budget.delta, LEDGER_PLD_DISCRETIZATION)
        phase = "evaluation" if e.note.startswith("evaluation") else "fine-tuning"
        entries.append({
            "id": e.id, "phase": phase, "status": e.status, "sample_rate": e.sample_rate,
            "noise_multiplier": e.noise_multiplier, "steps": e.steps, "privacy_unit": e.privacy_unit,
            "epsilon_alone": alone, "note": e.note,
        })  # fmt: skip
    return {
        "budget": name, "cap": budget.epsilon, "delta": budget.delta, "privacy_unit": budget.privacy_unit,
        "spent": summary.spent, "remaining": summary.remaining, "entries": entries,
    }  # fmt: skip


def run_memorization_experiment(
    config: MemorizationConfig = MemorizationConfig(),
    *,
    ledger_path: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the experiment; returns a JSON-ready dict (``config``, ``corpus``, ``model``, ``runs``, ``ledger``,
    ``separation``, ``seconds``). ``ledger_path``: the SQLite ledger to record in (default: a temporary file).
    ``log`` receives progress lines."""
    say = log or (lambda message: None)
    start = time.perf_counter()
    if config.lora_rank < 0 or config.epochs <= 0:
        raise ValueError("lora_rank must be >= 0 and epochs > 0")
    for eps in config.epsilons:
        if not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"epsilons must be finite and > 0, got {eps}")
    if not 0 < config.eval_share < 1:
        raise ValueError(f"eval_share must be in (0, 1), got {config.eval_share}")

    tokenizer = SimpleTokenizer.from_texts([vocabulary_text()])
    corpus = support_chat_corpus(
        num_users=config.num_users,
        validation_users=config.validation_users,
        conversations_per_user=config.conversations_per_user,
        canary_repeats=tuple(r for r in config.canary_repeats for _ in range(config.canaries_per_level)),
        seed=config.seed,
    )
    train_set = lm_dataset(tokenizer, corpus.texts("train"), config.max_length)
    validation_set = lm_dataset(tokenizer, corpus.texts("validation"), config.max_length)
    train_users = corpus.user_ids("train")
    validation_users = corpus.user_ids("validation")
    say(f"corpus: {len(corpus.train)} training conversations of {config.num_users} users, "
        f"{len(corpus.validation)} validation conversations, canaries repeated "
        f"{list(config.canary_repeats)} times")  # fmt: skip

    base = tiny_gpt2(
        tokenizer.vocab_size, n_layer=config.n_layer, n_embd=config.n_embd, n_head=config.n_head,
        n_positions=config.max_length, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, seed=config.seed,
    )  # fmt: skip
    public_texts = public_support_chats(config.public_conversations, seed=config.seed + 1)
    public = lm_dataset(tokenizer, public_texts, config.max_length)
    say(f"pre-training the base model on {len(public)} public conversations")
    pretrain = train_causal_lm(
        base, public, epochs=config.pretrain_epochs, lr=config.pretrain_lr, batch_size=config.batch_size,
        seed=config.seed, log=say,
    )  # fmt: skip

    def evaluate(model: torch.nn.Module) -> dict[str, Any]:
        canaries = [
            canary_report(model, tokenizer, c, num_samples=config.exposure_samples, seed=config.seed + k)
            for k, c in enumerate(corpus.canaries)
        ]
        sample = generate(
            model, tokenizer, SAMPLE_PROMPT, max_new_tokens=40, greedy=False, temperature=0.8,
            generator=torch.Generator().manual_seed(config.seed),
        )  # fmt: skip
        return {
            "validation_perplexity": validation_perplexity(model, validation_set),
            "by_repeats": by_repeats(canaries),
            "canaries": canaries,
            "sample": SAMPLE_PROMPT + sample,
        }

    runs: list[dict[str, Any]] = []
    base_row = {"name": "public base (no fine-tuning)", "epsilon": None, "privacy_unit": None,
                "training": pretrain.to_dict(), **evaluate(base)}  # fmt: skip
    runs.append(base_row)
    say(_row_line(base_row))

    temporary = None
    if ledger_path is None:
        temporary = tempfile.TemporaryDirectory(prefix="dptrain-memorization-")
        ledger_path = Path(temporary.name) / "privacy.db"
    ledger = BudgetLedger(ledger_path)
    ledger_views = []
    try:
        settings: list[tuple[str, float | None]] = [("non-private", None)]
        settings += [(f"DP eps={e:g}", e) for e in config.epsilons]
        for index, (name, epsilon) in enumerate(settings):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed + 100)
                model = copy.deepcopy(base)
                if config.lora_rank > 0:
                    model = add_lora(model, r=config.lora_rank, alpha=config.lora_alpha)
            privacy = None
            budget_name = None
            if epsilon is not None:
                budget_name = _unique_budget(ledger, f"support-chats/{name.replace(' ', '-')}")
                ledger.create(budget_name, epsilon=epsilon, delta=config.delta, privacy_unit="user")
                privacy = PrivacySettings(
                    target_epsilon=epsilon * (1 - config.eval_share),
                    delta=config.delta,
                    max_grad_norm=config.max_grad_norm,
                    privacy_unit="user",
                    user_reduction=config.user_reduction,
                    expected_units=config.users_per_step,
                    ledger=ledger,
                    budget=budget_name,
                )
            say(f"fine-tuning: {name} ({count_parameters(model)['trainable']} trainable parameters)")
            result = train_causal_lm(
                model, train_set, epochs=config.epochs, lr=config.lr if privacy is None else config.dp_lr,
                batch_size=config.batch_size, user_ids=train_users, privacy=privacy,
                seed=config.seed + 1 + index, log=say,
            )  # fmt: skip
            row: dict[str, Any] = {
                "name": name,
                "epsilon": json_number(result.epsilon),
                "target_epsilon": epsilon,
                "privacy_unit": "user" if privacy is not None else None,
                "training": result.to_dict(),
                **evaluate(model),
            }
            if budget_name is not None:
                records = [e.record() for e in ledger.history(budget_name)]
                sigma = _eval_noise_multiplier(records, epsilon, config.delta)
                released = private_validation_perplexity(
                    model, validation_set, validation_users, sigma, loss_bound=config.loss_bound,
                    random=result.random,  # the training run's noise stream, not a new seeded generator
                )  # fmt: skip
                ledger.spend(budget_name, 1.0, sigma, 1,
                             note=f"evaluation: validation perplexity released with user-level DP "
                                  f"(per-user loss bound {config.loss_bound:g})")  # fmt: skip
                row["released_validation_perplexity"] = released.to_dict()
                view = _ledger_view(ledger, budget_name)
                row["epsilon_total"] = view["spent"]
                ledger_views.append(view)
            runs.append(row)
            say(_row_line(row))
            del model
    finally:
        if temporary is not None:
            temporary.cleanup()

    return {
        "experiment": "memorization",
        "config": config.to_dict(),
        "corpus": corpus.summary(),
        "model": {"architecture": "gpt2", **count_parameters(base), "vocab_size": tokenizer.vocab_size,
                  "lora_rank": config.lora_rank},  # fmt: skip
        "runs": runs,
        "ledger": {"path": None if temporary is not None else str(ledger_path), "budgets": ledger_views},
        "separation": separation(runs),
        # Figures about the private corpus released without noise: an experiment on synthetic data shows them to
        # judge the DP runs; a deployment would release the DP ones only.
        "outside_the_guarantee": OUTSIDE_THE_GUARANTEE,
        "seconds": time.perf_counter() - start,
    }


def _unique_budget(ledger: BudgetLedger, name: str) -> str:
    existing = {b.name for b in ledger.budgets()}
    candidate, k = name, 1
    while candidate in existing:
        k += 1
        candidate = f"{name}#{k}"
    return candidate


def by_repeats(canaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per repetition count: the canaries' mean exposure (bits) and how many were extracted."""
    levels = sorted({c["repeats"] for c in canaries})
    out = []
    for r in levels:
        group = [c for c in canaries if c["repeats"] == r]
        out.append({
            "repeats": r,
            "canaries": len(group),
            "mean_exposure": sum(c["exposure"] for c in group) / len(group),
            "max_exposure": group[0]["max_exposure"],
            "extracted": sum(c["extracted"] for c in group),
        })  # fmt: skip
    return out


def separation(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The headline: the most repeated canaries' mean exposure without DP and with DP (the largest over DP runs),
    extractions, and whether the expected separation holds: the non-private mean exposure is above half the
    maximum and at least twice every DP run's, and no DP run extracts any canary."""
    nonprivate = next((r for r in runs if r["name"] == "non-private"), None)
    private = [r for r in runs if r.get("privacy_unit") == "user"]
    if nonprivate is None or not private:
        return {}
    top = nonprivate["by_repeats"][-1]
    dp_exposure = max(r["by_repeats"][-1]["mean_exposure"] for r in private)
    dp_extracted = sorted(c["name"] for r in private for c in r["canaries"] if c["extracted"])
    separated = top["mean_exposure"] > top["max_exposure"] / 2 and top["mean_exposure"] >= 2 * dp_exposure
    return {
        "repeats": top["repeats"],
        "nonprivate_mean_exposure": top["mean_exposure"],
        "max_dp_mean_exposure": dp_exposure,
        "max_exposure": top["max_exposure"],
        "nonprivate_extracted": [c["name"] for c in nonprivate["canaries"] if c["extracted"]],
        "dp_extracted": dp_extracted,
        "separated": bool(separated and not dp_extracted),
    }


def _row_line(row: dict[str, Any]) -> str:
    levels = ", ".join(
        f"x{g['repeats']}: {g['mean_exposure']:.1f} bits, {g['extracted']}/{g['canaries']} extracted"
        for g in row["by_repeats"]
    )
    return f"{row['name']}: validation perplexity {row['validation_perplexity']:.3f}; canary exposure {levels}"
