"""Lesson 02's experiment run through TRL's GRPOTrainer, so the two can be compared side by side.

The same task, the same pi_sft (loaded from the same place), the same verifier as the reward, the
same 960 training questions in the same order, lesson 02's hyperparameters set by their TRL names,
and the same evaluation (task.evaluate) before and after. It prints lesson 02's table and writes
runs/trl_grpo/<run>/metrics.jsonl with lesson 02's keys, so plot_curves.py draws both (<run> named
as lesson 02 names its runs: seed<seed> at the defaults, e.g. mu-2_seed0 with --mu 2).

Run:  pip install trl==1.16.0          (optional, like matplotlib; the lessons never need it)
      python docs/trl_grpo.py --seed 0   (takes lesson 02's options: python docs/trl_grpo.py --help)

How lesson 02's options map (docs/beyond_one_machine.md has the sources). Every GRPOConfig field
that decides the maths is set here, because TRL's defaults are not the paper's (beta 0.0, loss_type
"dapo"):

    ours                      GRPOConfig
    group_size G              num_generations; per_device_train_batch_size =
                                generation_batch_size = B*G
    beta, clip_eps, mu        beta, epsilon (epsilon_high = epsilon), num_iterations
    loss_agg output|token|    loss_type "grpo" | "bnpo" | "dr_grpo" (one process, no accumulation:
             constant           the same three sums)
    scale_rewards group|none  scale_rewards "group" | "none"
    kl_estimator k3           TRL's only one (k1 and k2 stop here with an error)
    temperature, top_k=0,     temperature, top_k=0, top_p=1.0, min_p=None, repetition_penalty=1.0:
      top_p=1                   samples from the full softmax(logits / T), the pi_theta of the loss
    max_new_tokens            max_completion_length; mask_truncated_completions=False (as ours)
    Adam, warm-up, clip       our own torch.optim.Adam and LambdaLR, passed as `optimizers`;
                                max_grad_norm
    micro_batch_size          only the SFT warm start's: TRL takes each step's batch whole (its
                                gradient accumulation would average "bnpo" per micro-batch)

What we removed (differences that were ours to remove):
- The KL gradient: TRL 1.16 multiplies the k3 term by the ratio pi_theta / pi_old by default
  (use_bias_correction_kl=True, after DeepSeek-V3.2). At mu = 1 the ratio's value is 1 but its
  gradient is not, so the KL term's gradient becomes that of KL(pi_theta || pi_ref) instead of
  eq. (3)'s (in expectation that of KL(pi_ref || pi_theta), lesson 02's docstring). Off here: eq.
  (3) has no factor. tests/test_trl_grpo.py found it: with it on, TRL's loss on the same batch is
  not lesson 02's.
- Precision and memory: GRPOConfig defaults to bf16=True and gradient_checkpointing=True; both are
  off here, as in the lessons (fp32, no recomputation), so both run the same arithmetic at the same
  cost.
- The optimiser and schedule: TRL's "adamw_torch" with "constant_with_warmup" would take its first
  step at learning rate 0 (the schedule is step/warmup from step 0); ours is (step+1)/warmup. We
  pass lesson 02's Adam and schedule, so both take the same steps.
- Data order: shuffle_dataset=False, so TRL's sampler takes lesson 02's questions in lesson 02's
  order.

What differs by design (left as TRL does it, and why it does not change the comparison):
- Advantages: TRL divides by the Bessel-corrected group std plus 1e-4, (r - mean) / (std_{G-1} +
  1e-4); lesson 02 uses the population std, (r - mean) / std_G, and 0 for an all-equal group. With
  G = 8 TRL's advantages are sqrt(7/8) = 0.935 of ours; the ratio against the KL term (beta) shifts
  by that much.
- Random numbers: TRL seeds and draws in its own order (its sampler, its row shuffle before the
  loss), so the two runs draw different samples from the same distributions: compare them over
  seeds.
- clip_frac: lesson 02 counts tokens with |ratio - 1| > epsilon; TRL's clip_ratio/region_mean counts
  tokens where the clip is active (ratio below 1 - epsilon with A < 0, or above 1 + epsilon with
  A > 0). At mu = 1 the ratio is 1 and both are 0.
- Sampling runs transformers' generate in both, with the KV cache; TRL pads prompts itself and
  decodes completions with skip_special_tokens, which gives our verifier the same text.
- TRL's forward passes leave position ids to the model (0, 1, 2 .. from the left pad); lesson 02
  counts them from the first real token. Llama's rotary embedding depends only on the distance
  between two positions, so the log-probs are the same up to rounding.

What the two runs gave, measured and dated: docs/trl_side_by_side.md.
"""

import importlib.util
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import common  # noqa: E402
import task  # noqa: E402
import plumbing  # noqa: E402

_spec = importlib.util.spec_from_file_location("lesson_02", REPO / "02_grpo_outcome.py")
lesson_02 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lesson_02)

# lesson 02's --loss_agg in TRL
LOSS_TYPE = {"output": "grpo", "token": "bnpo", "constant": "dr_grpo"}


