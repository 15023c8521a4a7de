"""The shared helper: task, verifier, sampling, log-probs, evaluation."""
import random

import pytest
import torch
import torch.nn.functional as F

import common
import findings
import task

import plumbing


@pytest.fixture(scope="module")
def tiny():
    tokenizer = plumbing.build_char_tokenizer()
    model = plumbing.build_tiny_model(tokenizer, seed=0).eval()
    return model, tokenizer


PROBLEM = {"question": "7+5*3-9", "start": 7, "ops": [("+", 5), ("*", 3), ("-", 9)], "answer": 27}


def test_problem_generator_is_seeded_and_in_range():
    a, b = task.make_split("test", 50), task.make_split("test", 50)
    assert a == b
    for p in a + task.make_split("ood", 50):
        value = p["start"]
        for op, x in p["ops"]:
            value = task.apply_op(value, op, x)
            assert 0 <= value <= task.MAX_VALUE
        assert value == p["answer"]
        assert task.verify(p, task.solution_text(p))["correct"]
    assert {len(p["ops"]) for p in task.make_split("ood", 50)} <= {5, 6}
    test_questions = {p["question"] for p in task.make_split("test", 500)}
    train = task.train_problems(0)
    assert not any(next(train)["question"] in test_questions for _ in range(2000))


def test_solution_text_worked_example():
    assert task.prompt_text(PROBLEM) == "7+5*3-9\n"
    assert task.solution_text(PROBLEM) == "7+5=12\n12*3=36\n36-9=27\n#### 27\n"


def test_verify_good_wrong_partial_garbage():
    good = task.verify(PROBLEM, "7+5=12\n12*3=36\n36-9=27\n#### 27\n")
    assert good == {"correct": True, "answer": 27, "steps": [True, True, True, True], "missing": 0}
    # an arithmetic slip in step 2 carried forward: later steps are locally right, the answer is wrong
    wrong = task.verify(PROBLEM, "7+5=12\n12*3=35\n35-9=26\n#### 26\n")
    assert wrong == {"correct": False, "answer": 26, "steps": [True, False, True, False], "missing": 0}
    # truncated: no final answer, last line cut short; the third operation and the answer line are missing
    partial = task.verify(PROBLEM, "7+5=12\n12*3=3")
    assert partial == {"correct": False, "answer": None, "steps": [True, False], "missing": 2}
    # right answer line with no work still counts as the outcome; its three operations are missing
    assert task.verify(PROBLEM, "#### 27\n") == {"correct": True, "answer": 27, "steps": [True], "missing": 3}
    # the solution ends at its first answer line: what follows is wrong, a repeated answer earns nothing
    assert task.verify(PROBLEM, "7+5=12\n12*3=36\n36-9=27\n#### 27\n#### 27\n7+5=12\n") == \
        {"correct": True, "answer": 27, "steps": [True, True, True, True, False, False], "missing": 0}
    assert task.verify(PROBLEM, "#### 26\n#### 27\n")["correct"] is False  # the first answer counts
    # a step that uses the wrong operation, or the wrong first operand
    assert task.verify(PROBLEM, "7*5=35\n")["steps"] == [False]
    assert task.verify(PROBLEM, "8+5=13\n")["steps"] == [False]
    for garbage in ["", "\n", "\n\n\n", "####", "#### \n", "#### 99999999999999999999\n", "=====",
                    "7+5=" + "9" * 5000, "\x00\ufffd漢字", "#### -27", "<eos><pad>", "1+1=2\n" * 50]:
        out = task.verify(PROBLEM, garbage)
        assert out["correct"] is False and len(out["steps"]) == len(task.split_lines(garbage))


def test_tokenizer_is_character_level_and_round_trips(tiny):
    _, tokenizer = tiny
    text = "7+5*3-9\n7+5=12\n#### 27\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer(text)["input_ids"][0] == tokenizer.bos_token_id


def test_completion_mask_stops_at_first_eos_and_step_ends(tiny):
    _, tokenizer = tiny
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    rows = [ids("1+2=3\n") + [eos] + ids("9\n") + [eos],  # EOS in the middle: what follows is masked
            ids("#### 3\n#12"),  # no EOS (cut at max_new_tokens): every token counts
            [eos] + [pad] * 8]  # EOS first: an empty completion of one token
    T = max(len(r) for r in rows)
    completion_ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows])
    prompt = tokenizer(["1+2\n"] * 3, return_tensors="pt")
    batch = common._finish(tokenizer, prompt["input_ids"], prompt["attention_mask"], completion_ids)
    assert batch.completion_mask.tolist() == [[1] * 7 + [0] * 3, [1] * 10, [1] + [0] * 9]
    assert batch.texts == ["1+2=3\n", "#### 3\n#12", ""]
    assert batch.step_ends == [[5], [6, 9], []]


