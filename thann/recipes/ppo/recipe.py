"""PPO fine-tuning (finetune_ppo.py): the actor learns to write responses a reward prefers, kept
near where it started by a KL penalty.

Slots (thann.training.slots):
    actor       THANN from ``init_from`` (any layout), trained, dropout off (so that the rollout's
                and the update's log-probabilities are of the same policy)
    critic      THANN's decoder with a value per position (thann_value), from ``ppo.critic.init_from``
                (default: the actor's start; the head is new), trained at ``ppo.critic.lr``;
                absent with a group baseline (``ppo.advantage=grpo|rloo``)
    reference   the actor's start, frozen: π_ref of the KL penalty (a second copy of the actor's
                weights in memory, no optimizer state)
    reward      only when ``ppo.reward`` is a checkpoint: a frozen thann_value scoring the last token

One iteration (one trainer step; train.global_batch_size prompts, ppo.samples_per_prompt
responses each):
1. rollout: the KV-cached generator continues this rank's prompts with the actor, sampling at
   ``ppo.temperature`` (optional top-p), recording each token's log-probability with
   ``losses.policy_logprobs``, the same function the update uses (the real vocabulary, the
   temperature applied);
2. the reference's log-probabilities and the critic's values of the same sequences, the score of
   each response (reward on its last token; ``ppo.length_penalty`` off a response that hit the
   budget without an end token) and the per-token KL estimate (k1, k2 or k3) to the reference,
   in the reward (coefficient fixed or adaptive) or in the loss;
3. the rollouts of every data-parallel rank are gathered, so advantages — GAE (γ, λ) with the
   critic, or a group baseline over each prompt's samples — and their whitening are the same
   numbers in every layout;
4. ``ppo.epochs`` passes over seeded mini-batches of the whole batch (each rank its rows):
   clipped policy loss (asymmetric and dual clip allowed), entropy bonus, KL in the loss when
   chosen; clipped value loss; each slot's optimizer steps per mini-batch (only the critic's during
   ``ppo.critic_warmup_iterations``).
Losses are token means over the mini-batch's response tokens (StepContext.forward_backward).
Evaluation: the held-out prompts, sampled as in training from a fixed seed: their mean reward,
and a few completions appended to ``samples.jsonl`` beside the metrics.
"""

import functools
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from omegaconf import DictConfig, OmegaConf

from thann.checkpoint.weights import checkpoint_path, primary_slot, saved_run, saved_slots
from thann.config import require
from thann.data.order import SampleOrder
from thann.inference.generator import Generator
from thann.inference.load import saved_tokenizer
from thann.inference.sampling import SamplingParams
from thann.parallel import state
from thann.recipes.ppo import losses
from thann.recipes.ppo.prompts import load_prompts
from thann.recipes.ppo.rewards import is_checkpoint, reward_function, scores
from thann.training.metrics import SAMPLES_FILE
from thann.training.recipe import Recipe
from thann.training.slots import SlotSpec

ADVANTAGES = ("gae", "grpo", "rloo")
KL_ESTIMATORS = ("k1", "k2", "k3")
# A rollout's per-response arrays ([R] or [R, S]), what mini-batches are cut from.
PER_ROW = ("tokens", "mask", "old_logp", "ref_logp", "values", "advantages", "returns")


def _record(path: str, field: str) -> tuple[str, dict, dict]:
    """(checkpoint, its metadata, its primary slot's record) of a run or iter_* directory."""
    checkpoint = checkpoint_path(path, field)
    metadata = saved_run(checkpoint, field)
    return checkpoint, metadata, saved_slots(metadata)[primary_slot(metadata)]