def grpo_config(args, out_dir: str, device: torch.device, n_steps: int):
    """Lesson 02's Args as a GRPOConfig, every field that decides the maths set explicitly."""
    from trl import GRPOConfig

    completions = args.batch_size * args.group_size  # one generation batch = one step's batch
    return GRPOConfig(
        output_dir=out_dir, report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=None,
        use_cpu=device.type == "cpu", seed=args.seed, max_steps=n_steps,
        # the lessons' arithmetic: fp32, no recomputation
        bf16=False, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=completions, generation_batch_size=completions,
        gradient_accumulation_steps=1,
        shuffle_dataset=False, remove_unused_columns=False, dataloader_num_workers=0,
        num_generations=args.group_size, max_completion_length=args.max_new_tokens,
        temperature=args.temperature, top_k=0, top_p=1.0, min_p=None, repetition_penalty=1.0,
        mask_truncated_completions=False, disable_dropout=True,
        beta=args.beta, epsilon=args.clip_eps, epsilon_high=args.clip_eps, num_iterations=args.mu,
        loss_type=LOSS_TYPE[args.loss_agg], scale_rewards=args.scale_rewards,
        importance_sampling_level="token",
        use_bias_correction_kl=False,  # TRL's True multiplies k3 by pi_theta/pi_old: not eq. (3)
        delta=None, off_policy_mask_threshold=None, top_entropy_quantile=1.0, entropy_coef=0.0,
        use_adaptive_entropy=False, sync_ref_model=False,
        multi_objective_aggregation="sum_then_normalize",
        learning_rate=args.lr, max_grad_norm=args.max_grad_norm, log_completions=False,
    )


def main(argv=None):
    # lesson 02's options, with lesson 02's bounds on each flag
    args = plumbing.parse_args(lesson_02.Args, argv, lesson_02.PRETRAINED)
    if args.kl_estimator != "k3":
        plumbing.fail(f"--kl_estimator {args.kl_estimator}: TRL's GRPOTrainer has only k3 "
                      f"(eq. (4)): drop the flag")
    try:
        from transformers import TrainerCallback
        from trl import GRPOTrainer
        import datasets
    except ImportError as error:
        plumbing.fail(f"this script needs trl ({error.name} is missing): "
                      f"pip install trl==1.16.0")
    started = time.time()
    device = plumbing.resolve_device(args.device)
    common.set_seed(args.seed)
    out_dir = plumbing.run_dir("trl_grpo", args, lesson_02.PRETRAINED)
    load = lambda: plumbing.load_policy(args.model, args.sft_steps, device, args.cache_dir or None,
                                        micro_batch_size=args.micro_batch_size)

    policy, tokenizer = load()
    evaluate = lambda: task.evaluate(policy, tokenizer, args.eval_test, args.eval_ood, args.k,
                                     args.temperature, args.max_new_tokens)
    before = evaluate()
    print(plumbing.results_table({"SFT model": before}))

    # Lesson 02's questions in lesson 02's order: step s takes questions s*B .. s*B+B-1
    common.set_seed(args.seed)
    problem_stream = task.train_problems(args.seed)
    problems = [next(problem_stream) for _ in range(args.steps * args.batch_size)]
    dataset = datasets.Dataset.from_dict({"prompt": [task.prompt_text(p) for p in problems],
                                          "problem_index": list(range(len(problems)))})
    batch_stats = {}

    def correct_answer(prompts, completions, problem_index, **kwargs):
        """Our verifier as TRL's reward function: 1.0 when the final answer is right, else 0.0."""
        rewards = [float(task.verify(problems[i], text)["correct"])
                   for i, text in zip(problem_index, completions)]
        batch_stats["accuracy"] = sum(rewards) / len(rewards)
        worked = sum(not t.lstrip().startswith("#") for t in completions)
        batch_stats["worked"] = worked / len(completions)
        return rewards

    # Lesson 02's optimiser and warm-up; TRL steps the schedule once per optimiser step (mu a batch)
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i // args.mu + 1) / max(1, args.warmup_steps)))
    log = plumbing.MetricsLog(out_dir)

    class LessonMetrics(TrainerCallback):
        """Each optimiser step's TRL log as one lesson-02 record (the same keys), with its time."""

        def on_step_begin(self, *_, **__):
            self.t0 = plumbing.clock(device)

        def on_step_end(self, *_, **__):
            self.step_time = plumbing.clock(device) - self.t0

        def on_log(self, _args, state, _control, logs=None, **__):
            if not logs or "reward" not in logs:
                return
            log.write({"step": state.global_step, "reward": logs["reward"],
                       "accuracy": batch_stats["accuracy"], "kl": logs.get("kl", 0.0),
                       "clip_frac": logs["clip_ratio/region_mean"], "loss": logs["loss"],
                       "grad_norm": logs["grad_norm"],
                       "zero_adv_groups": logs["frac_reward_zero_std"],
                       "completion_len": logs["completions/mean_length"],
                       "worked": batch_stats["worked"], "step_time": self.step_time})

    trainer = GRPOTrainer(model=policy, processing_class=tokenizer, reward_funcs=correct_answer,
                          args=grpo_config(args, out_dir, device, args.steps * args.mu),
                          train_dataset=dataset, optimizers=(optimizer, warmup),
                          callbacks=[LessonMetrics()])
    trainer.train()
    policy = trainer.model.eval()

    # as lesson 02 reads it: training and the evaluation before it
    memory = plumbing.peak_memory(device)
    after = evaluate()
    policy.save_pretrained(f"{out_dir}/model")
    tokenizer.save_pretrained(f"{out_dir}/model")
    log.write({"final": True, "before": before, "after": after, "memory": memory,
               "wall_time": time.time() - started})
    print(f"\nTRL GRPOTrainer, {args.steps} steps of {args.batch_size} questions "
          f"x G={args.group_size} on {device}, {time.time() - started:.0f}s; log in {out_dir}")
    print(plumbing.results_table({"SFT model": before, "after TRL GRPO": after}))
    print(memory)
    result = {"before": before, "after": after, "out_dir": out_dir, "memory": memory}
    if args.maj_pass_k:
        ref_policy = load()[0]
        result["maj_pass"] = lesson_02.maj_pass_report(policy, ref_policy, tokenizer, args, log)
    return result


if __name__ == "__main__":
    main()