def test_build_batch_matches_demonstration(tiny):
    _, tokenizer = tiny
    batch = common.build_batch(tokenizer, ["7+5*3-9\n", "1+1\n"], [task.solution_text(PROBLEM), "1+1=2\n"], "cpu")
    assert batch.texts == [task.solution_text(PROBLEM), "1+1=2\n"]
    assert batch.step_ends[0] == [6, 14, 22, 30]  # the newline of each line
    assert batch.completion_mask.sum(1).tolist() == [32, 7]  # text + EOS
    assert batch.prompt_mask.tolist()[1][:4] == [0, 0, 0, 0]  # left padding


def test_token_logprobs_equal_transformers_cross_entropy(tiny):
    model, tokenizer = tiny
    prompt, completion = "7+5*3-9\n", task.solution_text(PROBLEM)
    batch = common.build_batch(tokenizer, [prompt], [completion], "cpu")
    ours = common.token_logprobs(model, batch)[0]  # [T]
    prompt_ids = tokenizer(prompt)["input_ids"]
    full = torch.tensor([prompt_ids + batch.completion_ids[0].tolist()])
    labels = full.clone()
    labels[0, :len(prompt_ids)] = -100
    with torch.no_grad():
        loss = model(input_ids=full, labels=labels).loss  # transformers' own mean token cross-entropy
        per_token_ce = F.cross_entropy(model(input_ids=full).logits[0, :-1], full[0, 1:], reduction="none")
    assert torch.allclose(-ours.mean(), loss, atol=1e-5)
    assert torch.allclose(-ours, per_token_ce[len(prompt_ids) - 1:], atol=1e-5)


def test_token_logprobs_unchanged_by_left_padding_and_temperature(tiny):
    model, tokenizer = tiny
    completions = [task.solution_text(PROBLEM), "1+"]
    short = common.build_batch(tokenizer, ["7+5*3-9\n", "1+1\n"], completions, "cpu")
    # the same rows with 5 extra pad tokens on the left of every prompt
    pad = torch.full((2, 5), tokenizer.pad_token_id)
    padded = common.Batch(torch.cat([pad, short.prompt_ids], 1), torch.cat([torch.zeros_like(pad), short.prompt_mask], 1),
                          short.completion_ids, short.completion_mask, short.texts, short.step_ends)
    with torch.no_grad():
        for temperature in (1.0, 0.7):
            a = common.token_logprobs(model, short, temperature)
            b = common.token_logprobs(model, padded, temperature)
            assert torch.allclose(a, b, atol=1e-5)
            assert (a[short.completion_mask == 0] == 0).all()
    # temperature divides the logits: check one position by hand
    with torch.no_grad():
        ids = torch.cat([short.prompt_ids[:1], short.completion_ids[:1]], 1)
        logits = model(input_ids=ids).logits[0, short.prompt_ids.shape[1] - 1]
        expected = F.log_softmax(logits / 0.7, -1)[short.completion_ids[0, 0]]
        assert torch.allclose(common.token_logprobs(model, short, 0.7)[0, 0], expected, atol=1e-5)


def test_sample_shapes_groups_and_masks(tiny):
    model, tokenizer = tiny
    torch.manual_seed(0)
    batch = common.sample(model, tokenizer, ["7+5*3-9\n", "1+1\n"], group_size=3, max_new_tokens=12)
    assert batch.completion_ids.shape[0] == 6 and batch.completion_ids.shape[1] <= 12
    assert batch.prompt_ids.shape[0] == 6
    assert (batch.prompt_ids[0] == batch.prompt_ids[2]).all() and not (batch.prompt_ids[0] == batch.prompt_ids[3]).all()
    for row, mask, text in zip(batch.completion_ids, batch.completion_mask, batch.texts):
        n = int(mask.sum())
        if (row == tokenizer.eos_token_id).any():
            assert row[n - 1] == tokenizer.eos_token_id and (row[:n - 1] != tokenizer.eos_token_id).all()
        else:
            assert n == len(row)