def sequence_length(cfg: DictConfig) -> int:
    """Prompt and response budget, rounded up to a multiple of the tensor-parallel size (sequence
    parallelism splits every sequence evenly; the padding is never read)."""
    tp = cfg.parallel.tp
    return -(-(cfg.ppo.max_prompt_tokens + cfg.ppo.max_new_tokens) // tp) * tp


def _without_dropout(args: dict, arch: str) -> DictConfig:
    args = {**args, "arch": arch, "hidden_dropout": 0.0, "attention_dropout": 0.0}
    if "tokenization" in args:
        args["tokenization"] = {**args["tokenization"], "dropout": 0.0}
    return OmegaConf.create(args)


class PPO(Recipe):
    name = "ppo"
    primary = "actor"

    @staticmethod
    def check(cfg: DictConfig, dp: int) -> None:
        p, train = cfg.ppo, cfg.train
        require(cfg.init_from is not None, "init_from", None, "PPO fine-tunes a trained model: name its checkpoint")
        _, metadata, actor = _record(str(cfg.init_from), "init_from")
        require(actor["args"].get("arch", "thann") == "thann", "init_from", cfg.init_from,
                f"holds a {actor['args'].get('arch')} model; the actor is a THANN language model")
        require(p.advantage in ADVANTAGES, "ppo.advantage", p.advantage, f"must be one of {list(ADVANTAGES)}")
        require(p.kl_estimator in KL_ESTIMATORS, "ppo.kl_estimator", p.kl_estimator,
                f"must be one of {list(KL_ESTIMATORS)}")
        require(p.kl_in in ("reward", "loss"), "ppo.kl_in", p.kl_in, "must be reward or loss")
        require(isinstance(p.samples_per_prompt, int) and p.samples_per_prompt >= 1, "ppo.samples_per_prompt",
                p.samples_per_prompt, "must be a positive integer")
        require(p.advantage == "gae" or p.samples_per_prompt >= 2, "ppo.samples_per_prompt", p.samples_per_prompt,
                f"ppo.advantage={p.advantage} compares the samples of each prompt: use 2 or more")
        for field in ("max_prompt_tokens", "max_new_tokens", "epochs", "mini_batches"):
            require(isinstance(p[field], int) and p[field] >= 1, f"ppo.{field}", p[field], "must be a positive integer")
        require(p.temperature > 0, "ppo.temperature", p.temperature, "must be positive (sampling)")
        require(0 < p.top_p <= 1, "ppo.top_p", p.top_p, "must be in (0, 1]")
        require(p.clip > 0 and (p.clip_high is None or p.clip_high > 0), "ppo.clip", p.clip, "must be positive")
        require(p.dual_clip is None or p.dual_clip > 1, "ppo.dual_clip", p.dual_clip, "must be null or > 1")
        require(p.kl_target is None or p.kl_target > 0, "ppo.kl_target", p.kl_target, "must be null or positive")
        rows = train.global_batch_size * p.samples_per_prompt // dp
        require(rows % (p.mini_batches * train.micro_batch_size) == 0, "ppo.mini_batches", p.mini_batches,
                f"each rank's {rows} responses per iteration must split into mini-batches of whole micro-batches "
                f"of train.micro_batch_size={train.micro_batch_size}")
        if p.prompts != "sharegpt":  # a user's file: its bad records are known before anything is built
            load_prompts(p, saved_tokenizer(metadata, None, "init_from"))
        if is_checkpoint(str(p.reward)):
            _, _, reward = _record(str(p.reward), "ppo.reward")
            require(reward["args"].get("arch") == "thann_value", "ppo.reward", p.reward,
                    "a reward checkpoint holds a THANN with a value head (thann_value)")
        else:
            reward_function(str(p.reward))

    @staticmethod
    def slots(cfg: DictConfig) -> dict:
        p = cfg.ppo
        init, _, actor = _record(str(cfg.init_from), "init_from")
        seq, vocab = sequence_length(cfg), actor["vocab_size"]
        slots = {"actor": SlotSpec(_without_dropout(actor["args"], "thann"), "init_from", vocab, seq, optim=cfg.train,
                                   init=init),
                 "reference": SlotSpec(_without_dropout(actor["args"], "thann"), "init_from", vocab, seq, init=init)}
        if p.advantage == "gae":
            critic_init, _, critic = _record(str(p.critic.init_from or cfg.init_from), "ppo.critic.init_from")
            optim = OmegaConf.merge(cfg.train, {"lr": p.critic.lr, "min_lr": min(cfg.train.min_lr, p.critic.lr)})
            slots["critic"] = SlotSpec(_without_dropout(critic["args"], "thann_value"), "ppo.critic.init_from",
                                       critic["vocab_size"], seq, optim=optim, init=critic_init, init_strict=False,
                                       init_field="ppo.critic.init_from")
        if is_checkpoint(str(p.reward)):
            path, _, reward = _record(str(p.reward), "ppo.reward")
            slots["reward"] = SlotSpec(OmegaConf.create(reward["args"]), "ppo.reward", reward["vocab_size"], seq,
                                       init=path, init_field="ppo.reward")
        return slots

    def __init__(self, cfg: DictConfig, layout):
        super().__init__(cfg, layout)
        self.p, train = cfg.ppo, cfg.train
        _, metadata, _ = _record(str(cfg.init_from), "init_from")
        self.tokenizer = saved_tokenizer(metadata, None, "init_from")
        self.prompts, self.heldout = load_prompts(self.p, self.tokenizer)
        self.seq_length = sequence_length(cfg)
        self.tokens_per_sample = self.seq_length * self.p.samples_per_prompt
        self.G, self.M, self.n = train.global_batch_size, train.micro_batch_size, self.p.samples_per_prompt
        self.share = SampleOrder(self.G, self.G // layout.dp, layout.dp, layout.dp_rank).rows(0)
        self.kl = losses.KLController(self.p.kl_coef, self.p.kl_target, self.p.kl_horizon)
        self.reward = None if is_checkpoint(str(self.p.reward)) else reward_function(str(self.p.reward))
        self.samples_path = os.path.join(str(cfg.checkpoint.dir), SAMPLES_FILE)

    def state(self) -> dict:
        return {"kl_coef": self.kl.coef}

    def load_state(self, saved: dict) -> None:
        self.kl.coef = saved["kl_coef"]

    # -- prompts ------------------------------------------------------------------------------------

    def train_batches(self, consumed_samples: int):
        """This rank's prompts of each iteration, as (global position of the first, prompts): the
        training prompts in a fresh seeded order per epoch."""
        g = consumed_samples // self.G
        while True:
            start = g * self.G + self.share.start
            yield start, [self._prompt(i) for i in range(start, start + len(self.share))]
            g += 1

    def _prompt(self, position: int):
        epoch, index = divmod(position, len(self.prompts))
        return self.prompts[self._order(epoch)[index]]

    @functools.lru_cache(maxsize=2)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.cfg.train.seed, epoch]).permutation(len(self.prompts))

    # -- rollout ------------------------------------------------------------------------------------

    def _logprobs(self, logits, tokens):
        return losses.policy_logprobs(logits, tokens, self.p.temperature, self.tokenizer.vocab_size,
                                      self.tokenizer.unused_ids)

    def rollout(self, ctx, first: int, prompts: list, seed: int, for_update: bool = True) -> dict:
        """This rank's rollouts of ``prompts`` (global position ``first`` onwards), scored; with
        what the update needs (the reference's log-probabilities, the critic's values) unless not
        ``for_update``."""
        params = SamplingParams(max_new_tokens=self.p.max_new_tokens, temperature=float(self.p.temperature),
                                top_p=float(self.p.top_p), seed=seed)
        repeated = [prompt.ids for prompt in prompts for _ in range(self.n)]
        generator = Generator(ctx.slots["actor"].chunks, self.tokenizer, self.seq_length)
        start = time.perf_counter()
        results = generator.generate(repeated, params, first_index=first * self.n, logprobs=self._logprobs)
        seconds = time.perf_counter() - start
        R, S, eod = len(results), self.seq_length, self.tokenizer.eod
        tokens = torch.full((R, S), eod, dtype=torch.long)
        mask = torch.zeros(R, S)
        old = torch.zeros(R, S)
        for r, result in enumerate(results):
            p, n = len(result.prompt_tokens), len(result.tokens)
            tokens[r, :p + n] = torch.tensor(result.prompt_tokens + result.tokens)
            mask[r, p:p + n] = 1
            old[r, p:p + n] = torch.tensor(result.logprobs)
        batch = {"tokens": tokens, "mask": mask, "old_logp": old,
                 "truncated": torch.tensor([float(r.finish_reason == "length") for r in results]),
                 "generated": torch.tensor(float(sum(len(r.tokens) for r in results))),
                 "seconds": torch.tensor(seconds)}
        if for_update:
            batch["ref_logp"] = self._per_token(ctx, "reference", batch, self._token_logprobs)
            if "critic" in ctx.slots:
                batch["values"] = self._per_token(ctx, "critic", batch, self._token_values)
        texts = [r.text for r in results]
        batch["score"] = self._scores(ctx, batch, [p.text for p in prompts for _ in range(self.n)], texts)
        batch["score"] -= self.p.length_penalty * batch["truncated"]
        batch["texts"] = texts
        return batch

    def _token_logprobs(self, batch: dict, model):
        """log π(token) of every token from the logits one position before it ([M, S]; 0 at 0)."""
        tokens = batch["tokens"].to(state.device())

        def finish(logits):
            logp = torch.zeros(tokens.shape, device=tokens.device)
            logp[:, 1:] = self._logprobs(logits[:, :-1], tokens[:, 1:])
            return logp

        return model(tokens, self._positions(tokens), None, runtime_gather_output=True), finish

    def _token_values(self, batch: dict, model):
        """V of the state before every token: the value head one position before it ([M, S])."""
        def finish(out):
            values = torch.zeros_like(out)
            values[:, 1:] = out[:, :-1]
            return values

        return self._head(batch, model)[0], finish

    def _head(self, batch: dict, model):
        """A value model's output at every position: the value of the state after that token."""
        tokens = batch["tokens"].to(state.device())
        return model(tokens, self._positions(tokens)), lambda out: out

    @staticmethod
    def _positions(tokens: torch.Tensor) -> torch.Tensor:
        return torch.arange(tokens.size(1), device=tokens.device).expand_as(tokens)

    def _micro_batches(self, batch: dict, rows: torch.Tensor):
        for start in range(0, len(rows), self.M):
            chosen = rows[start:start + self.M]
            yield {k: batch[k][chosen] for k in PER_ROW if k in batch}

    def _per_token(self, ctx, slot: str, batch: dict, forward_step) -> torch.Tensor:
        """``forward_step``'s finished [R, S] output for this rank's rollouts, on every pipeline stage."""
        R = len(batch["tokens"])
        outputs = ctx.forward(slot, forward_step, self._micro_batches(batch, torch.arange(R)),
                              num_microbatches=R // self.M, seq_length=self.seq_length, micro_batch_size=self.M)
        result = torch.cat(outputs).float() if outputs else torch.zeros(R, self.seq_length, device=state.device())
        return _from_last_stage(result).cpu()

    def _scores(self, ctx, batch: dict, prompts: list[str], responses: list[str]) -> torch.Tensor:
        if self.reward is None:  # a reward model: its value of the state after the last response token
            values = self._per_token(ctx, "reward", batch, self._head)
            return values[torch.arange(len(values)), _last_response_token(batch["mask"])]
        # The callable runs once per model-parallel group (it may be costly or random) and every
        # rank of the group learns its result, or its error.
        group = parallel_state.get_model_parallel_group()
        outcome = [None]
        if dist.get_rank(group) == 0:
            try:
                outcome = [scores(self.reward, str(self.p.reward), prompts, responses)]
            except Exception as e:  # RewardError: raised on every rank below
                outcome = [e]
        dist.broadcast_object_list(outcome, src=dist.get_global_rank(group, 0), group=group)
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        return torch.tensor(outcome[0])

    # -- one iteration ------------------------------------------------------------------------------

    def step(self, ctx, batches) -> dict[str, float]:
        first, prompts = next(batches)
        mine = self.rollout(ctx, first, prompts, seed=self.cfg.train.seed)
        batch = _gather(mine)
        stats = self.advantages(batch)
        self.kl.update(stats["kl"], len(batch["tokens"]))
        warmup = ctx.position.step < self.p.critic_warmup_iterations
        updates = self.update(ctx, batch, ctx.position.step, train_actor=not warmup)
        record = {**stats, **updates,
                  "rollout_tokens_per_s": float(batch["generated"].sum() / batch["seconds"].max()),
                  "kl_coef": self.kl.coef}
        record["loss"] = record.get("policy_loss", 0.0) + record.get("value_loss", 0.0)
        return record

    def advantages(self, batch: dict) -> dict[str, float]:
        """Token rewards, advantages and returns of the gathered batch (in place); rollout metrics."""
        mask, score = batch["mask"], batch["score"]
        kl = losses.kl_estimate(batch["old_logp"], batch["ref_logp"], self.p.kl_estimator) * mask
        rewards = -self.kl.coef * kl if self.p.kl_in == "reward" else torch.zeros_like(kl)
        rewards[torch.arange(len(score)), _last_response_token(mask)] += score * (mask.sum(1) > 0)
        if self.p.advantage == "gae":
            advantages, returns = losses.gae(rewards.double(), batch["values"].double(), mask.double(),
                                             self.p.gamma, self.p.lam)
            advantages, returns = advantages.float(), returns.float()
        else:
            sequence = losses.group_advantages(rewards.sum(1).double(), self.n, self.p.advantage).float()
            advantages = returns = sequence[:, None] * mask
        if self.p.whiten:
            advantages = losses.whiten(advantages, mask)
        batch["advantages"], batch["returns"] = advantages, returns
        sequence_kl = (losses.kl_estimate(batch["old_logp"], batch["ref_logp"], "k1") * mask).sum(1)
        stats = {"reward_mean": score.mean().item(), "reward_std": score.std().item() if len(score) > 1 else 0.0,
                 "kl": sequence_kl.mean().item(), "response_length": mask.sum(1).mean().item(),
                 "truncated_fraction": batch["truncated"].mean().item()}
        if "values" in batch:
            stats["explained_variance"] = losses.explained_variance(batch["values"], returns, mask)
        return stats

    def update(self, ctx, batch: dict, step: int, train_actor: bool) -> dict[str, float]:
        R = len(batch["tokens"])
        size = R // self.p.mini_batches
        order = SampleOrder(size, self.M, self.layout.dp, self.layout.dp_rank)
        sums, first_diff, tokens, start = {}, None, 0, time.perf_counter()
        for epoch in range(self.p.epochs):
            permutation = torch.from_numpy(np.random.default_rng([self.cfg.train.seed, step, epoch]).permutation(R))
            for k in range(self.p.mini_batches):
                chosen = permutation[k * size:(k + 1) * size]
                mine = torch.cat([chosen[list(order.rows(m))] for m in range(order.num_microbatches)])
                tokens += len(chosen) * self.seq_length
                results = {}
                if train_actor:
                    diffs = []
                    means = ctx.forward_backward(
                        "actor", lambda b, model: self._policy_loss(b, model, diffs), self._micro_batches(batch, mine),
                        count=_response_tokens, num_microbatches=order.num_microbatches, seq_length=self.seq_length,
                        micro_batch_size=self.M)
                    means["grad_norm"] = ctx.optimizer_step("actor", means["policy_loss"])
                    results.update(means)
                    if first_diff is None:
                        first_diff = _world_max(max(diffs) if diffs else 0.0)
                if "critic" in ctx.slots:
                    means = ctx.forward_backward(
                        "critic", self._value_loss, self._micro_batches(batch, mine), count=_response_tokens,
                        num_microbatches=order.num_microbatches, seq_length=self.seq_length, micro_batch_size=self.M)
                    results["value_loss"] = means["value_loss"]
                    results["critic_grad_norm"] = ctx.optimizer_step("critic", means["value_loss"])
                for key, value in results.items():
                    sums.setdefault(key, []).append(value)
        record = {key: float(np.mean(values)) for key, values in sums.items()}
        if first_diff is not None:
            record["logprob_diff_max"] = first_diff
        record["train_tokens_per_s"] = tokens * (1 + ("critic" in ctx.slots)) / (time.perf_counter() - start)
        return record

    def _policy_loss(self, batch: dict, model, diffs: list):
        tokens = batch["tokens"].to(state.device())
        logits = model(tokens, self._positions(tokens), None, runtime_gather_output=True)
        device = logits.device
        mask, old, advantages = (batch[k].to(device) for k in ("mask", "old_logp", "advantages"))

        def loss(logits):
            # The rollout's policy_logprobs, computed once with the distribution's entropy.
            log_softmax = losses.sampling_log_softmax(logits[:, :-1], self.p.temperature, self.tokenizer.vocab_size,
                                                      self.tokenizer.unused_ids)
            logp = torch.zeros(tokens.shape, device=device)
            logp[:, 1:] = losses.token_logprobs(log_softmax, tokens[:, 1:])
            entropy = torch.zeros(tokens.shape, device=device)
            entropy[:, 1:] = losses.entropy(log_softmax)
            per_token, ratio, clipped = losses.clipped_policy_loss(
                logp, old, advantages, self.p.clip, self.p.clip_high or self.p.clip, self.p.dual_clip)
            per_token = per_token - self.p.entropy_coef * entropy
            if self.p.kl_in == "loss":
                per_token = per_token + self.kl.coef * losses.kl_estimate(logp, batch["ref_logp"].to(device),
                                                                          self.p.kl_estimator)
            count = mask.sum()
            diffs.append(((logp - old).abs() * mask).max().item())
            log_ratio = (logp - old).detach()
            report = {"policy_loss": (per_token * mask).sum().detach(), "clip_fraction": (clipped * mask).sum(),
                      "ratio_mean": (ratio.detach() * mask).sum(), "entropy": (entropy.detach() * mask).sum(),
                      "approx_kl": (0.5 * log_ratio ** 2 * mask).sum()}
            return (per_token * mask).sum(), {k: torch.stack([v, count]) for k, v in report.items()}

        return logits, loss

    def _value_loss(self, batch: dict, model):
        tokens = batch["tokens"].to(state.device())
        out = model(tokens, self._positions(tokens))
        device = out.device
        mask, old, returns = (batch[k].to(device) for k in ("mask", "values", "returns"))

        def loss(out):
            values = torch.zeros(tokens.shape, device=device)
            values[:, 1:] = out[:, :-1]
            per_token = losses.clipped_value_loss(values, old, returns, self.p.value_clip) * mask
            return per_token.sum(), {"value_loss": torch.stack([per_token.sum().detach(), mask.sum()])}

        return out, loss

    # -- evaluation ---------------------------------------------------------------------------------

    def evaluate(self, ctx) -> dict[str, float]:
        """The held-out prompts' mean reward (sampled as in training, from a fixed seed)."""
        share = SampleOrder(len(self.heldout), len(self.heldout) // self.layout.dp, self.layout.dp,
                            self.layout.dp_rank).rows(0)
        held = self.heldout[share.start:share.stop]
        mine = self.rollout(ctx, share.start, held, seed=self.cfg.train.seed + 1, for_update=False)
        batch = _gather(mine)
        mean = batch["score"].mean().item()
        if dist.get_rank() == 0:
            texts = [p.text for p in self.heldout for _ in range(self.n)]
            with open(self.samples_path, "a", encoding="utf-8") as f:
                for i in range(min(self.p.samples_to_log, len(texts))):
                    f.write(json.dumps({"step": ctx.position.step, "prompt": texts[i], "response": batch["texts"][i],
                                        "reward": batch["score"][i].item()}) + "\n")
        return {"loss": -mean, "reward_mean_heldout": mean}


def _response_tokens(batch: dict):
    return batch["mask"].sum()


def _last_response_token(mask: torch.Tensor) -> torch.Tensor:
    """The position of each row's last response token (0 for a row without one)."""
    return (mask * torch.arange(mask.size(1))).argmax(1)


def _from_last_stage(tensor: torch.Tensor) -> torch.Tensor:
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(tensor, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return tensor


def _world_max(value: float) -> float:
    flag = torch.tensor([value], device=state.device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item()


def _gather(batch: dict) -> dict:
    """Every data-parallel rank's rollouts, in rank order (the global order of the prompts)."""
    group = parallel_state.get_data_parallel_group()
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, batch, group=group)
    gathered = {}
    for key, value in batch.items():
        if key == "texts":
            gathered[key] = [t for part in parts for t in part[key]]
        elif value.dim() == 0:
            gathered[key] = torch.stack([part[key] for part in parts])
        else:
            gathered[key] = torch.cat([part[key] for part in parts])
    return gathered