def test_sample_step_ends_match_verifier_lines(tiny):
    model, tokenizer = tiny
    torch.manual_seed(1)
    batch = common.sample(model, tokenizer, ["7+5*3-9\n"], group_size=16, max_new_tokens=30)
    for text, ends, mask in zip(batch.texts, batch.step_ends, batch.completion_mask):
        assert len(ends) == len(task.split_lines(text)) == len(task.verify(PROBLEM, text)["steps"])
        assert all(e < int(mask.sum()) for e in ends)


def test_majority_vote():
    texts = ["#### 27\n", "#### 26\n", "#### 27\n", "junk", "#### 5\n"]
    assert task.majority_correct(PROBLEM, texts)
    assert not task.majority_correct(PROBLEM, ["#### 26\n", "#### 26\n", "#### 27\n"])
    assert not task.majority_correct(PROBLEM, ["junk", ""])


def test_evaluate_counts_a_perfect_model(monkeypatch):
    """evaluate() on a stand-in sampler that always writes the right solution gives 100% everywhere."""
    tokenizer = plumbing.build_char_tokenizer()
    problems = {p["question"]: p for p in task.make_split("test", 8) + task.make_split("ood", 8)}

    def oracle(model, tokenizer, prompts, group_size=1, temperature=1.0, max_new_tokens=64, greedy=False):
        prompts = [p for p in prompts for _ in range(group_size)]
        return common.build_batch(tokenizer, prompts, [task.solution_text(problems[p.strip()]) for p in prompts], "cpu")

    monkeypatch.setattr(common, "sample", oracle)
    result = task.evaluate(None, tokenizer, n_test=8, n_ood=8, k=3)
    assert result == {"test_greedy": 1.0, "test_maj@3": 1.0, "test_pass@3": 1.0, "ood_greedy": 1.0}


def test_bad_device_and_missing_model_are_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="--device 'gpu0'"):
        plumbing.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="torch sees none"):
            plumbing.resolve_device("cuda")
    with pytest.raises(SystemExit, match="does not exist"):
        plumbing.load_policy(str(tmp_path / "no-such-model"), sft_steps=0, cache_dir=tmp_path)


def test_token_logprobs_are_the_distribution_generate_samples_from(tiny):
    """With left padding in the batch, generate's own (temperature-scaled) scores give the same log-probs."""
    model, tokenizer = tiny
    prompts = ["7+5*3-9\n", "1+1\n", "9*9-8+1+2\n"]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    torch.manual_seed(0)
    out = model.generate(**enc, do_sample=True, temperature=0.8, top_k=0, top_p=1.0, max_new_tokens=20,
                         output_scores=True, return_dict_in_generate=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    P = enc["input_ids"].shape[1]
    batch = common._finish(tokenizer, enc["input_ids"], enc["attention_mask"], out.sequences[:, P:])
    scores = torch.stack(out.scores, 1)  # [N, T, V], already divided by the temperature
    from_generate = torch.gather(F.log_softmax(scores, -1), 2, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        ours = common.token_logprobs(model, batch, temperature=0.8)
    assert torch.allclose(from_generate * batch.completion_mask, ours, atol=1e-4)


def test_sample_draws_token_for_token_what_generate_draws():
    """common.sample's own loop (rows leave the batch at EOS) gives generate's samples under the same seed."""
    model, tokenizer = plumbing.load_policy("tiny", plumbing.SFT_STEPS, "cpu")  # pi_sft: rows end at different lengths
    prompts = [task.prompt_text(p) for p in task.make_split("test", 12)]
    enc = tokenizer([p for p in prompts for _ in range(4)], return_tensors="pt", padding=True, padding_side="left")
    for how in (dict(do_sample=True, temperature=1.0), dict(do_sample=True, temperature=0.7), dict(do_sample=False)):
        torch.manual_seed(3)
        out = model.generate(**enc, **how, top_k=0, top_p=1.0, max_new_tokens=40, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(3)
        ours = common.sample(model, tokenizer, prompts, 4, how.get("temperature", 1.0), 40, greedy=not how["do_sample"])
        expected = out[:, enc["input_ids"].shape[1]:]
        assert torch.equal(ours.completion_ids, expected), how  # the prompt computed once, repeated G times
        assert torch.equal(ours.prompt_ids, enc["input_ids"]) and torch.equal(ours.prompt_mask, enc["attention_mask"])
        lengths = ours.completion_mask.sum(1)
        assert lengths.min() < lengths.max()  # some rows left the batch early


STATIC_CASES = ((dict(greedy=True), 1), (dict(temperature=1.0), 1), (dict(temperature=0.7), 1),
                (dict(temperature=1.0), 8))  # (how it samples, check_every)


def assert_sample_static_is_sample(model, tokenizer, prompts: list, max_new_tokens: int,
                                   cases=STATIC_CASES):
    """common.sample_static without its CUDA graph (the GPU's sampler: a static cache, every row to
    the end, EOS checked every few tokens) gives sample's completions token for token, greedy and
    sampled; with EOS checked every token it also leaves the random generator where sample does."""
    for how, check_every in cases:
        common.set_seed(3)
        loop = common.sample(model, tokenizer, prompts, 4, max_new_tokens=max_new_tokens, **how)
        next_draw = torch.rand(1)
        common.set_seed(3)
        static = common.sample_static(model, tokenizer, prompts, 4, max_new_tokens=max_new_tokens,
                                      check_every=check_every, **how)
        assert torch.equal(static.completion_ids, loop.completion_ids), (how, check_every)
        assert torch.equal(static.completion_mask, loop.completion_mask)
        assert torch.equal(static.prompt_ids, loop.prompt_ids) and static.texts == loop.texts
        assert static.step_ends == loop.step_ends
        if check_every == 1:
            assert torch.equal(torch.rand(1), next_draw), how  # not one random draw more or less
    assert loop.prompt_mask.sum(1).unique().numel() > 1  # prompts of different lengths


def test_sample_static_draws_token_for_token_what_sample_draws(sft_policy):
    model, tokenizer = sft_policy  # the shipped pi_sft
    prompts = [task.prompt_text(p) for p in task.make_split("test", 6) + task.make_split("ood", 2)]
    assert_sample_static_is_sample(model, tokenizer, prompts, 40)
    common.set_seed(3)
    lengths = common.sample(model, tokenizer, prompts, 4, max_new_tokens=40).completion_mask.sum(1)
    assert lengths.min() < lengths.max()  # rows end at different lengths: the EOS logic is tested


def test_sample_keeps_its_token_loop_on_the_cpu(tiny, monkeypatch):
    """Only a CUDA model takes sample_static: every CPU number of the course stays the loop's."""
    model, tokenizer = tiny
    monkeypatch.setattr(common, "sample_static", lambda *a, **k: pytest.fail("static path on CPU"))
    assert len(common.sample(model, tokenizer, ["1+2\n"], 2, max_new_tokens=4)) == 2


def test_token_logprobs_by_length_equal_one_pass(tiny):
    """Sorting rows into buckets by length and cutting each bucket's padding changes no log-prob or gradient."""
    model, tokenizer = tiny
    rng = random.Random(0)
    problems = [task.make_problem(rng, rng.randint(2, 4)) for _ in range(9)]
    completions = [task.solution_text(p)[:rng.randint(1, 40)] for p in problems]  # 1 to 40 characters
    batch = common.build_batch(tokenizer, [task.prompt_text(p) for p in problems], completions, "cpu")
    for buckets in (1, 2, 4, 9):
        model.zero_grad()
        one_pass = common.token_logprobs(model, batch, 0.7)
        one_pass.sum().backward()
        expected = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        by_length = common.token_logprobs(model, batch, 0.7, buckets=buckets)
        by_length.sum().backward()
        assert torch.allclose(by_length, one_pass, atol=1e-5)
        assert (by_length[batch.completion_mask == 0] == 0).all()
        for p, g in zip(model.parameters(), expected):
            assert torch.allclose(p.grad, g, atol=1e-4)
    model.zero_grad()


def test_the_shipped_pi_sft_is_current():
    """pi_sft/ was built by the code as it is now: a change to the task, the model or the SFT loop must
    come with `python plumbing.py` (which rebuilds pi_sft/) in the same commit."""
    import json

    built = json.loads((plumbing.SHIPPED_SFT / "build.json").read_text())
    assert built["code_fingerprint"] == plumbing.sft_code_fingerprint(), \
        "the code that builds pi_sft changed: rebuild it with `python plumbing.py` and commit pi_sft/"
    assert (built["sft_steps"], built["seed"]) == (plumbing.SFT_STEPS, 0)
    policy, _ = plumbing.load_policy("tiny", plumbing.SFT_STEPS, "cpu")
    assert policy.name_or_path == str(plumbing.SHIPPED_SFT)  # the default loads the shipped weights, builds nothing


def test_rebuilding_pi_sft_gives_the_shipped_one(tmp_path):
    """The shipped pi_sft is what the repo's own code builds: rebuilt from scratch here (about 3 minutes on a
    2-core CPU), it is a model of the same quality. On the CPU that built it the weights are bitwise equal;
    another CPU's float kernels round differently and 800 SFT steps carry that into other weights. Measured
    on a 2-core AMD EPYC with AVX-512 (one thread): 38.5% greedy test against the shipped 45.0%, and 41.0%
    for a variant of the code that differs only in rounding. So the bound is 10 points: it holds across
    those CPUs and still fails when the warm start is broken."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    out = tmp_path / "pi_sft"
    subprocess.run([sys.executable, str(plumbing.REPO / "plumbing.py"), str(out)], check=True,
                   env={**__import__("os").environ, "TQDM_DISABLE": "1"})
    shipped, rebuilt = (json.loads((p / "build.json").read_text()) for p in (plumbing.SHIPPED_SFT, out))
    assert abs(rebuilt["test_greedy"] - shipped["test_greedy"]) <= 0.10, (rebuilt, shipped)
    assert rebuilt["code_fingerprint"] == shipped["code_fingerprint"], (rebuilt, shipped)
    a, b = load_file(plumbing.SHIPPED_SFT / "model.safetensors"), load_file(out / "model.safetensors")
    print("largest weight difference, rebuilt vs shipped:", max((a[k] - b[k]).abs().max().item() for k in a))


def test_verdict_follows_the_stated_rule():
    # reproduced: the paper's sign on every seed and mean >= 2 std (mean 0.11, std 0.01)
    assert findings.verdict([0.10, 0.12, 0.11]) == "reproduced"
    # contradicted: the mirror image
    assert findings.verdict([-0.10, -0.12, -0.11]) == "contradicted"
    # every seed positive but the spread is large: mean 0.12, std 0.16; and its mirror
    assert findings.verdict([0.05, 0.01, 0.30]) == "inconclusive"
    assert findings.verdict([-0.05, -0.01, -0.30]) == "inconclusive"
    # a null result is inconclusive whichever sign its mean has (+0.5 +- 4.4 and -0.7 +- 3.3)
    assert findings.verdict([0.10, -0.02, 0.30]) == "inconclusive"
    assert findings.verdict([-0.10, 0.02, 0.01]) == "inconclusive"
    # a float residue is no difference (0.3 - 0.1 - 0.2 = -2.8e-17), not a sign
    assert findings.verdict([0.3 - 0.1 - 0.2] * 3) == "inconclusive"
    assert findings.verdict([0.2]) == "inconclusive, 1 seed" == findings.verdict([-0.2])


def test_answers_in_non_ascii_digits_are_graded_wrong():
    """The decision: the task's answers are written in ASCII digits; "２７" (full-width) and "٢٧" (Arabic-Indic),
    which Python's int() and \\d would read as 27, are not the answer, and a step written with them is wrong."""
    assert task.verify(PROBLEM, "#### 27\n")["correct"]
    for digits in ("２７", "٢٧", "2７", "۲۷", "𝟐𝟕"):
        graded = task.verify(PROBLEM, f"#### {digits}\n")
        assert graded == {"correct": False, "answer": None, "steps": [False], "missing": 3}, digits  # no answer line
    # a step line that does not parse is wrong, and the next line is checked against the last parsed result (7)
    assert task.verify(PROBLEM, "7+5=１２\n12*3=36\n36-9=27\n#### 27\n")["steps"] == [False, False, True, True]
    assert not task.majority_correct(PROBLEM, ["#### ２７\n", "#### ２７\n", "#### 26\n"])


def scripted_sampler(greedy_right, sampled_right, k, calls):
    """A stand-in for common.sample: greedy outputs are right for the questions in `greedy_right`; the k
    samples of a question q are right where sampled_right(q) says so (a list of k bools), wrong answers
    all the same number (so a majority of wrong samples agrees on it). Records every call."""
    tokenizer = plumbing.build_char_tokenizer()
    problems = {p["question"]: p for p in task.make_split("test", 16) + task.make_split("ood", 16)}

    def text(p, right):
        return task.solution_text(p) if right else f"#### {p['answer'] + 1}\n"

    def sample(model, tok, prompts, group_size=1, temperature=1.0, max_new_tokens=64, greedy=False):
        calls.append({"n": len(prompts), "group_size": group_size, "temperature": temperature,
                      "max_new_tokens": max_new_tokens, "greedy": greedy})
        texts = []
        for prompt in prompts:
            p = problems[prompt.strip()]
            if greedy:
                texts.append(text(p, p["question"] in greedy_right))
            else:
                assert group_size == k
                texts += [text(p, r) for r in sampled_right(p["question"])]
        return common.build_batch(tokenizer, [p for p in prompts for _ in range(group_size)], texts, "cpu")

    return tokenizer, sample


def test_evaluate_tells_greedy_maj_and_pass_apart(monkeypatch):
    """Eight test questions, K = 3 samples each: greedy right on questions 0 and 4 only; samples right
    [R, R, W] on questions 0, 1, 4, 5 (majority right), [W, W, R] on 2 and 6 (only Pass@3), none on 3 and 7.
    So greedy 2/8, Maj@3 4/8, Pass@3 6/8; OOD greedy right on 3 of 8 questions."""
    test, ood = task.make_split("test", 8), task.make_split("ood", 8)
    greedy_right = {test[0]["question"], test[4]["question"]} | {p["question"] for p in ood[:3]}
    pattern = {0: [True, True, False], 1: [True, True, False], 2: [False, False, True], 3: [False] * 3}
    index = {p["question"]: i for i, p in enumerate(test)}
    calls = []
    tokenizer, sampler = scripted_sampler(greedy_right, lambda q: pattern[index[q] % 4], 3, calls)
    monkeypatch.setattr(common, "sample", sampler)
    result = task.evaluate(None, tokenizer, n_test=8, n_ood=8, k=3, temperature=0.6, max_new_tokens=50, chunk=6)
    assert result == {"test_greedy": 0.25, "test_maj@3": 0.5, "test_pass@3": 0.75, "ood_greedy": 0.375}
    # every question once greedily per split, and its K samples at the given temperature, in chunks
    assert sum(c["n"] for c in calls if c["greedy"]) == 16
    assert sum(c["n"] for c in calls if not c["greedy"]) == 8
    assert all(c["temperature"] == 0.6 and c["group_size"] == 3 for c in calls if not c["greedy"])
    assert all(c["max_new_tokens"] == 50 for c in calls) and max(c["n"] * c["group_size"] for c in calls) <= 6


def test_maj_pass_curve_worked_example(monkeypatch):
    """N = 4 samples per question. Question A: [R, W, R, W] (c = 2); question B: [W, W, W, R] (c = 1).
    Pass@K, unbiased, 1 - C(N-c, K)/C(N, K): A 1/2, 5/6, 1 for K = 1, 2, 4; B 1/4, 1/2, 1.
    Maj@K over the N/K blocks of K (a tie goes to the answer seen first): A [R][W][R][W] 1/2, [R,W][R,W] 1,
    [R,W,R,W] 1; B 1/4, [W,W][W,R] 0, [W,W,W,R] 0. The curve is the mean over A and B."""
    a, b = task.make_split("test", 2)
    pattern = {a["question"]: [True, False, True, False], b["question"]: [False, False, False, True]}
    calls = []
    tokenizer, sampler = scripted_sampler(set(), pattern.get, 4, calls)
    monkeypatch.setattr(common, "sample", sampler)
    curve = task.maj_pass_curve(None, tokenizer, [a, b], [1, 2, 4])
    expected = {"pass@1": (1 / 2 + 1 / 4) / 2, "pass@2": (5 / 6 + 1 / 2) / 2, "pass@4": 1.0,
                "maj@1": (1 / 2 + 1 / 4) / 2, "maj@2": (1 + 0) / 2, "maj@4": (1 + 0) / 2}
    assert curve == pytest.approx(expected)
    assert [c["temperature"] for c in calls] == [0.7] * len(calls)  # the paper's temperature by default
    # the estimate is unbiased: Pass@2 of A is the share of its 6 pairs of samples with a right one
    from itertools import combinations
    pairs = list(combinations(pattern[a["question"]], 2))
    assert sum(any(p) for p in pairs) / len(pairs) == pytest.approx(5 / 6)
